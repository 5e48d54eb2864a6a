"""Our recipe vs TRL's GRPOTrainer on the same setting, alternating, one process per run: s/step split into
collection and training, peak RSS, and the reward per step.

    flock /tmp/heavy.lock python bench/vs_trl.py --steps 10 --rounds 2          # ~27 min on a quiet 2-core CPU
    python bench/vs_trl.py --steps 2 --rounds 1 --max-new-tokens 8              # sanity check of the bench

Setting: SmolLM2-135M-Instruct fp32 on CPU, the capital-city task (gym_plugin.tasks), 8 prompts x 4 samples per
step, up to 48 new tokens at temperature 1.0, lr 1e-5 constant, one optimizer step per batch, no KL. Ours is
``python recipes/grpo.py`` (the default config: AdamW) with those values and no eval, ``ours_lowmem`` the
same plus LOW_MEMORY (memory=low), ``ours_inbwd`` plus IN_BACKWARD (AdamW stepped in backward); TRL's is
bench/trl_grpo.py run with ``--trl-python`` (a venv with trl; see that file for its config). Runs alternate (``--sides`` order, every round) so a slow period
of the machine hits every side.

Allocator: our recipe runs under jemalloc where it is installed (gym_plugin/allocator.py; its "run dir" log line
says which); ``GYM_PLUGIN_ALLOCATOR=system python bench/vs_trl.py ...`` runs ours on the C library's malloc.
``trl_jemalloc`` runs TRL's side with jemalloc preloaded too.

Collection = our ``perf/collect_time_s`` (rollouts from the embedded server through the Gym servers) vs TRL's
``_generate_and_score_completions``; training = the rest of the step (ours: process_rollouts, grpo_step, weight
sync, logging; TRL: loss, backward, optimizer). Peak RSS = the run's process, from ``os.wait4``. s/step is the
mean over steps 2..N (step 1 pays one-time allocation); "all" includes step 1.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str], log: Path, env: dict) -> tuple[int, float, float]:
    """(return code, wall seconds, peak RSS in MB) of ``cmd``, output to ``log``."""
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - started, usage.ru_maxrss / 1024


LOW_MEMORY = ["memory=low"]
"""``ours_lowmem``: conf/memory/low.yaml: Adafactor stepped inside backward (gym_plugin/optim.py) and the LM head
in chunks (gym_plugin/logprobs.py)."""
IN_BACKWARD = ["train.optimizer_in_backward=true", "step.max_grad_norm=null"]
"""``ours_inbwd``: the default's AdamW (its moments kept), each parameter stepped inside backward, so the model's
gradients never exist at once (-517 MB for SmolLM2); the global norm is not clipped."""
SIDE_OVERRIDES = {"ours": [], "ours_lowmem": LOW_MEMORY, "ours_inbwd": IN_BACKWARD, "ours_lowmem_glibc": LOW_MEMORY}
SIDE_ENV = {"ours_lowmem_glibc": {"GYM_PLUGIN_ALLOCATOR": "system"}}
"""``ours_lowmem_glibc``: ``ours_lowmem`` on the C library's malloc (no jemalloc re-exec): the allocator's share."""
TRL_SIDES = ("trl", "trl_gym", "trl_jemalloc")
"""``trl_jemalloc``: TRL's run with jemalloc preloaded, as our recipe runs where it is installed
(gym_plugin/allocator.py): the comparison with the allocator taken out."""


def ours(args, run_dir: Path, env: dict, extra: list[str] = ()) -> dict:
    cmd = [sys.executable, "recipes/grpo.py", f"train.steps={args.steps}", "train.prompts_per_step=8",
           "train.group_size=4", f"policy.max_output_tokens={args.max_new_tokens}", "train.lr=1e-5",
           "eval.at_start=false", "eval.at_end=false", "logging.progress=false", "logging.plot=false",
           f"run_dir={run_dir}", *extra, *args.ours_overrides]
    rc, wall, rss = run(cmd, run_dir.with_suffix(".log"), env)
    if rc != 0:
        sys.exit(f"our recipe failed (rc {rc}); see {run_dir.with_suffix('.log')}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [{"collect_s": r["perf/collect_time_s"], "train_s": r["perf/iteration_time_s"] - r["perf/collect_time_s"],
              "reward_mean": r["rollout/reward_mean"], "peak_rss_mb": r.get("perf/peak_rss_mb")} for r in rows]
    return {"steps": steps, "peak_rss_mb": rss, "wall_s": wall}


def trl(args, out: Path, env: dict, gym: bool = False, jemalloc: bool = False) -> dict:
    cmd = [args.trl_python, "bench/trl_grpo.py", "--steps", str(args.steps), "--max-new-tokens",
           str(args.max_new_tokens), "--out", str(out), *(["--gym"] if gym else [])]
    if jemalloc:
        sys.path.insert(0, str(ROOT))
        from gym_plugin.allocator import find_jemalloc

        path = find_jemalloc()
        if path is None:
            sys.exit("--sides trl_jemalloc: libjemalloc is not installed (apt-get install libjemalloc2)")
        env = {**env, "LD_PRELOAD": path}
    rc, wall, rss = run(cmd, out.with_suffix(".log"), env)
    if rc != 0:
        sys.exit(f"TRL failed (rc {rc}); see {out.with_suffix('.log')}")
    data = json.loads(out.read_text())
    return {"steps": data["steps"], "peak_rss_mb": rss, "wall_s": wall, "config": data["trl_config"]}


def summary(runs: list[dict]) -> dict:
    def mean(key: str, skip_first: bool) -> float:
        values = [s[key] for r in runs for s in (r["steps"][1:] if skip_first and len(r["steps"]) > 1 else r["steps"])]
        return statistics.mean(values)

    out = {f"{k}_{w}": mean(k, w == "2..N") for k in ("collect_s", "train_s") for w in ("2..N", "all")}
    out["step_s_2..N"] = out["collect_s_2..N"] + out["train_s_2..N"]
    out["step_s_all"] = out["collect_s_all"] + out["train_s_all"]
    out["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    n = len(runs[0]["steps"])
    out["reward_by_step"] = [statistics.mean(r["steps"][i].get("reward_mean", float("nan")) for r in runs) for i in range(n)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--trl-python", default=sys.executable,
                        help="a python with TRL (default: this one; the 'trl' extra installs it here)")
    parser.add_argument("--out-dir", default="runs/bench_vs_trl")
    parser.add_argument("--sides", default="ours,ours_lowmem,trl",
                        help="comma-separated, run in this order each round: ours (the default recipe: AdamW), "
                             "ours_lowmem (+ " + " ".join(LOW_MEMORY) + "), ours_lowmem_glibc (the same on glibc's malloc), ours_inbwd (+ " + " ".join(IN_BACKWARD)
                             + "), trl, trl_gym (TRL's trainer with "
                             "gym_plugin.trl's rollouts: bench/trl_grpo.py --gym), trl_jemalloc (trl with "
                             "jemalloc preloaded)")
    parser.add_argument("ours_overrides", nargs="*", help="extra Hydra overrides for our recipe")
    args = parser.parse_args()
    out_dir = (ROOT / args.out_dir) if not os.path.isabs(args.out_dir) else Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    order = [s.strip() for s in args.sides.split(",") if s.strip()]
    known = [*SIDE_OVERRIDES, *TRL_SIDES]
    unknown = sorted(set(order) - set(known))
    if unknown:
        sys.exit(f"--sides: unknown {unknown}; known: {', '.join(known)}")
    results: dict[str, list[dict]] = {side: [] for side in order}
    for r in range(args.rounds):
        for side in order:
            stamp = time.strftime("%H%M%S")
            if side in TRL_SIDES:
                res = trl(args, out_dir / f"{side}_r{r}_{stamp}.json", env, gym=side == "trl_gym",
                          jemalloc=side == "trl_jemalloc")
            else:
                res = ours(args, out_dir / f"{side}_r{r}_{stamp}", {**env, **SIDE_ENV.get(side, {})},
                           SIDE_OVERRIDES[side])
            results[side].append(res)
            s = summary([res])
            print(f"round {r + 1} {side:11}: {s['step_s_2..N']:.1f} s/step (collect {s['collect_s_2..N']:.1f} + train "
                  f"{s['train_s_2..N']:.1f}), peak RSS {res['peak_rss_mb']:.0f} MB, rewards "
                  f"{[round(x, 2) for x in s['reward_by_step']]}", flush=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    sides = {k: summary(v) for k, v in results.items() if v}
    print(f"\n{'':11} {'s/step':>8} {'collect':>8} {'train':>8} {'(all steps)':>11} {'peak RSS MB':>12}  reward by step")
    for side, s in sides.items():
        print(f"{side:11} {s['step_s_2..N']:8.1f} {s['collect_s_2..N']:8.1f} {s['train_s_2..N']:8.1f} "
              f"{s['step_s_all']:11.1f} {s['peak_rss_mb']:12.0f}  {[round(x, 2) for x in s['reward_by_step']]}")
    bases = [b for b in ("trl", "trl_jemalloc") if b in sides]
    if bases and len(sides) > 1:
        for base in bases:
            t = sides[base]
            for name, o in sides.items():
                if name in TRL_SIDES:
                    continue
                print(f"{name + '/' + base:11} {o['step_s_2..N'] / t['step_s_2..N']:8.2f} "
                      f"{o['collect_s_2..N'] / t['collect_s_2..N']:8.2f} {o['train_s_2..N'] / t['train_s_2..N']:8.2f} "
                      f"{o['step_s_all'] / t['step_s_all']:11.2f} {o['peak_rss_mb'] / t['peak_rss_mb']:12.2f}")
        t = sides[bases[0]]
        print("(ratios: ours / TRL; targets (issue \"The sampler\"): s/step <= 0.3 and peak RSS <= 0.3, both at 48 and 256 tokens)")
        half = len(t["reward_by_step"]) // 2 or 1
        for side, s in sides.items():
            rw = s["reward_by_step"]
            print(f"{side}: reward first half {statistics.mean(rw[:half]):.3f} -> second half "
                  f"{statistics.mean(rw[half:] or rw):.3f}")
    print(f"results: {out_dir / 'results.json'}")


if __name__ == "__main__":
    main()
