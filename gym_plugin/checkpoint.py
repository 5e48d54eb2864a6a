"""The recipe's checkpoint: ``<run_dir>/checkpoints/last``, a Hugging Face folder (loadable as ``model.spec=<dir>``)
plus ``trainer_state.json`` (step, policy version) and, when asked, ``optimizer.pt``. Only the newest is kept."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gym_plugin.errors import ConfigError
from gym_plugin.models import quiet_hf_progress
from gym_plugin.weight_sync import unwrap_model

__all__ = ["TrainerState", "last_checkpoint", "load_optimizer_state", "read_trainer_state", "save_checkpoint"]


@dataclass(frozen=True)
class TrainerState:
    step: int
    """Steps finished when the checkpoint was written."""
    policy_version: int
    """The served policy's version then (rollouts and metrics go on counting from it)."""
    trackers: dict = field(default_factory=dict)
    """Tracker backend -> its run id (gym_plugin.trackers), so that a resumed run continues the same runs."""


def last_checkpoint(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "last"


def read_trainer_state(ckpt: Path) -> TrainerState:
    """The checkpoint's step and policy version; ConfigError (resume without a checkpoint) when there is none."""
    path = ckpt / "trainer_state.json"
    if not path.is_file():
        raise ConfigError(f"resume=true but {ckpt} holds no checkpoint; run without resume or fix run_dir.")
    state = json.loads(path.read_text())
    return TrainerState(step=state["step"], policy_version=state.get("policy_version", state["step"]),
                        trackers=state.get("trackers", {}))


def load_optimizer_state(ckpt: Path, optimizer, device: torch.device) -> bool:
    """Restore ``optimizer`` from the checkpoint's optimizer.pt; False when the checkpoint has none."""
    path = ckpt / "optimizer.pt"
    if not path.is_file():
        return False
    optimizer.load_state_dict(torch.load(path, map_location=device))
    return True


def save_checkpoint(model, tokenizer, optimizer, step: int, policy_version: int, run_dir: Path,
                    save_optimizer: bool, trackers: dict | None = None) -> Path:
    """HF folder + trainer state (+ the optimizer state when ``save_optimizer``: AdamW's moments are twice the
    model's size; + ``trackers``, the tracker run ids a resume continues), swapped in atomically as
    checkpoints/last; the previous one is removed."""
    final = last_checkpoint(run_dir)
    tmp = run_dir / "checkpoints" / f"tmp-{step}"
    with quiet_hf_progress():
        unwrap_model(model).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if save_optimizer:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    state = {"step": step, "policy_version": policy_version, "trackers": trackers or {}}
    (tmp / "trainer_state.json").write_text(json.dumps(state))
    if final.exists():
        final.rename(run_dir / "checkpoints" / f"old-{step}")
    tmp.rename(final)
    for old in (run_dir / "checkpoints").glob("old-*"):
        shutil.rmtree(old, ignore_errors=True)
    return final
