"""No rank left behind, through the real recipe under torchrun (2 CPU ranks, gloo, the tiny model):

- a rank whose rollouts all fail (its prompt asks for max_output_tokens=0, which the policy rejects) makes
  process_rollouts raise on that rank only; the job must stop with one RankFailedError naming the rank and its
  error, within seconds, and no collective error (before: the other ranks went on into the step's collectives
  and died in gloo);
- a rank whose rows are all truncated by process.max_seq_len has no trained token; both ranks must finish
  every step with identical parameters;
- distributed.strategy=fsdp: the sharded weights are gathered after each step into rank 0's whole copy, which
  the embedded policy serves and the checkpoint saves.

With prompts_per_step=2 and seed 0, step 1's prompt order is [row 0, row 1] (gym_plugin.tasks.prompt_batches),
so rank 0 gets row 0 and rank 1 gets row 1: row 1 is the one made to fail or to be truncated.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gym_plugin.tasks import prompt_batches, task_rows

ROOT = Path(__file__).resolve().parents[2]
COMMON = ["model=tiny", "env=letters", "policy.max_output_tokens=4", "eval.at_start=false", "eval.at_end=false", "logging.progress=false",
          "logging.plot=false", "distributed.backend=gloo", "distributed.timeout_s=120"]

TWO_PROMPTS = ["train.prompts_per_step=2", "train.group_size=2"]


def torchrun(overrides: list[str], timeout: float = 150) -> tuple[subprocess.CompletedProcess, float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={port}", str(ROOT / "recipes" / "grpo.py"), *COMMON, *overrides]
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - started


def write_rows(path: Path, change_row_1) -> Path:
    assert next(prompt_batches(2, 2, 0)) == [0, 1]  # rank 0 gets row 0, rank 1 row 1 in step 1
    rows = task_rows("letters", "letters_agent")[:2]
    change_row_1(rows[1])
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow  # 12 s on a slow 2-core machine: the fast suite's ~3 min budget
def test_failed_collection_on_one_rank_stops_every_rank_with_one_error(tmp_path):
    def zero_tokens(row):
        row["responses_create_params"]["max_output_tokens"] = 0  # rejected by the policy: a failure record

    rows = write_rows(tmp_path / "rows.jsonl", zero_tokens)
    proc, elapsed = torchrun(["env.task=null", f"env.data_path={rows}", *TWO_PROMPTS, "train.steps=2",
                              f"run_dir={tmp_path / 'run'}"])
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    expected = ("RankFailedError: step 1: collecting and processing rollouts failed on 1 of 2 ranks, so every rank "
                "stops here: rank 1: ProtocolError: no usable rollout among 2: 2 failed")
    # every rank raises it; the first to exit makes torchrun stop the other, which may not get to print it
    assert expected in out, out[-4000:]
    assert not any(s in out for s in ("Connection closed", "ProcessGroupGloo", "DistBackendError")), out[-4000:]
    assert elapsed < 90, f"took {elapsed:.0f} s"  # start-up and one collection; no timeout was waited out
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or \
        (tmp_path / "run" / "metrics.jsonl").read_text() == ""  # no step was logged


@pytest.mark.slow  # 13 s on a slow 2-core machine: the fast suite's ~3 min budget
def test_rank_without_trained_tokens_trains_in_step_with_the_other(tmp_path):
    def long_prompt(row):
        row["responses_create_params"]["input"][0]["content"] = "Write a word with the letter e. " * 30

    rows = write_rows(tmp_path / "rows.jsonl", long_prompt)
    run_dir = tmp_path / "run"
    # max_seq_len 64: rank 0's rows (short prompt + <= 4 tokens) fit; rank 1's ~30x longer prompt is cut, and
    # cut rows are not trained on -> rank 1 has no trained token in step 1 (step 2 swaps the rows)
    proc, _ = torchrun(["env.task=null", f"env.data_path={rows}", *TWO_PROMPTS, "train.steps=2",
                        "process.max_seq_len=64", "train.lr=1e-3", f"run_dir={run_dir}"])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    digests = json.loads((run_dir / "param_digests.json").read_text())
    assert len(digests) == 2 and digests[0] == digests[1]
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2]
    # rollout/* are rank 0's own batch: the long prompt is on rank 1 in step 1 and on rank 0 in step 2
    assert [s["rollout/num_truncated"] for s in steps] == [0, 2]
    assert all(s["perf/num_trained_seqs"] == 2 for s in steps)  # over both ranks: the short prompt's 2 samples


@pytest.mark.slow  # 13 s on a slow 2-core machine: the fast suite's ~3 min budget
def test_fsdp_trains_syncs_the_policy_and_checkpoints(tmp_path):
    from gym_plugin.distributed import params_digest
    from gym_plugin.models import load_policy_model

    run_dir = tmp_path / "run"
    proc, _ = torchrun(["distributed.strategy=fsdp", "train.prompts_per_step=4", "train.group_size=4",
                        "train.steps=2", "train.lr=1e-3", f"run_dir={run_dir}"])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    digests = json.loads((run_dir / "param_digests.json").read_text())
    assert digests[0] == digests[1]  # same on both ranks
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    if any(s["perf/grad_norm"] > 0 for s in steps):  # 0 only if every group had equal rewards (sampling is random)
        assert digests[0] != params_digest(load_policy_model("tiny")[0])  # trained
    assert params_digest(load_policy_model(run_dir / "checkpoints" / "last")[0]) == digests[0]  # whole checkpoint
    records = [json.loads(line) for line in (run_dir / "rollouts" / "step_000002.jsonl").read_text().splitlines()]
    # step 2 was sampled by the policy holding step 1's gathered weights
    assert {i["policy_version"] for r in records for i in r["response"]["output"] if "policy_version" in i} == {1}


def test_resume_with_fsdp_is_refused_with_the_reason():
    import pytest

    from gym_plugin.errors import ConfigError
    from gym_plugin.grpo_config import parse_grpo_config

    with pytest.raises(ConfigError, match="optimizer state is sharded over the ranks"):
        parse_grpo_config({"resume": True, "distributed": {"strategy": "fsdp"}})
