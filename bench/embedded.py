"""Benchmark of the embedded policy: tokens/s with dynamic batching vs one-at-a-time, and log-prob fidelity.

    PYTHONPATH=. python bench/embedded.py                 # SmolLM2-135M-Instruct (converted on first use)
    PYTHONPATH=. python bench/embedded.py --model tiny    # the tiny test model, seconds

Two servers share one model over HTTP on 127.0.0.1: the batched one (``max_batch_size`` 32, 5 ms gathering)
and a one-at-a-time one (``max_batch_size`` 1: every request generated alone, as a naive server would).
Each row also reports how many batches the batched server ran at that concurrency and the mean rows per
batch (c clients firing together should fill batches of c rows).
At each concurrency c (1, 8, 32), c clients each send ``--rounds`` requests back to back; tokens/s =
generated tokens / wall time. The one-at-a-time server's throughput does not depend on concurrency (its
queue serializes everything), so it is measured once and every row is compared against it.
Requests sample at temperature 1.0 with ``ignore_eos`` so every one generates exactly ``--max-tokens``.

Then the log-probs the batched server returned at the highest concurrency (left-padded rows of different
prompt lengths) are compared with a teacher-forced forward pass over prompt + generation: the max absolute
difference is the fidelity figure (fp32 expected < 1e-4).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

import aiohttp
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gym_plugin.models import load_policy_model  # noqa: E402
from gym_plugin.servers.embedded import EmbeddedPolicyServer  # noqa: E402

COUNTRIES = ["France", "Japan", "Italy", "Brazil", "Canada", "Kenya", "Egypt", "Norway", "Peru", "India",
             "Germany", "Spain", "Chile", "Ghana", "Vietnam", "Poland"]


def request_body(i: int, max_tokens: int, ignore_eos: bool) -> dict:
    # Prompt lengths vary (country names, an optional sentence) so batches really are left-padded.
    extra = " Think about it first." if i % 3 == 0 else ""
    return {
        "messages": [{"role": "user", "content": f"What is the capital of {COUNTRIES[i % len(COUNTRIES)]}?{extra} "
                                                 "Reply with only the city name."}],
        "max_tokens": max_tokens, "temperature": 1.0, "seed": 1000 + i, "ignore_eos": ignore_eos,
        "logprobs": True, "top_logprobs": 0, "return_token_ids": True,
    }


async def load(server: EmbeddedPolicyServer, concurrency: int, rounds: int, max_tokens: int, ignore_eos: bool):
    """c clients x ``rounds`` sequential requests each; returns (tokens/s, seconds, payloads)."""
    payloads: list[dict] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as session:

        async def client(k: int):
            for r in range(rounds):
                body = request_body(k * rounds + r, max_tokens, ignore_eos)
                async with session.post(server.base_url + "/chat/completions", json=body) as resp:
                    payload = await resp.json()
                    if resp.status != 200:
                        raise RuntimeError(f"benchmark request failed: {payload}")
                    payloads.append(payload)

        start = time.perf_counter()
        await asyncio.gather(*[client(k) for k in range(concurrency)])
        elapsed = time.perf_counter() - start
    tokens = sum(p["usage"]["completion_tokens"] for p in payloads)
    return tokens / elapsed, elapsed, payloads


def teacher_forced_max_diff(model, payloads: list[dict]) -> float:
    worst = 0.0
    for p in payloads:
        c = p["choices"][0]
        ids = torch.tensor([p["prompt_token_ids"] + c["token_ids"]])  # [1, P + G]
        with torch.inference_mode():
            logits = model(input_ids=ids).logits[0].float()  # [P + G, V]
        lp = torch.log_softmax(logits, -1)[len(p["prompt_token_ids"]) - 1 : -1]  # [G, V]
        tf = lp.gather(-1, torch.tensor(c["token_ids"])[:, None])[:, 0]  # [G]
        served = torch.tensor([e["logprob"] for e in c["logprobs"]["content"]])
        worst = max(worst, (tf - served).abs().max().item())
    return worst


async def main_async(args) -> dict:
    t0 = time.perf_counter()
    model, tok = load_policy_model(args.model, args.dtype)
    load_s = time.perf_counter() - t0
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    batched = EmbeddedPolicyServer(model=model, tokenizer=tok, served_model_name="bench",
                                   max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms,
                                   batch_max_wait_ms=args.batch_max_wait_ms,
                                   num_threads=args.num_threads)
    serial = EmbeddedPolicyServer(model=model, tokenizer=tok, served_model_name="bench", max_batch_size=1,
                                  batch_wait_ms=0.0, num_threads=args.num_threads)
    await batched.start()
    await serial.start()
    try:
        await load(batched, 1, 1, 4, True)  # warm-up (first-call allocations)
        await load(serial, 1, 1, 4, True)
        print(f"model {args.model} ({args.dtype}, loaded in {load_s:.1f} s), {args.max_tokens} tokens/request, "
              f"torch threads {torch.get_num_threads()}", flush=True)
        serial_tps, serial_s, _ = await load(serial, args.serial_requests, 1, args.max_tokens, not args.stop_at_eos)
        print(f"one-at-a-time: {args.serial_requests} requests in {serial_s:.1f} s = {serial_tps:.1f} tokens/s",
              flush=True)
        rows = []
        last_payloads: list[dict] = []
        for c in args.concurrency:
            stats = batched.engine.stats
            batches0, rows0 = stats.batches, stats.rows
            tps, secs, payloads = await load(batched, c, args.rounds, args.max_tokens, not args.stop_at_eos)
            n_batches = stats.batches - batches0
            rows_per_batch = (stats.rows - rows0) / max(n_batches, 1)
            last_payloads = payloads
            rows.append({"concurrency": c, "requests": c * args.rounds, "seconds": round(secs, 2),
                         "tokens_per_s": round(tps, 1), "one_at_a_time_tokens_per_s": round(serial_tps, 1),
                         "speedup": round(tps / serial_tps, 2), "batches": n_batches,
                         "rows_per_batch": round(rows_per_batch, 1)})
            print(f"concurrency {c:>3}: {c * args.rounds:>3} requests in {secs:6.1f} s = {tps:7.1f} tokens/s "
                  f"({tps / serial_tps:.2f}x one-at-a-time; {n_batches} batches, {rows_per_batch:.1f} rows each)",
                  flush=True)
        diff = teacher_forced_max_diff(model, last_payloads)
        print(f"max |served log-prob - teacher-forced log-prob| over {len(last_payloads)} batched answers: "
              f"{diff:.2e}", flush=True)
        return {"model": args.model, "dtype": args.dtype, "max_tokens": args.max_tokens,
                "torch_threads": torch.get_num_threads(), "perf/one_at_a_time_tokens_per_s": round(serial_tps, 1),
                "rows": rows, "logprob_max_abs_diff": diff, "batches": batched.engine.stats.batches,
                "max_rows_in_batch": batched.engine.stats.max_rows_in_batch}
    finally:
        await batched.stop()
        await serial.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="smollm2 | tiny | path to an HF folder")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=2, help="sequential requests per client")
    parser.add_argument("--serial-requests", type=int, default=8, help="requests for the one-at-a-time figure")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--batch-max-wait-ms", type=float, default=100.0)
    parser.add_argument("--num-threads", type=int, default=None)
    parser.add_argument("--stop-at-eos", action="store_true", help="let answers end at eos (fewer tokens)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    result = asyncio.run(main_async(args))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
