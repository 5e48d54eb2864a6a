"""Benchmark: process_rollouts on 1,024 rollouts x ~2,048 tokens, 3 model calls each.

Run: ``PYTHONPATH=. python bench/process_rollouts.py [--rollouts 1024] [--tokens 2048] [--repeats 5]``

Three timings on the same rollouts, in the same run (best of ``--repeats``):
- floor: convert just each rollout's final token ids (last prompt + last generation) and all its log-probs
  from Python lists to numpy arrays (``np.fromiter``), nothing else. No correct implementation can beat
  reading its input once; the issue's target is within 2x of this.
- process_rollouts: the real thing (prefix checks, masks, padding, advantages, tensors).
- baseline: what one writes first: per sample, walk the turns token by token appending ids / mask /
  log-probs to lists, then ``torch.tensor`` each row, pad and ``torch.stack``. The target is >= 10x faster.
The rollouts go through ``json.dumps``/``json.loads`` first, like records that crossed HTTP (every int a
separate Python object, as in production).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import numpy as np
import torch

from gym_plugin.process import process_rollouts


def make_rollouts(num: int, tokens: int, seed: int = 0) -> list[dict]:
    """``num`` 3-call tool rollouts of about ``tokens`` tokens: prompt, gen, tool output, gen, tool output, gen."""
    rng = np.random.default_rng(seed)
    rollouts = []
    for i in range(num):
        sizes = (np.array([0.2, 0.15, 0.075, 0.15, 0.075, 0.35]) * tokens * rng.uniform(0.9, 1.1)).astype(int)
        p0, g0, t1, g1, t2, g2 = (rng.integers(3, 150_000, size=n).tolist() for n in sizes)
        l0, l1, l2 = (rng.uniform(-5, 0, size=len(g)).tolist() for g in (g0, g1, g2))
        prompt1 = p0 + g0 + t1
        prompt2 = prompt1 + g1 + t2
        output = [
            {"type": "function_call", "name": "calc", "arguments": "{}", "call_id": "a",
             "prompt_token_ids": p0, "generation_token_ids": g0, "generation_log_probs": l0},
            {"type": "function_call_output", "call_id": "a", "output": "4"},
            {"type": "function_call", "name": "calc", "arguments": "{}", "call_id": "b",
             "prompt_token_ids": prompt1, "generation_token_ids": g1, "generation_log_probs": l1},
            {"type": "function_call_output", "call_id": "b", "output": "5"},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "9"}],
             "prompt_token_ids": prompt2, "generation_token_ids": g2, "generation_log_probs": l2},
        ]
        rollouts.append({"response": {"output": output}, "reward": float(rng.integers(0, 2)),
                         "_ng_task_index": i // 8, "_ng_rollout_index": i % 8})
    return json.loads(json.dumps(rollouts))


def token_items(rollout: dict) -> list[dict]:
    return [item for item in rollout["response"]["output"] if "generation_token_ids" in item]


def floor(rollouts: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Only read the final ids and every log-prob into arrays."""
    finals = [token_items(r)[-1] for r in rollouts]
    n_ids = sum(len(f["prompt_token_ids"]) + len(f["generation_token_ids"]) for f in finals)
    ids = np.fromiter(
        itertools.chain.from_iterable(
            itertools.chain(f["prompt_token_ids"], f["generation_token_ids"]) for f in finals
        ),
        dtype=np.int64, count=n_ids,
    )
    lps = np.fromiter(
        itertools.chain.from_iterable(
            item["generation_log_probs"] for r in rollouts for item in token_items(r)
        ),
        dtype=np.float32,
    )
    return ids, lps


def baseline(rollouts: list[dict], pad_id: int = 0) -> tuple[torch.Tensor, ...]:
    """Per-sample, per-token lists, then pad and stack (right padding, no drift handling beyond a check)."""
    rows = []
    for r in rollouts:
        ids, mask, lps = [], [], []
        for item in token_items(r):
            prompt = item["prompt_token_ids"]
            if prompt[: len(ids)] != ids:
                raise ValueError("drift")
            for tok in prompt[len(ids):]:
                ids.append(tok)
                mask.append(0)
                lps.append(0.0)
            for tok, lp in zip(item["generation_token_ids"], item["generation_log_probs"]):
                ids.append(tok)
                mask.append(1)
                lps.append(lp)
        rows.append((torch.tensor(ids), torch.tensor(mask, dtype=torch.float32), torch.tensor(lps)))
    width = max(len(row[0]) for row in rows)
    pad = lambda t, v: torch.nn.functional.pad(t, (0, width - len(t)), value=v)  # noqa: E731
    input_ids = torch.stack([pad(row[0], pad_id) for row in rows])
    attention = torch.stack([pad(torch.ones_like(row[0]), 0) for row in rows])
    loss_mask = torch.stack([pad(row[1], 0.0) for row in rows])
    logprobs = torch.stack([pad(row[2], 0.0) for row in rows])
    return input_ids, attention, loss_mask, logprobs


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rollouts", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    rollouts = make_rollouts(args.rollouts, args.tokens)
    batch = process_rollouts(rollouts, pad_token_id=0)
    ids, mask, lps = baseline(rollouts)[0], baseline(rollouts)[2], baseline(rollouts)[3]
    # The two implementations must agree before their times mean anything.
    assert torch.equal(batch.input_ids[:, : ids.shape[1]], ids) and torch.equal(batch.loss_mask[:, : ids.shape[1]], mask)
    assert torch.equal(batch.rollout_logprobs[:, : ids.shape[1]], lps)
    f_ids, f_lps = floor(rollouts)
    values = f_ids.size + f_lps.size

    t_floor = best_of(lambda: floor(rollouts), args.repeats)
    t_process = best_of(lambda: process_rollouts(rollouts, pad_token_id=0), args.repeats)
    t_base = best_of(lambda: baseline(rollouts), max(1, args.repeats // 2))
    print(f"{args.rollouts} rollouts, 3 calls each, {batch.metrics['rollout/seq_len_mean']:.0f} tokens mean, "
          f"T={batch.input_ids.shape[1]}; {values / 1e6:.2f} M values (final ids + log-probs)")
    print(f"floor (np.fromiter):   {t_floor * 1e3:8.1f} ms  ({values / t_floor / 1e6:.1f} M values/s)")
    print(f"process_rollouts:      {t_process * 1e3:8.1f} ms  ({t_process / t_floor:.2f}x floor; target <= 2x)")
    print(f"per-sample baseline:   {t_base * 1e3:8.1f} ms  ({t_base / t_process:.1f}x slower than process_rollouts; "
          "target >= 10x)")


if __name__ == "__main__":
    main()
