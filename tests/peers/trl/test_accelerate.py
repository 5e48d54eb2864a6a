"""``accelerate launch --num_processes 2`` on CPU (gloo): TRL slices each generation batch across the two ranks and
each rank's GymRollouts collects its own slice from its own Gym servers, sampling from its own DDP replica served
in process (tests/peers/trl/accelerate_run.py is one rank). ~45 s on 2 cores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gym_plugin.net import free_port

pytestmark = [pytest.mark.trl, pytest.mark.timeout(300)]

HERE = Path(__file__).resolve().parent


def test_two_ranks_each_collect_their_own_prompts(tmp_path):
    # --multi_gpu is accelerate's torchrun launcher; without a GPU each rank runs on CPU with gloo (MULTI_CPU)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(HERE / "accelerate_run.py"), str(tmp_path)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{k}.json").read_text()) for k in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    # 8 completions per step = 2 prompts x 4 generations; shuffle_dataset=False: step 1 has rows 0 and 1, step 2
    # rows 2 and 3; TRL gives each rank one prompt's 4 copies, and each rank collected exactly its own
    for step, pair in enumerate((("letters/0", "letters/1"), ("letters/2", "letters/3"))):
        slices = [r["collections"][step]["prompts"] for r in ranks]
        assert sorted(s[0] for s in slices) == sorted(pair)
        assert all(len(s) == 4 and len(set(s)) == 1 for s in slices)
    assert all(c["served_is_trainer_module"] for r in ranks for c in r["collections"])
    # DDP kept the replicas equal
    assert ranks[0]["params_sha256"] == ranks[1]["params_sha256"]
    # TRL's logs (rank 0): gym/num_rollouts summed over the ranks, the reward the mean of both ranks' 8 rewards
    logs = [h for h in ranks[0]["logs"] if "gym/num_rollouts" in h]
    assert len(logs) == 2
    for step, h in enumerate(logs):
        rewards = [x for r in ranks for x in r["collections"][step]["rewards"]]
        assert h["gym/num_rollouts"] == 8 and h["gym/num_failed"] == 0
        assert h["reward"] == pytest.approx(sum(rewards) / 8)
        assert h["gym/reward/letters_agent"] == pytest.approx(sum(rewards) / 8)
