"""What logging.backends costs a run.

  python bench/trackers.py                       # per step: Trackers.log_metrics + log_rollouts, each backend
  python bench/trackers.py --recipe --runs 2     # the default recipe command, alternating [] and [tensorboard]

The per-step mode replays a real metrics row (the recipe's ~70 metrics) and 32 collector records through each
backend (W&B offline, MLflow on a file store under a temporary folder) and reports the opening time and the
median time per step, which does not depend on the machine's load the way a whole run does. The recipe mode
runs ``python recipes/grpo.py`` (plus ``--extra`` overrides) with each setting in turn and reports wall time, CPU
time (user + system, less sensitive to other jobs than wall time), the sum of perf/iteration_time_s and the time the
run spent inside the trackers (the recipe's closing "trackers (...): N s in all" line: the direct cost, which the
whole-run difference measures with the machine's noise on top); run it under ``flock /tmp/heavy.lock`` on a shared
machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gym_plugin.trackers import TRACKER_BACKENDS, Trackers  # noqa: E402


def metrics_row() -> dict[str, float]:
    """A metrics.jsonl row of the recipe's shape: ~70 namespaced floats."""
    keys = ([f"rollout/m{i}" for i in range(35)] + [f"loss/m{i}" for i in range(15)]
            + [f"perf/m{i}" for i in range(20)])
    return {k: 0.1 * i for i, k in enumerate(keys)}


def records(n: int = 32) -> list[dict]:
    return [{"responses_create_params": {"input": [{"role": "user", "content": f"What is the capital of country {i}?"}]},
             "response": {"output": [{"type": "message", "role": "assistant",
                                      "content": [{"type": "output_text", "text": "The capital is X. " * 4}]}]},
             "reward": float(i % 2)} for i in range(n)]


def per_step(steps: int) -> None:
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    row, recs = metrics_row(), records()
    print(f"{'backend':<12} {'open s':>8} {'ms/step (median of ' + str(steps) + ')':>26} {'close s':>8}")
    for backend in TRACKER_BACKENDS:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            trackers = Trackers.open([backend], tmp, config={"train": {"lr": 1e-5, "steps": steps}})
            opened = time.perf_counter() - t0
            times = []
            for step in range(1, steps + 1):
                t = time.perf_counter()
                trackers.log_metrics(step, row)
                trackers.log_rollouts(step, recs)
                times.append(time.perf_counter() - t)
            t = time.perf_counter()
            trackers.close()
            closed = time.perf_counter() - t
        print(f"{backend:<12} {opened:>8.2f} {1000 * statistics.median(times):>26.1f} {closed:>8.2f}")


def recipe(runs: int, settings: list[str], extra: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    results: dict[str, list[tuple[float, float, float, float]]] = {s: [] for s in settings}
    for i in range(runs):
        for setting in settings:  # alternate, so slow drifts of the machine's load hit both alike
            with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
                run_dir = Path(tmp) / "run"
                load = os.getloadavg()[0]
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                t0 = time.perf_counter()
                proc = subprocess.run([sys.executable, str(ROOT / "recipes" / "grpo.py"), f"run_dir={run_dir}",
                                       "logging.progress=false", f"logging.backends={setting}", *extra],
                                      cwd=ROOT, env=env, capture_output=True, text=True)
                wall = time.perf_counter() - t0
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
                if proc.returncode != 0:
                    sys.exit(f"run failed: {(proc.stdout + proc.stderr)[-3000:]}")
                rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
                iters = sum(r["perf/iteration_time_s"] for r in rows)
                inside = re.search(r"trackers \(.*\): ([0-9.]+) s in all", proc.stderr)
                tracker_s = float(inside.group(1)) if inside else 0.0
                results[setting].append((wall, iters, cpu, tracker_s))
                print(f"run {i + 1} backends={setting}: wall {wall:.1f} s, CPU {cpu:.1f} s, sum "
                      f"perf/iteration_time_s {iters:.1f} s, inside the trackers {tracker_s:.2f} s "
                      f"(load before {load:.2f})", flush=True)
    base = [statistics.mean(r[j] for r in results[settings[0]]) for j in (0, 2)]
    base_median = [statistics.median(r[j] for r in results[settings[0]]) for j in (0, 2)]
    for setting in settings:
        wall, cpu = (statistics.mean(r[j] for r in results[setting]) for j in (0, 2))
        mwall, mcpu = (statistics.median(r[j] for r in results[setting]) for j in (0, 2))
        inside = statistics.mean(r[3] for r in results[setting])
        print(f"backends={setting}: mean wall {wall:.1f} s ({100 * (wall / base[0] - 1):+.1f}%), mean CPU {cpu:.1f} s "
              f"({100 * (cpu / base[1] - 1):+.1f}%); median wall {mwall:.1f} s "
              f"({100 * (mwall / base_median[0] - 1):+.1f}%), median CPU {mcpu:.1f} s "
              f"({100 * (mcpu / base_median[1] - 1):+.1f}%) vs {settings[0]}; inside the trackers {inside:.2f} s "
              f"({100 * inside / wall:.2f}% of the wall time)")
    for setting in settings[1:]:
        pairs = [b[0] - a[0] for a, b in zip(results[settings[0]], results[setting])]
        print(f"per-pair wall difference {setting} - {settings[0]}: " + ", ".join(f"{d:+.1f}" for d in pairs) + " s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", action="store_true", help="time whole recipe runs instead of the per-step cost")
    parser.add_argument("--runs", type=int, default=2, help="recipe runs per setting")
    parser.add_argument("--settings", nargs="+", default=["[]", "[tensorboard]"], help="logging.backends values")
    parser.add_argument("--extra", nargs="*", default=[], help="more recipe overrides (e.g. model=tiny env=letters)")
    parser.add_argument("--steps", type=int, default=50, help="steps replayed per backend (per-step mode)")
    args = parser.parse_args()
    if args.recipe:
        recipe(args.runs, args.settings, args.extra)
    else:
        per_step(args.steps)


if __name__ == "__main__":
    main()
