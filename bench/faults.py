"""The long fault run: 20,000 rows with faults injected at set rates, the policy endpoint killed mid-run.

Three processes, all on 127.0.0.1:
  client   (this process)  RolloutCollector over a lazy generator of rows; keeps only counters and the set of
                           indices seen, so its peak RSS is what a trainer's collector costs;
  servers  (a child)       agent proxy -> agent -> resource server (exact_match that raises on marked rows)
                           -> policy model server -> backend proxy; the two proxies inject faults per request
                           (tests/integration/test_faults.py: FaultProxy);
  backend  (a child)       the scripted fake OpenAI endpoint, SIGKILLed when --kill-at of the rows are done and
                           restarted on the same port --down-s later.

Faults per request at the backend proxy (policy model server side) and at the agent proxy (collector side):
5xx (503), reset (TCP RST), close (FIN, no reply), slow (past the caller's timeout), garbage (200, not JSON);
plus a verifier that raises on 0.5% of rows. Rows expect the fake's "OK" (reward 1.0) except every 10th
(expects "NO": a real reward of 0.0), so an invented reward shows.

Prints rows in, results, failure records by kind, duplicates, missing, invented rewards, wall time,
rollouts/s and the client's peak RSS; exits non-zero unless rows in == results + failure records with no
duplicate, no missing row and no invented reward.

  flock /tmp/bench.lock python bench/faults.py --rows 20000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import resource
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gym_plugin.collect import CollectorConfig, RolloutCollector  # noqa: E402
from gym_plugin.http import Transport  # noqa: E402
from gym_plugin.protocol import is_failure  # noqa: E402
from tests.integration.test_faults import BackendProcess, fault_row, start_stack  # noqa: E402

BACKEND_RATES = {"5xx": 0.02, "reset": 0.01, "close": 0.005, "slow": 0.002, "garbage": 0.002}
"""Fraction of requests to the backend that get each fault (policy model server side)."""
AGENT_RATES = {"5xx": 0.01, "reset": 0.005, "close": 0.005, "slow": 0.0005, "garbage": 0.001}
"""Fraction of requests to the agent that get each fault (collector side)."""
VERIFIER_RAISE_EVERY = 200
"""Row i's verifier raises when i % 200 == 7 (0.5% of rows)."""

POLICY_TIMEOUT_S, BACKEND_SLOW_S = 1.0, 2.0  # a slow backend reply misses the policy server's timeout
COLLECTOR_TIMEOUT_S, AGENT_SLOW_S = 6.0, 8.0  # a slow agent reply misses the collector's timeout


def rate_chooser(rates: dict[str, float], seed: int):
    """Each request draws once: fault f with probability rates[f], else none (deterministic per seed)."""
    rng = random.Random(seed)

    def choose(_n: int, _raw: bytes) -> str | None:
        x = rng.random()
        for fault, p in rates.items():
            if x < p:
                return fault
            x -= p
        return None

    return choose


def bench_row(i: int) -> dict:
    return fault_row(i, expected="NO" if i % 10 == 3 else "OK",
                     verifier="raise" if i % VERIFIER_RAISE_EVERY == 7 else None)


# ---- the servers child ----------------------------------------------------------------------------------------
async def serve(backend_url: str, seed: int) -> None:
    stack = await start_stack(
        backend_url,
        backend_choose=rate_chooser(BACKEND_RATES, seed),
        agent_choose=rate_chooser(AGENT_RATES, seed + 1),
        slow_s=BACKEND_SLOW_S,
        agent_slow_s=AGENT_SLOW_S,
        policy_timeout_s=POLICY_TIMEOUT_S,
        policy_attempts=2,
        policy_backoff_s=0.05,
        direct=True,  # agent, verifier and policy server in one process call each other directly
    )
    print("ready", stack.agent_url, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    faults = {"backend_proxy": {"requests": stack.backend_proxy.requests, **stack.backend_proxy.faults},
              "agent_proxy": {"requests": stack.agent_proxy.requests, **stack.agent_proxy.faults},
              "servers_rss_mb": psutil.Process().memory_info().rss / 2**20}
    print("faults", json.dumps(faults), flush=True)
    await stack.stop()


# ---- the client -----------------------------------------------------------------------------------------------
def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


async def run(args: argparse.Namespace) -> dict:
    backend = BackendProcess()
    await backend.start()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    servers = await asyncio.create_subprocess_exec(
        sys.executable, str(Path(__file__).resolve()), "--serve", backend.base_url, "--seed", str(args.seed),
        stdout=asyncio.subprocess.PIPE, env=env,
    )
    try:
        line = (await asyncio.wait_for(servers.stdout.readline(), 60)).decode().split()
        if not line or line[0] != "ready":
            raise RuntimeError(f"servers did not start: {line}")
        agent_url = line[1]

        n = args.rows
        pulled = 0

        def rows():
            nonlocal pulled
            for i in range(n):
                pulled += 1
                yield bench_row(i)

        seen = bytearray(n)  # times each index came back
        kinds: Counter[str] = Counter()
        kinds_on_verifier_rows: Counter[str] = Counter()  # failures of the rows whose verifier raises
        samples: dict[str, list[str]] = {}  # the first two last_errors of each kind, for the report
        results = zero_rewards = invented = verifier_as_result = max_ahead = 0
        malformed_failures = 0
        restart_task = None
        kill_at = int(n * args.kill_at)
        peak_sampled = rss_mb()
        rss_start = peak_sampled

        async def kill_and_restart() -> None:
            await backend.kill()
            await asyncio.sleep(args.down_s)
            await backend.start()

        config = CollectorConfig(concurrency=args.concurrency, timeout_s=COLLECTOR_TIMEOUT_S, max_attempts=3)
        t0 = time.perf_counter()
        done = 0
        async with RolloutCollector({"agent": agent_url}, config, Transport(limit=0, allow_local=False)) as c:
            async for rec in c.collect(rows()):
                done += 1
                i = rec["_ng_task_index"]
                seen[i] = min(seen[i] + 1, 255)
                max_ahead = max(max_ahead, pulled - done)
                if is_failure(rec):
                    f = rec["failure"]
                    kinds[f["kind"]] += 1
                    if rec.get("verifier") == "raise":
                        kinds_on_verifier_rows[f["kind"]] += 1
                    if len(samples.setdefault(f["kind"], [])) < 2:
                        samples[f["kind"]].append(f"attempts={f['attempts']}: {f['last_error'][:400]}")
                    if rec["reward"] is not None or not (f["reason"] and f["last_error"] and f["attempts"] >= 1):
                        malformed_failures += 1
                else:
                    results += 1
                    expected = 1.0 if rec["expected_answer"] == "OK" else 0.0
                    invented += rec["reward"] != expected
                    zero_rewards += rec["reward"] == 0.0
                    verifier_as_result += rec.get("verifier") == "raise"  # must have been a failure
                if done == kill_at and restart_task is None:
                    restart_task = asyncio.ensure_future(kill_and_restart())
                if done % 1000 == 0:
                    peak_sampled = max(peak_sampled, rss_mb())
                    if not args.quiet:
                        print(f"  {done}/{n} records, {time.perf_counter() - t0:.1f}s, failures {dict(kinds)}, "
                              f"rss {rss_mb():.0f} MB", flush=True)
        wall = time.perf_counter() - t0
        if restart_task is not None:
            await restart_task
    finally:
        if servers.returncode is None:
            servers.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(servers.communicate(), 30)
        await backend.kill()
    faults = {}
    for text in out.decode().splitlines():
        if text.startswith("faults "):
            faults = json.loads(text[len("faults "):])
    failures = sum(kinds.values())
    return {
        "rows_in": n,
        "results": results,
        "failure_records": failures,
        "failures_by_kind": dict(sorted(kinds.items())),
        "verifier_rows": sum(1 for i in range(n) if i % VERIFIER_RAISE_EVERY == 7),
        "failures_on_verifier_rows_by_kind": dict(sorted(kinds_on_verifier_rows.items())),
        "duplicates": sum(1 for s in seen if s > 1),
        "missing": sum(1 for s in seen if s == 0),
        "invented_rewards": invented,
        "verifier_errors_scored": verifier_as_result,
        "malformed_failure_records": malformed_failures,
        "real_zero_rewards": zero_rewards,
        "backend_starts": backend.starts,
        "max_rows_pulled_ahead": max_ahead,
        "concurrency": args.concurrency,
        "wall_s": round(wall, 2),
        "rollouts_per_s": round(n / wall, 1),
        "client_rss_start_mb": round(rss_start, 1),
        "client_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "client_peak_rss_sampled_mb": round(peak_sampled, 1),
        "faults_injected": faults,
        "sample_errors": samples,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=20_000)
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--kill-at", type=float, default=0.4, help="kill the backend when this fraction is done")
    p.add_argument("--down-s", type=float, default=1.0, help="seconds the backend stays down before restarting")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--verbose", action="store_true", help="show the retry warnings and server errors")
    p.add_argument("--serve", default=None, metavar="BACKEND_URL", help=argparse.SUPPRESS)
    args = p.parse_args()
    # Thousands of injected faults: the retry warnings and server tracebacks they cause are expected here.
    logging.getLogger("gym_plugin").setLevel(logging.INFO if args.verbose else logging.CRITICAL)
    if args.serve:
        asyncio.run(serve(args.serve, args.seed))
        return 0
    r = asyncio.run(run(args))
    print(
        f"rows in {r['rows_in']} = results {r['results']} + failure records {r['failure_records']} "
        f"{r['failures_by_kind']}; duplicates {r['duplicates']}, missing {r['missing']}, invented rewards "
        f"{r['invented_rewards']}, verifier errors scored {r['verifier_errors_scored']}\n"
        f"rows whose verifier raises: {r['verifier_rows']}, their failure records by kind (the kind is the last "
        f"attempt's): {r['failures_on_verifier_rows_by_kind']}\n"
        f"wall {r['wall_s']}s, {r['rollouts_per_s']} rollouts/s, client peak RSS {r['client_peak_rss_mb']} MB "
        f"(start {r['client_rss_start_mb']} MB), max rows pulled ahead {r['max_rows_pulled_ahead']} "
        f"(concurrency {r['concurrency']})\nfaults injected: {r['faults_injected']}",
        flush=True,
    )
    for kind, errors in r["sample_errors"].items():
        for e in errors:
            print(f"  {kind}: {e}")
    print(json.dumps(r))
    ok = (r["rows_in"] == r["results"] + r["failure_records"] and r["duplicates"] == 0 and r["missing"] == 0
          and r["invented_rewards"] == 0 and r["verifier_errors_scored"] == 0
          and r["malformed_failure_records"] == 0)
    if not ok:
        print("FAILED: a row was lost, duplicated, or got a reward it did not earn", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
