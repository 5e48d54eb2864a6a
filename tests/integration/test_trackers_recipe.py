"""logging.backends through the real recipe (recipes/grpo.py in a subprocess, the tiny model, the letters task):

- a backend whose package cannot be imported, and an MLflow tracking URI that does not work, each stop the run
  with one error block (exit 2, no traceback) before any model loads: ``model.spec`` points at a folder that does
  not exist, so a run that got as far as loading the model would end with a ModelLoadError instead;
- (slow) 2 steps into TensorBoard, W&B (offline) and MLflow (file store), then ``resume=true train.steps=3``: each
  tracker, read with its own reader, holds every metric of metrics.jsonl and eval.jsonl under the same name at the
  same step with the same value, the redacted config, sampled rollouts per step and the reward curve, and the
  resumed run continues the same tracker runs.

The missing package is made real with a folder put first on PYTHONPATH whose ``wandb``/``mlflow`` package raises
ModuleNotFoundError on import, as an uninstalled one does.
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from gym_plugin.net import free_port

from tests.tracker_readers import tensorboard_events, wandb_offline_runs

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[2]
TINY = ["model=tiny", "env=letters", "train.prompts_per_step=4", "train.group_size=2", "policy.max_output_tokens=8",
        "eval.num_prompts=4", "logging.progress=false"]
NO_MODEL = "model.spec=/nonexistent/model"
"""Loading this fails (ModelLoadError): an error block about the tracker proves the model was never loaded."""


def run_recipe(args: list[str], pythonpath: list[str] = (), env: dict | None = None) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([*map(str, pythonpath), str(ROOT)]),
               "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline",
               "WANDB_SILENT": "true", **(env or {})}
    for name in ("GYM_PLUGIN_DEBUG", "HYDRA_FULL_ERROR", "MLFLOW_TRACKING_URI"):
        environ.pop(name, None)
    return subprocess.run([sys.executable, str(ROOT / "recipes" / "grpo.py"), *args], cwd=ROOT, env=environ,
                          capture_output=True, text=True, timeout=240)


def assert_one_block(proc: subprocess.CompletedProcess, *needles: str) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "Traceback" not in out and out.count("error: ") == 1, out[-3000:]
    assert "ModelLoadError" not in out, out[-3000:]  # stopped before the model
    for needle in needles:
        assert needle in out, (needle, out[-3000:])
    return out


@pytest.mark.parametrize("backend", ["wandb", pytest.param("mlflow", marks=pytest.mark.slow)])
def test_a_missing_tracker_package_is_one_block_naming_the_extra(tmp_path, backend):
    shim = tmp_path / "shim" / backend
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text(f"raise ModuleNotFoundError(\"No module named '{backend}'\", name={backend!r})\n")
    proc = run_recipe([*TINY, NO_MODEL, f"logging.backends=[tensorboard,{backend}]", f"run_dir={tmp_path / 'run'}"],
                      pythonpath=[tmp_path / "shim"])
    assert_one_block(proc, "TrackerError", f"logging.backends has '{backend}'", f"No module named '{backend}'",
                     f"pip install 'gym_plugin[{backend}]'")
    assert not (tmp_path / "run").exists()  # nothing left behind


@pytest.mark.parametrize("uri", ["http://127.0.0.1:{port}", pytest.param("nosuchscheme://x", marks=pytest.mark.slow)])
def test_a_bad_mlflow_tracking_uri_is_one_block(tmp_path, uri):
    pytest.importorskip("mlflow")
    uri = uri.format(port=free_port())  # nothing listens there
    proc = run_recipe([*TINY, NO_MODEL, "logging.backends=[mlflow]", f"logging.mlflow_tracking_uri={uri}",
                       f"run_dir={tmp_path / 'run'}"])
    assert_one_block(proc, "TrackerError", f"logging.mlflow_tracking_uri='{uri}' does not work for MLflow")
    assert not (tmp_path / "run").exists()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def logged_series(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every (step, value) of every metric in metrics.jsonl and eval.jsonl (null: NaN), by name, in step order."""
    series: dict[str, list[tuple[int, float]]] = {}
    for row in sorted(read_jsonl(run_dir / "metrics.jsonl") + read_jsonl(run_dir / "eval.jsonl"),
                      key=lambda r: r["step"]):
        for key, value in row.items():
            if key not in ("step", "time"):
                series.setdefault(key, []).append((row["step"], math.nan if value is None else float(value)))
    return series


def assert_same_series(got: dict[str, list[tuple[int, float]]], want: dict[str, list[tuple[int, float]]],
                       cast=float) -> None:
    assert set(want) <= set(got), sorted(set(want) - set(got))
    for key, series in want.items():
        assert [s for s, _ in got[key]] == [s for s, _ in series], key
        for (_, g), (_, w) in zip(got[key], series):
            assert (math.isnan(g) and math.isnan(w)) or g == cast(w), (key, g, w)


def float32(x: float) -> float:
    return x if math.isnan(x) else struct.unpack("f", struct.pack("f", x))[0]


@pytest.mark.slow
def test_recipe_sends_every_metric_to_each_tracker_and_resume_continues_their_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow >= 3.7 reads a file store only when allowed
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    mlflow = pytest.importorskip("mlflow.tracking")
    run_dir = tmp_path / "run"
    common = [*TINY, "logging.backends=[tensorboard,wandb,mlflow]", "policy.api_key=sk-must-not-leak",
              f"run_dir={run_dir}"]
    for args in (["train.steps=2"], ["train.steps=3", "resume=true"]):
        proc = run_recipe([*common, *args])
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    want = logged_series(run_dir)
    assert [s for s, _ in want["rollout/reward_mean"]] == [1, 2, 3] and [s for s, _ in want["eval/reward_mean"]] == [
        0, 2, 3]
    ids = json.loads((run_dir / "checkpoints" / "last" / "trainer_state.json").read_text())["trackers"]
    assert set(ids) == {"tensorboard", "wandb", "mlflow"}

    # TensorBoard: float32 scalars (its type), one folder over both runs
    tb = tensorboard_events(run_dir / "tensorboard")
    assert_same_series({k: v for k, v in tb["scalars"].items()}, want, cast=float32)
    assert sorted(dict(tb["texts"]["rollouts/text_summary"])) == [1, 2, 3]
    assert tb["hparams"]["policy.api_key"] == "***" and tb["hparams"]["train.steps"] == 2
    assert [s for s, *_ in tb["images"]["reward_curve"]] == [2, 3]  # the curve at the end of each run

    # W&B: two offline run folders with the same id (wandb sync appends the second)
    first, second = wandb_offline_runs(run_dir)
    assert first["id"] == second["id"] == ids["wandb"]
    got: dict[str, list[tuple[int, float]]] = {}
    for row in first["history"] + second["history"]:
        for key, value in row.items():
            if not key.startswith("_") and isinstance(value, (int, float)):
                got.setdefault(key, []).append((row["_step"], float(value)))
    assert_same_series(got, want)
    assert first["config"]["policy"]["api_key"] == "***" and second["config"]["resume"] is True
    assert first["config"]["run"]["model"] == "tiny" and first["config"]["run"]["ranks"] == 1
    assert [t["data"][0][0] for t in first["tables"] + second["tables"]] == [1, 2, 3]  # a table per step
    assert {len(t["data"]) for t in first["tables"]} == {4}  # logging.tracker_rollouts=4 of 8 rollouts

    # MLflow: one run, its history appended by the resumed run
    client = mlflow.MlflowClient((run_dir / "mlruns").resolve().as_uri())
    run = client.get_run(ids["mlflow"])
    assert run.info.status == "FINISHED" and run.data.params["policy.api_key"] == "***"
    assert_same_series({k: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, k)]
                        for k in want}, want)
    assert len(client.search_runs([run.info.experiment_id])) == 1
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "rollouts")}
    assert arts == {f"rollouts/step_00000{s}.jsonl" for s in (1, 2, 3)}
    assert run.data.tags["run.task"] == "letters" and float(run.data.tags["run.peak_rss_mb"]) > 100
    for folder in ("tensorboard", "wandb", "mlruns"):  # the key given on the command line reached no tracker
        for path in (run_dir / folder).rglob("*"):
            assert not path.is_file() or b"sk-must-not-leak" not in path.read_bytes(), path


@pytest.mark.slow
def test_under_torchrun_only_rank_0_logs(tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    run_dir = tmp_path / "run"
    environ = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    environ.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1", "--master_addr=127.0.0.1",
         f"--master_port={free_port()}", str(ROOT / "recipes" / "grpo.py"), *TINY, "train.steps=2",
         "logging.backends=[tensorboard,mlflow]", f"run_dir={run_dir}"],
        cwd=ROOT, env=environ, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1  # one writer: rank 0's
    [meta] = (run_dir / "mlruns").glob("*/*/meta.yaml")  # one MLflow run
    tb = tensorboard_events(run_dir / "tensorboard")
    want = logged_series(run_dir)
    assert_same_series(tb["scalars"], want, cast=float32)  # each step once, with rank 0's metrics.jsonl values
    assert "- ranks: 2" in tb["texts"]["run/facts/text_summary"][0][1]
