"""examples/own_training_loop.py (the README's bring-your-own-loop example) runs end to end on the tiny model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(240)

ROOT = Path(__file__).resolve().parents[2]


def test_own_training_loop_runs_and_updates_the_policy():
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, str(ROOT / "examples/own_training_loop.py"), "tiny", "2"], env=env,
                         capture_output=True, text=True, timeout=200)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("step ")]
    assert len(lines) == 2
    # Each step: 4 prompts x 4 samples; the server's policy_version counts the in-process updates: 1, then 2.
    assert lines[0].endswith("policy_version 1") and lines[1].endswith("policy_version 2")
    for line in lines:
        reward = float(line.split("reward ")[1].split()[0])
        tokens = int(line.split("tokens ")[1].split()[0])
        assert 0.0 <= reward <= 1.0 and 0 < tokens <= 16 * 16  # at most 16 rows x max_output_tokens=16
