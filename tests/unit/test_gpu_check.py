"""bench/gpu_check.py's arithmetic: the table's figures from a recipe run's metrics (the run itself is the dry run in
.ci/run, and the real one on a lent GPU)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def step(collect: float, train: float, trained: float, forward: float) -> dict:
    return {"perf/iteration_time_s": collect + train + 0.1, "perf/collect_time_s": collect, "perf/step_time_s": train,
            "perf/weight_sync_s": 0.1, "perf/num_trained_tokens": trained, "perf/num_forward_tokens": forward,
            "rollout/gen_tokens_mean": 100.0, "rollout/num_rollouts": 128.0, "perf/num_skipped_rows": 0.0}


def test_figures_are_medians_after_the_first_step_and_mfu_counts_6_n_tokens():
    gc = gpu_check()
    steps = [step(30.0, 9.0, 1.0, 1.0),  # warm-up: left out
             step(2.0, 0.5, 10_000, 12_000), step(4.0, 0.5, 10_000, 12_000), step(3.0, 1.0, 20_000, 24_000)]
    f = gc.figures({"params": 100_000_000, "steps": steps, "peak_gpu_mb": 2048.0})
    # iteration = collect + train + 0.1: 2.6, 4.6, 4.1 -> median 4.1; collect 2, 4, 3 -> 3; train 0.5, 0.5, 1 -> 0.5
    assert f["collect_s"] == 3.0 and f["train_s"] == 0.5 and f["s_per_step"] == pytest.approx(4.1)
    # 100 x 128 sampled tokens over 2, 4 and 3 s: 6400, 3200, 4266.7 -> median 4266.7
    assert f["sampled_tok_s"] == pytest.approx(12_800 / 3)
    assert f["trained_tok_s"] == 20_000  # 10000 / 0.5, 10000 / 0.5, 20000 / 1.0
    # 6 x 1e8 params x 1e4 tokens = 6e12 FLOP in 0.5 s = 1.2e13 FLOP/s of 7.9e14: 1.52 %; forward tokens 1.2e4: 1.82 %
    assert f["mfu_trained"] == pytest.approx(6e12 / 0.5 / 790e12) == pytest.approx(0.01519, abs=1e-5)
    assert f["mfu_forward"] == pytest.approx(0.01823, abs=1e-5)
    assert f["peak_gpu_gib"] == 2.0 and f["first_step"]["perf/collect_time_s"] == 30.0


def test_with_overlap_sampled_tokens_per_second_are_over_the_whole_step():
    gc = gpu_check()
    steps = [step(0.0, 1.0, 1.0, 1.0), step(0.01, 1.0, 1.0, 1.0)]
    f = gc.figures({"params": 1, "steps": steps, "overrides": ["train.overlap=true"]})
    assert f["sampled_tok_s"] == pytest.approx(12_800 / 1.11)  # not 12800 / 0.01
    assert f["peak_gpu_gib"] is None
