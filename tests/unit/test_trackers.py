"""gym_plugin.trackers, read back with each library's own reader (tests/tracker_readers.py): every metric under its
own name at its own step with its value, the config (secrets redacted), sampled rollouts, the reward curve and the
run facts; a resume continues the same tracker run; a tracker failing mid-run is reported once and the others go
on. Each backend test skips when its extra is not installed (.ci/run installs all three)."""

from __future__ import annotations

import math
import shutil
import struct
from pathlib import Path

import pytest

from gym_plugin.errors import ConfigError, TrackerError
from gym_plugin.grpo_config import parse_grpo_config
from gym_plugin.plotting import plot_reward_curve
from gym_plugin.protocol import failure_record
from gym_plugin.redact import redact
from gym_plugin.trackers import Trackers, backend_problems, flatten, redact_args, sample_rollouts

from tests.tracker_readers import tensorboard_events, wandb_offline_runs

CONFIG = redact({"train": {"lr": 1e-5, "steps": 2}, "policy": {"api_key": "sk-secret", "base_urls": []}})
"""A config as the recipe hands it over: redacted first (the key must never reach a tracker)."""
STEPS = {
    # 0.25/0.5/0.75 are exact in float32 (TensorBoard's scalar type); 0.1 is not: its float32 rounding is compared
    1: {"rollout/reward_mean": 0.25, "loss/total": -0.1, "perf/num_trained_tokens": 978.0},
    2: {"rollout/reward_mean": 0.5, "loss/total": None, "perf/num_trained_tokens": 977.0},  # None: NaN
}
EVAL = {0: {"eval/reward_mean": 0.75}, 2: {"eval/reward_mean": 0.5}}


def record(letter: str, text: str, reward: float, index: int) -> dict:
    """A collector record of the letters task (the fields sample_rollouts reads)."""
    return {"responses_create_params": {"input": [{"role": "system", "content": "be brief"},
                                                  {"role": "user", "content": f"A word with {letter}."}]},
            "response": {"output": [{"type": "message", "role": "assistant",
                                     "content": [{"type": "output_text", "text": text}]}]},
            "reward": reward, "_ng_task_index": index, "_ng_rollout_index": 0}


RECORDS = [record("a", "apple", 1.0, 0), record("b", "cat", 0.0, 1), record("c", "cat", 1.0, 2),
           record("d", "dog", 1.0, 3),
           failure_record({"responses_create_params": {"input": "A word with e."}}, kind="http_status",
                          reason="503 from the verifier", task_index=4)]


def float32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def log_run(trackers: Trackers, steps=STEPS, evals=EVAL) -> None:
    """What the recipe sends, in its order: eval at 0, then per step metrics (+ eval) and rollouts."""
    trackers.log_metrics(0, evals[0])
    for step, metrics in steps.items():
        if step in evals:
            trackers.log_metrics(step, evals[step])
        trackers.log_metrics(step, metrics)
        trackers.log_rollouts(step, RECORDS)


def curve(tmp_path: Path) -> Path:
    return plot_reward_curve([{"step": s, **m} for s, m in STEPS.items()], tmp_path / "reward_curve.png")


def expected_series(steps=STEPS, evals=EVAL) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    for step, metrics in sorted({**{s: {} for s in steps}, **{s: {} for s in evals}}.items()):
        for key, value in {**evals.get(step, {}), **steps.get(step, {})}.items():
            series.setdefault(key, []).append((step, math.nan if value is None else value))
    return series


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def test_sample_rollouts_spread_over_the_records_by_hand():
    # 5 records, 3 samples: indices round(i * 4 / 2) = 0, 2, 4 (first, middle, last)
    samples = sample_rollouts(7, RECORDS, 3)
    assert [(s.step, s.prompt, s.completion, s.reward) for s in samples[:2]] == [
        (7, "A word with a.", "apple", 1.0), (7, "A word with c.", "cat", 1.0)]
    assert samples[2].prompt == "A word with e." and samples[2].reward is None  # a failure: no reward
    assert "http_status" in samples[2].completion and "503 from the verifier" in samples[2].completion
    assert len(sample_rollouts(1, RECORDS, 10)) == 5 and sample_rollouts(1, RECORDS, 0) == []
    assert [s.prompt for s in sample_rollouts(1, RECORDS, 1)] == ["A word with a."]


def test_backend_names_are_checked_with_did_you_mean():
    assert backend_problems(["tensorboard", "mlflow"]) == []
    [typo] = backend_problems(["tensorbord"])
    assert "'tensorbord' is not one of" in typo and "Did you mean 'tensorboard'?" in typo
    assert "twice" in backend_problems(["wandb", "wandb"])[0]
    with pytest.raises(ConfigError, match="Did you mean 'wandb'"):
        parse_grpo_config({"logging": {"backends": ["wandbb"]}})
    with pytest.raises(TrackerError, match="tensorbord"):
        Trackers.open(["tensorbord"], "/nonexistent", config={})
    assert flatten({"a": {"b": 1, "c": [1, 2], "d": None}}) == {"a.b": 1, "a.c": "[1, 2]", "a.d": "null"}


def test_redact_args_masks_secret_overrides():
    argv = ["recipes/grpo.py", "policy.api_key=sk-1", "+env.gym.x.hf_token=hf_2", "train.max_tokens=8",
            "policy.base_urls=[http://u:pw@h/v1]", "policy.api_key="]
    assert redact_args(argv) == ["recipes/grpo.py", "policy.api_key=***", "+env.gym.x.hf_token=***",
                                 "train.max_tokens=8", "policy.base_urls=[http://u:***@h/v1]", "policy.api_key="]


def test_no_backends_is_a_no_op(tmp_path):
    trackers = Trackers.open([], tmp_path, config=CONFIG)
    log_run(trackers)
    trackers.close(image=curve(tmp_path))
    assert trackers.ids() == {} and sorted(p.name for p in tmp_path.iterdir()) == ["reward_curve.png"]


def test_a_metric_that_is_not_a_number_is_named(tmp_path):
    pytest.importorskip("tensorboard")
    trackers = Trackers.open(["tensorboard"], tmp_path, config=CONFIG)
    with pytest.raises(TrackerError, match="metric 'note'='hi' is not a number"):
        trackers.log_metrics(1, {"note": "hi"})
    trackers.close()


def test_tensorboard_reads_back_and_resume_purges_the_redone_steps(tmp_path):
    pytest.importorskip("tensorboard")
    trackers = Trackers.open(["tensorboard"], tmp_path, config=CONFIG, facts={"model": "tiny", "ranks": 1})
    log_run(trackers)
    trackers.close(image=curve(tmp_path), facts={"peak_rss_mb": 512.5})
    got = tensorboard_events(tmp_path / "tensorboard")
    for key, series in expected_series().items():  # every name, step and value (as float32, TB's scalar type)
        assert [s for s, _ in got["scalars"][key]] == [s for s, _ in series], key
        assert all(same(v, float32(w)) for (_, v), (_, w) in zip(got["scalars"][key], series)), key
    assert set(got["scalars"]) == set(expected_series())
    assert got["hparams"]["train.lr"] == pytest.approx(1e-5) and got["hparams"]["policy.api_key"] == "***"
    [(_, config_text)] = got["texts"]["config/text_summary"]
    assert "lr: 1.0e-05" in config_text and "sk-secret" not in config_text
    rollouts = dict(got["texts"]["rollouts/text_summary"])
    # 4 of the 5 records: indices round(i * 4 / 3) = 0, 1, 3, 4 (a, b, d and the failure)
    assert sorted(rollouts) == [1, 2] and "| A word with b. | cat | 0.0 |" in rollouts[1]
    assert rollouts[1].count("\n| A word with") == 4 and "| A word with c." not in rollouts[1]
    facts = "".join(t for _, t in got["texts"]["run/facts/text_summary"])
    assert "- model: tiny" in facts and "- peak_rss_mb: 512.5" in facts
    assert got["images"]["reward_curve"] == [(2, 600, 350)]  # the PNG at the last step, 6x3.5 in at 100 dpi

    # resume from a checkpoint at step 1: step 2 is redone with new values, then step 3
    resumed = Trackers.open(["tensorboard"], tmp_path, config=CONFIG, resume_ids=trackers.ids(), resume_step=1)
    assert resumed.ids() == trackers.ids() == {"tensorboard": str(tmp_path / "tensorboard")}
    redone = {2: {"rollout/reward_mean": 0.75}, 3: {"rollout/reward_mean": 1.0}}
    for step, metrics in redone.items():
        resumed.log_metrics(step, metrics)
    resumed.close()
    got = tensorboard_events(tmp_path / "tensorboard")
    assert got["scalars"]["rollout/reward_mean"] == [(1, 0.25), (2, 0.75), (3, 1.0)]


def test_mlflow_file_store_reads_back_and_resume_continues_the_run(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    trackers = Trackers.open(["mlflow"], tmp_path, config=CONFIG, facts={"model": "tiny", "ranks": 1},
                             project="exp", run_name="r1", mlflow_tracking_uri=uri)
    log_run(trackers)
    trackers.close(image=curve(tmp_path), facts={"peak_rss_mb": 512.5})
    client = MlflowClient(uri)
    run_id = trackers.ids()["mlflow"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "r1"
    for key, series in expected_series().items():  # float64 both sides: exact
        history = [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
        assert [s for s, _ in history] == [s for s, _ in series] and all(
            same(v, w) for (_, v), (_, w) in zip(history, series)), key
    assert set(run.data.metrics) == set(expected_series())
    assert run.data.params["train.lr"] == "1e-05" and run.data.params["policy.api_key"] == "***"
    assert run.data.tags["run.model"] == "tiny" and run.data.tags["run.peak_rss_mb"] == "512.5"
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "reward_curve.png", "rollouts"} <= artifacts
    rollouts = Path(client.download_artifacts(run_id, "rollouts/step_000001.jsonl", str(tmp_path / "dl")))
    lines = rollouts.read_text().splitlines()
    assert len(lines) == 4 and '"completion": "apple"' in lines[0] and '"reward": null' in lines[-1]

    resumed = Trackers.open(["mlflow"], tmp_path, config={**CONFIG, "resume": True}, project="exp",
                            mlflow_tracking_uri=uri, resume_ids=trackers.ids(), resume_step=2)
    assert resumed.ids() == trackers.ids()
    resumed.log_metrics(3, {"rollout/reward_mean": 1.0})
    resumed.close(finished=True)
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "rollout/reward_mean")] == [
        (1, 0.25), (2, 0.5), (3, 1.0)]
    run = client.get_run(run_id)
    assert run.data.params["resume"] == "True"  # a key the first run did not have is added
    assert "config_resumed_at_step_2.yaml" in {a.path for a in client.list_artifacts(run_id)}
    assert len(client.search_runs([run.info.experiment_id])) == 1


def wandb_teardown() -> None:
    """Stop W&B's service process: it may still hold a finished run's records in its write buffer after
    ``finish`` returns (seen: a .wandb file without its run record; a recipe run's process exit stops it too), and
    it keeps the first run's settings (WANDB_MODE) for every later run of this process."""
    import wandb

    wandb.teardown()


def test_wandb_offline_run_files_read_back_and_resume_keeps_the_id(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    trackers = Trackers.open(["wandb"], tmp_path, config=CONFIG, facts={"model": "tiny", "ranks": 1},
                             project="p", run_name="r1")
    log_run(trackers)
    trackers.close(image=curve(tmp_path), facts={"peak_rss_mb": 512.5})
    wandb_teardown()
    [run] = wandb_offline_runs(tmp_path)
    assert run["id"] == trackers.ids()["wandb"]
    history: dict[str, list[tuple[int, float]]] = {}
    for row in run["history"]:
        for key, value in row.items():
            if not key.startswith("_") and isinstance(value, (int, float)):  # NaN: json reads it as float
                history.setdefault(key, []).append((row["_step"], float(value)))
    for key, series in expected_series().items():
        assert [s for s, _ in history[key]] == [s for s, _ in series], key
        assert all(same(v, w) for (_, v), (_, w) in zip(history[key], series)), key
    assert run["config"]["train"] == {"lr": 1e-5, "steps": 2} and run["config"]["policy"]["api_key"] == "***"
    assert run["config"]["run"]["model"] == "tiny" and run["summary"]["run/peak_rss_mb"] == 512.5
    assert [t["data"][0][:4] for t in run["tables"]] == [[1, "A word with a.", "apple", 1.0],
                                                         [2, "A word with a.", "apple", 1.0]]
    assert run["tables"][0]["columns"] == ["step", "prompt", "completion", "reward"]
    assert run["tables"][0]["data"][-1][3] is None  # the failure record: no reward
    assert [row["_step"] for row in run["history"] if "reward_curve/path" in row] == [2]

    resumed = Trackers.open(["wandb"], tmp_path, config=CONFIG, resume_ids=trackers.ids(), resume_step=2)
    resumed.log_metrics(3, {"rollout/reward_mean": 1.0})
    resumed.close()
    wandb_teardown()
    first, second = wandb_offline_runs(tmp_path)  # wandb sync appends the second to the same run id
    assert second["id"] == first["id"] == trackers.ids()["wandb"]
    assert [(r["_step"], r["rollout/reward_mean"]) for r in second["history"]] == [(3, 1.0)]


def test_a_tracker_failing_mid_run_is_reported_once_and_the_others_go_on(tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    reports: list[str] = []
    trackers = Trackers.open(["tensorboard", "mlflow"], tmp_path, config=CONFIG, on_error=reports.append)
    trackers.log_metrics(1, {"rollout/reward_mean": 0.25})
    # the MLflow store loses its run folder (a disk gone, a store wiped): the next write fails
    [run_dir] = (tmp_path / "mlruns").glob(f"*/{trackers.ids()['mlflow']}")
    shutil.rmtree(run_dir)
    run_dir.write_text("not a folder")
    trackers.log_metrics(2, {"rollout/reward_mean": 0.5})
    trackers.log_rollouts(2, RECORDS)
    trackers.log_metrics(3, {"rollout/reward_mean": 0.75})
    trackers.close()
    assert len(reports) == 1 and "tracker mlflow failed while logging step 2's metrics" in reports[0]
    assert "training goes on" in reports[0] and set(trackers.failed) == {"mlflow"}
    got = tensorboard_events(tmp_path / "tensorboard")
    assert got["scalars"]["rollout/reward_mean"] == [(1, 0.25), (2, 0.5), (3, 0.75)]


def test_wandb_online_without_a_key_is_one_error_naming_the_fixes(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc, no saved login
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    wandb_teardown()  # a fresh W&B setup that reads this environment
    with pytest.raises(TrackerError, match=r"W&B could not start a run .*WANDB_MODE=offline"):
        Trackers.open(["wandb"], tmp_path, config=CONFIG)


def test_the_time_spent_inside_the_trackers_is_counted():
    import time

    from gym_plugin.trackers import Tracker

    class Slow(Tracker):
        """Each call takes 20 ms (logging), 30 ms (closing)."""
        name = "slow"

        def log_metrics(self, step, metrics):
            time.sleep(0.02)

        def log_rollouts(self, step, samples):
            time.sleep(0.02)

        def log_facts(self, facts):
            time.sleep(0.02)

        def close(self, finished):
            time.sleep(0.03)

    trackers = Trackers([Slow()])
    assert trackers.seconds == 0.0
    trackers.log_metrics(1, {"rollout/reward_mean": 0.25})
    trackers.log_rollouts(1, RECORDS)
    assert 0.04 <= trackers.seconds < 0.04 + 0.5
    trackers.close(facts={"peak_rss_mb": 1.0})  # facts 20 ms + close 30 ms
    assert 0.09 <= trackers.seconds < 0.09 + 0.5
    # an empty set costs nothing and counts nothing
    empty = Trackers()
    empty.log_metrics(1, {"rollout/reward_mean": 0.25})
    assert empty.seconds == 0.0
