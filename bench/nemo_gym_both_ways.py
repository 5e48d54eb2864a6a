"""Both collectors on both server sets, in one sitting, on the same fake endpoint.

Server sets (started once, both running side by side):
  gym_plugin  `gym-plugin serve` (exact_match + calculator environments), one process
  nemo_gym    NeMo Gym 0.7.0's `ng_run` (string_match + example_single_tool_call, each behind simple_agent and a
              legacy_agent environment server, its vllm_model policy server with token ids): 7 server processes + Ray
Collectors (each in a process of its own, started per measurement):
  gym_plugin  our RolloutCollector (through the environment server in front of each agent)
  nemo_gym    NeMo Gym's RolloutCollectionHelper.run_examples (the dispatch loop of ng_collect_rollouts; file
              writing, aggregate metrics and its health check are left out, for both)
Tasks: single-turn arithmetic (exact_match / string_match: one model call) and a tool task (calculator: 3 model
calls + 2 tool calls; example_single_tool_call: 2 model calls + 1 tool call, or 1 call when the fake skips it).
Endpoint: the scripted task fake (gym_plugin.testing.scripted_tasks), one process, instant answers.

Per (server set, task, collector): rollouts/s (rows / wall time of the timed collection), and CPU ms per rollout of
the collector process, of the server set's processes (Ray's included) and of the fake, sampled around the timed
collection (after a warm-up). Needs NeMo Gym 0.7.0's venv ($GYM_PLUGIN_NEMO_GYM_VENV, default .ci-nemo-gym).

  python bench/nemo_gym_both_ways.py --single 1000 --tool 400 --concurrency 256
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gym_plugin.servers.resources.calculator import calculator_row  # noqa: E402
from gym_plugin.testing import nemo_gym_peer as peer  # noqa: E402
from gym_plugin.testing.scripted_tasks import add_row, weather_row  # noqa: E402

DRIVER = ROOT / "bench" / "nemo_gym_collect_driver.py"
AGENTS = {  # server set -> task -> (agent, row maker)
    "gym_plugin": {"single": lambda i: add_row(i, (i * i + 3) % 17, "exact_match_agent"),
                   "tool": lambda i: calculator_row(i % 9 + 2, i % 7 + 3, i)},
    "nemo_gym": {"single": lambda i: add_row(i, (i * i + 3) % 17, "string_match_simple_agent", extraction_mode="boxed"),
                 "tool": lambda i: weather_row(i, "example_single_tool_call_simple_agent")},
}


def tree_cpu(root: psutil.Process) -> float:
    """User + system CPU seconds of a process and every descendant alive now."""
    total = 0.0
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def measure(which: str, port: int, rows_path: Path, concurrency: int, warmup: int, venv: Path,
            servers: psutil.Process, fake: psutil.Process) -> dict:
    python = sys.executable if which == "gym_plugin" else str(venv / "bin" / "python")
    env = peer.ours_env() if which == "gym_plugin" else peer.ng_env(venv)
    proc = subprocess.Popen([python, str(DRIVER), which, str(port), str(rows_path), str(concurrency), str(warmup)],
                            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    try:
        line = proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"{which} driver did not get ready: {line!r}")
        time.sleep(0.5)  # let the warm-up's stragglers finish before sampling
        s0, f0 = tree_cpu(servers), tree_cpu(fake)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        result = json.loads(proc.stdout.readline())
        s1, f1 = tree_cpu(servers), tree_cpu(fake)
    finally:
        proc.stdin.close()
        proc.wait(60)
    n = result["rows"]
    return {"collector": which, "rows": n, "failures": result["failures"], "reward_mean": result["reward_sum"] / n,
            "rollouts_per_s": n / result["wall_s"], "cpu_ms_collector": 1000 * result["cpu_s"] / n,
            "cpu_ms_servers": 1000 * (s1 - s0) / n, "cpu_ms_fake": 1000 * (f1 - f0) / n,
            "cpu_ms_total_without_fake": 1000 * (result["cpu_s"] + s1 - s0) / n}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--single", type=int, default=1000, help="single-turn rows per measurement")
    p.add_argument("--tool", type=int, default=400, help="tool-task rows per measurement")
    p.add_argument("--concurrency", type=int, default=256, help="rows in flight, both collectors")
    p.add_argument("--warmup", type=int, default=50)
    args = p.parse_args()
    venv = peer.nemo_gym_venv()
    missing = peer.nemo_gym_missing(venv)
    if missing:
        print(f"error: {missing}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="nemo_gym_both_ways_"))
    procs = []
    results = []
    try:
        fake, endpoint = peer.start_fake(work)
        procs.append(fake)
        ours, our_port = peer.start_gym_plugin(work, endpoint, [str(ROOT / "conf/gym/exact_match.yaml"),
                                                                str(ROOT / "conf/gym/calculator.yaml")])
        procs.append(ours)
        t0 = time.perf_counter()
        theirs, ng_port = peer.start_ng_run(work, venv, endpoint)
        procs.append(theirs)
        print(f"servers up (ng_run took {time.perf_counter() - t0:.0f} s); logs in {work}", flush=True)
        sets = {"gym_plugin": (our_port, psutil.Process(ours.pid)), "nemo_gym": (ng_port, psutil.Process(theirs.pid))}
        for server_set, (port, tree) in sets.items():
            for task, n in (("single", args.single), ("tool", args.tool)):
                rows_path = work / f"{server_set}_{task}.jsonl"
                rows_path.write_text("".join(json.dumps(AGENTS[server_set][task](i)) + "\n" for i in range(n)))
                for collector in ("gym_plugin", "nemo_gym"):
                    r = measure(collector, port, rows_path, args.concurrency, args.warmup, venv, tree,
                                psutil.Process(fake.pid))
                    r.update(server_set=server_set, task=task)
                    results.append(r)
                    print(f"servers {server_set:>10} {task:>6} | collector {collector:>10}: {r['rows']} rollouts "
                          f"({r['failures']} failed, reward mean {r['reward_mean']:.3f}) {r['rollouts_per_s']:7.1f} "
                          f"rollouts/s | CPU ms/rollout: collector {r['cpu_ms_collector']:5.2f}, servers "
                          f"{r['cpu_ms_servers']:6.2f}, fake {r['cpu_ms_fake']:5.2f}; without the fake "
                          f"{r['cpu_ms_total_without_fake']:6.2f}", flush=True)
    finally:
        for proc in reversed(procs):
            peer.stop(proc, 60)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
