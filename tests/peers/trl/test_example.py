"""examples/trl_grpo.py runs as the README shows (the tiny model, 1 step, CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.trl, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[3]


def test_example_trains_one_step(tmp_path):
    proc = subprocess.run([sys.executable, "examples/trl_grpo.py", "--model", "tiny", "--steps", "1", "--output-dir",
                           str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=280,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("reward by step:")]
    assert len(line) == 1 and line[0].count(",") == 0  # one step, one reward
