"""Benchmark of one training step (grpo_step) on a recorded rollout batch: padded rows vs prefix packing,
micro-batch sizes, activation checkpointing. Each setting runs in a fresh process (so its peak RSS is its own),
settings alternate over ``--rounds``; per setting: median wall and CPU seconds of a step, tokens the model ran
on, and the process's peak RSS (model + AdamW state + gradients + activations).

    PYTHONPATH=. python bench/step.py --rollouts runs/grpo-.../rollouts/step_000001.jsonl
    PYTHONPATH=. python bench/step.py --rollouts ... --settings none:8 prefix:8 prefix:32 prefix:32:ckpt

A setting is ``packing:micro_batch_size[:ckpt][:lowmem|:inbwd][:head]`` (ckpt: activation checkpointing; lowmem:
Adafactor stepped in backward; inbwd: AdamW stepped in backward, its moments kept but never a whole model's
gradients at once; head: the chunked LM head, 128 positions per chunk). Otherwise the recipe's optimizer: AdamW
(fused), stepped after backward, gradients clipped to norm 1. The rollouts are any recipe run's ``rollouts/step_*.jsonl``
(the default recipe's: SmolLM2, 8 capital prompts x 4 samples). CPU seconds are less sensitive than wall
seconds to other processes on a shared machine (both are printed).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def run_one(args: argparse.Namespace) -> None:
    """Child: load the model, process the rollouts, run ``--steps`` steps of one setting, print a JSON line."""
    import torch

    from gym_plugin.models import load_policy_model
    from gym_plugin.optim import build_optimizer
    from gym_plugin.process import process_rollouts
    from gym_plugin.step import grpo_step

    packing, mbs, *rest = args.child.split(":")
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_policy_model(args.model)
    records = [json.loads(line) for line in open(args.rollouts) if line.strip()]
    batch = process_rollouts(records, tokenizer)
    in_backward = "lowmem" in rest or "inbwd" in rest  # in-backward stepping cannot clip the global norm
    optimizer = build_optimizer(model, "adafactor" if "lowmem" in rest else "adamw", lr=args.lr,
                                in_backward=in_backward)
    extra = {"max_grad_norm": None} if in_backward else {"max_grad_norm": 1.0}
    if "head" in rest:  # the chunked LM head, 128 positions per chunk (memory=low's)
        extra.update(chunked_lm_head=True, logprob_chunk_size=128)
    walls, cpus, metrics = [], [], {}
    for _ in range(args.steps):
        w0, c0 = time.perf_counter(), time.process_time()
        metrics = grpo_step(model, optimizer, batch, micro_batch_size=int(mbs), packing=packing,
                            activation_checkpointing="ckpt" in rest, compute_entropy=False, **extra)
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    print(json.dumps({
        "setting": args.child, "wall_s": walls, "cpu_s": cpus,
        "forward_tokens": metrics["perf/num_forward_tokens"], "trained_tokens": metrics["perf/num_trained_tokens"],
        "rows": len(batch), "padded_tokens": int(batch.attention_mask.numel()),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rollouts", required=True, help="a rollouts/step_*.jsonl of a recipe run")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--settings", nargs="+", default=["none:8", "prefix:8", "prefix:16", "prefix:32"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="steps per process (the first warms up)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_one(args)
        return
    results: dict[str, list[dict]] = {s: [] for s in args.settings}
    for r in range(args.rounds):
        for setting in args.settings:
            cmd = [sys.executable, __file__, "--child", setting, "--rollouts", args.rollouts, "--model", args.model,
                   "--steps", str(args.steps), "--threads", str(args.threads), "--lr", str(args.lr)]
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if out.returncode != 0:
                sys.exit(f"{setting} failed:\n{out.stderr[-3000:]}")
            row = json.loads(out.stdout.strip().splitlines()[-1])
            results[setting].append(row)
            print(f"round {r + 1} {setting}: wall {row['wall_s']} cpu {row['cpu_s']} rss {row['peak_rss_mb']:.0f} MB",
                  flush=True)
    base = None
    print(f"\n{'setting':18} {'wall s':>8} {'cpu s':>8} {'fwd tokens':>10} {'peak RSS MB':>12} {'cpu vs first':>12}")
    for setting, rows in results.items():
        # the last step of each process (the first warms up), median over rounds
        wall = statistics.median(r["wall_s"][-1] for r in rows)
        cpu = statistics.median(r["cpu_s"][-1] for r in rows)
        rss = max(r["peak_rss_mb"] for r in rows)
        base = base or cpu
        print(f"{setting:18} {wall:8.2f} {cpu:8.2f} {rows[0]['forward_tokens']:10.0f} {rss:12.0f} {cpu / base:12.2f}x")
    first = next(iter(results.values()))[0]
    print(f"batch: {first['rows']} rows, {first['trained_tokens']:.0f} trained tokens, {first['padded_tokens']} "
          "padded [B, T] positions")


if __name__ == "__main__":
    main()
