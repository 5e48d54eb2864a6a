"""Rollout collection throughput for the whole path: collector -> agent -> resource server (seed, verify)
-> policy model server -> fake OpenAI endpoint, single-turn exact-match rows.

Modes (all by default):
  direct          everything in this process on one loop: components call each other directly
  http            servers in a child process (`gym-plugin serve`), collector here over HTTP
  http_per_server one process per server (`gym-plugin serve --process-per-server`): every hop over HTTP

Reports rollouts/s and CPU ms per rollout (CPU of every process involved, divided by rollouts).

  python bench/collect.py --rows 2000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gym_plugin.collect import CollectorConfig, RolloutCollector  # noqa: E402
from gym_plugin.config import load_config  # noqa: E402
from gym_plugin.http import Transport  # noqa: E402
from gym_plugin.launch import directory_from_config, fetch_head_config, start_servers  # noqa: E402
from gym_plugin.net import free_port  # noqa: E402

CONFIG = str(ROOT / "conf/gym/exact_match.yaml")
OVERRIDES = ["+policy_endpoint.impl=fake_openai", "policy_base_url=local"]


def rows(n: int) -> list[dict]:
    # The fake endpoint answers "OK" by default, so every row scores 1.0.
    return [
        {
            "responses_create_params": {"input": [{"role": "user", "content": f"Say OK. ({i})"}]},
            "expected_answer": "OK",
            "agent_ref": {"name": "exact_match_agent"},
        }
        for i in range(n)
    ]


async def _collect(agent_urls: dict, data: list[dict], concurrency: int, local: bool) -> tuple[int, float, float]:
    cfg = CollectorConfig(concurrency=concurrency)
    transport = Transport(limit=0, allow_local=local, timeout_s=cfg.timeout_s)
    async with RolloutCollector(agent_urls, cfg, transport) as collector:
        t0 = time.perf_counter()
        ok = 0
        async for rec in collector.collect(data):
            ok += rec.get("reward") == 1.0
        return ok, time.perf_counter() - t0, 0.0


async def bench_direct(n: int, concurrency: int) -> dict:
    cfg = load_config(CONFIG, OVERRIDES)
    running = await start_servers(cfg, start_head=False)
    try:
        data = rows(n)
        await _collect(running.agent_urls(), rows(200), concurrency, True)  # warm-up
        cpu0 = time.process_time()
        ok, wall, _ = await _collect(running.agent_urls(), data, concurrency, True)
        cpu = time.process_time() - cpu0
    finally:
        await running.stop()
    return {"mode": "direct", "rows": n, "reward_1": ok, "wall_s": wall, "cpu_s": cpu}


async def bench_http(n: int, concurrency: int, per_server: bool) -> dict:
    port = free_port()
    cmd = [sys.executable, "-m", "gym_plugin.cli", "serve", "--config", CONFIG, *OVERRIDES, f"head_server.port={port}"]
    if per_server:
        cmd.append("--process-per-server")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
    try:
        seen_head = False  # with --process-per-server every child prints "ready"; the head starts last
        for line in proc.stdout:
            seen_head = seen_head or "head_server" in line
            if seen_head and line.strip() == "ready":
                break
        else:
            raise RuntimeError(f"servers did not start: {' '.join(cmd)}")
        transport = Transport()
        try:
            cfg = await fetch_head_config(f"http://127.0.0.1:{port}", transport)
        finally:
            await transport.close()
        directory, agents = directory_from_config(cfg)
        agent_urls = {a: directory.url(a) for a in agents}
        await _collect(agent_urls, rows(200), concurrency, False)  # warm-up
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]

        def cpu_now() -> float:
            return time.process_time() + sum(sum(p.cpu_times()[:2]) for p in tree)

        cpu0 = cpu_now()
        ok, wall, _ = await _collect(agent_urls, rows(n), concurrency, False)
        cpu = cpu_now() - cpu0
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    return {"mode": "http_per_server" if per_server else "http", "rows": n, "reward_1": ok, "wall_s": wall,
            "cpu_s": cpu}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--modes", default="direct,http,http_per_server")
    args = p.parse_args()
    results = []
    for mode in args.modes.split(","):
        if mode == "direct":
            r = asyncio.run(bench_direct(args.rows, args.concurrency))
        else:
            r = asyncio.run(bench_http(args.rows, args.concurrency, per_server=mode == "http_per_server"))
        r["rollouts_per_s"] = r["rows"] / r["wall_s"]
        r["cpu_ms_per_rollout"] = 1000 * r["cpu_s"] / r["rows"]
        results.append(r)
        print(
            f"{r['mode']:>16}: {r['rows']} rollouts ({r['reward_1']} reward 1.0) in {r['wall_s']:.2f}s = "
            f"{r['rollouts_per_s']:.0f} rollouts/s, {r['cpu_ms_per_rollout']:.2f} CPU ms/rollout",
            flush=True,
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
