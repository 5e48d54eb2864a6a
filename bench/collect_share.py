"""Where a recipe step goes (sampling, training, weight sync), per embedded scheduler, in one sitting.

    flock /tmp/heavy.lock env PYTHONPATH=. python bench/collect_share.py preset=reasoning train.steps=4 eval.every=0
    ... python bench/collect_share.py --schedulers continuous ...   # one setting only

Runs ``python recipes/grpo.py <overrides> policy.scheduler=<s>`` once per scheduler (``continuous``: the engine
that refills a finished row's slot at the next step and reuses prompts' KV across calls; ``batch``: the engine
before it, one batch run to its end), one after the other, and reads each run's metrics.jsonl:

- collect share = perf/collect_time_s / perf/iteration_time_s; train share = perf/step_time_s (+ the old
  log-prob pass) / iteration; sync share = perf/weight_sync_s / iteration;
- sampled tok/s = rollout/gen_tokens_mean x rollout/num_rollouts / perf/collect_time_s (every generated token of
  the step's rollouts, over the collection's wall time).

The first step pays one-off costs (thread pools, allocator warm-up), so the table gives step 1 and the mean of
steps 2.. separately. Prints one JSON line per run, then a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def shares(row: dict) -> dict:
    it = row["perf/iteration_time_s"]
    collect = row["perf/collect_time_s"]
    train = row.get("perf/step_time_s", 0.0) + row.get("perf/old_logprob_time_s", 0.0)
    sync = row.get("perf/weight_sync_s", 0.0)
    tokens = row["rollout/gen_tokens_mean"] * row["rollout/num_rollouts"]
    return {"iteration_s": it, "collect_s": collect, "collect_share": collect / it, "train_share": train / it,
            "sync_share": sync / it, "sampled_tokens": tokens, "sampled_tok_s": tokens / collect,
            "gen_tokens_mean": row["rollout/gen_tokens_mean"]}


def run(scheduler: str, overrides: list[str]) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        run_dir = Path(tmp) / "run"
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(ROOT / "recipes" / "grpo.py"), f"run_dir={run_dir}",
                               "logging.progress=false", f"policy.scheduler={scheduler}", *overrides],
                              cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.exit(f"run failed ({scheduler}): {(proc.stdout + proc.stderr)[-3000:]}")
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    per_step = [shares(r) for r in rows if "perf/collect_time_s" in r]
    print(json.dumps({"scheduler": scheduler, "wall_s": round(wall, 1), "load": os.getloadavg()[0],
                      "steps": [{k: round(v, 3) for k, v in s.items()} for s in per_step]}), flush=True)
    return per_step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schedulers", nargs="+", default=["batch", "continuous"], choices=["batch", "continuous"])
    p.add_argument("overrides", nargs="*", help="recipe overrides (e.g. preset=reasoning train.steps=4)")
    args = p.parse_args()
    load_before = os.getloadavg()[0]
    results = {s: run(s, args.overrides) for s in args.schedulers}
    print(f"\nrecipe {' '.join(args.overrides)}; load average before {load_before:.2f}, after "
          f"{os.getloadavg()[0]:.2f} (1 min)")
    keys = ["iteration_s", "collect_s", "collect_share", "train_share", "sync_share", "sampled_tok_s",
            "gen_tokens_mean"]
    print("| scheduler | steps | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 2) + "|")
    for s, steps in results.items():
        for label, part in (("1", steps[:1]), (f"2..{len(steps)}", steps[1:])):
            if not part:
                continue
            vals = [statistics.mean(x[k] for x in part) for k in keys]
            print(f"| {s} | {label} | " + " | ".join(f"{v:.2f}" if v < 100 else f"{v:.0f}" for v in vals) + " |")


if __name__ == "__main__":
    main()
