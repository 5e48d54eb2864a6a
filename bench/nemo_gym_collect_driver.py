"""One timed collection for bench/nemo_gym_both_ways.py; runs under our venv (``gym_plugin``) or NeMo Gym 0.7.0's
(``nemo_gym``: its ``RolloutCollectionHelper.run_examples``, the loop ``ng_collect_rollouts`` drives).

    python bench/nemo_gym_collect_driver.py {gym_plugin|nemo_gym} HEAD_PORT ROWS.jsonl CONCURRENCY WARMUP

Warms up on the first WARMUP rows, prints ``ready``, waits for a line on stdin (the caller samples the servers'
CPU then), collects every row with at most CONCURRENCY in flight, and prints one JSON line:
``{"rows", "wall_s", "cpu_s" (this process), "reward_sum", "failures"}``.
"""

import asyncio
import json
import sys
import time
from pathlib import Path


async def _gym_plugin(port: int, rows: list, concurrency: int) -> list:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from gym_plugin.collect import CollectorConfig, RolloutCollector
    from gym_plugin.http import Transport
    from gym_plugin.launch import agent_routes, fetch_head_config

    transport = Transport()
    try:
        config = await fetch_head_config(f"http://127.0.0.1:{port}", transport)
    finally:
        await transport.close()
    async with RolloutCollector(agent_routes(config), CollectorConfig(concurrency=concurrency)) as collector:
        return [r async for r in collector.collect(rows)]


async def _nemo_gym(port: int, rows: list, concurrency: int) -> list:
    from nemo_gym.rollout_collection import RolloutCollectionHelper
    from nemo_gym.server_utils import BaseServerConfig

    helper = RolloutCollectionHelper()
    semaphore = asyncio.Semaphore(concurrency)
    futures = helper.run_examples([dict(r) for r in rows], head_server_config=BaseServerConfig(host="127.0.0.1", port=port),
                                  semaphore=semaphore)
    return [(await f)[1] for f in futures]


async def main(which: str, port: int, rows_path: str, concurrency: int, warmup: int) -> None:
    rows = [json.loads(line) for line in open(rows_path) if line.strip()]
    run = _gym_plugin if which == "gym_plugin" else _nemo_gym
    await run(port, rows[:warmup], concurrency)
    print("ready", flush=True)
    sys.stdin.readline()
    cpu0, t0 = time.process_time(), time.perf_counter()
    results = await run(port, rows, concurrency)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    rewards = [r.get("reward") for r in results]
    print(json.dumps({"rows": len(results), "wall_s": wall, "cpu_s": cpu,
                      "reward_sum": sum(x for x in rewards if isinstance(x, (int, float))),
                      "failures": sum(1 for x in rewards if not isinstance(x, (int, float)))}), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])))
