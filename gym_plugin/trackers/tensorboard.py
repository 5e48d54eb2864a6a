"""TensorBoard event files through torch's SummaryWriter (extra ``tensorboard``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from gym_plugin.trackers.base import RolloutSample, Tracker, flatten, yaml_text

def _markdown_cell(text: str, limit: int = 1000) -> str:
    text = text if len(text) <= limit else text[:limit] + " ..."
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", "<br>")


class TensorBoardTracker(Tracker):
    """Event files in ``log_dir`` via torch's SummaryWriter. On resume the same folder is continued and
    ``purge_step`` hides the events of steps after the checkpoint (they are redone)."""

    name = "tensorboard"

    def __init__(self, log_dir: Path, config: Mapping[str, Any], resume_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.run_id = str(log_dir)
        self.writer = SummaryWriter(str(log_dir), purge_step=None if resume_step is None else resume_step + 1,
                                    flush_secs=10)
        if resume_step is None:
            from torch.utils.tensorboard.summary import hparams

            flat = {k: v for k, v in flatten(config).items()}
            for summary in hparams(flat, {"rollout/reward_mean": math.nan, "eval/reward_mean": math.nan}):
                self.writer._get_file_writer().add_summary(summary)
        self.writer.add_text("config", "    " + yaml_text(config).replace("\n", "\n    "), 0 if resume_step is None
                             else resume_step)

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def log_rollouts(self, step: int, samples: Sequence[RolloutSample]) -> None:
        rows = ["| prompt | completion | reward |", "|---|---|---|"]
        rows += [f"| {_markdown_cell(s.prompt)} | {_markdown_cell(s.completion)} | {s.reward} |" for s in samples]
        self.writer.add_text("rollouts", "\n".join(rows), step)

    def log_image(self, step: int, name: str, path: Path) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        png = path.read_bytes()
        width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")  # the IHDR chunk
        image = Summary.Image(height=height, width=width, colorspace=4, encoded_image_string=png)
        self.writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=name, image=image)]), step)

    def log_facts(self, facts: Mapping[str, Any]) -> None:
        self.writer.add_text("run/facts", "\n".join(f"- {k}: {v}" for k, v in facts.items()), 0)

    def close(self, finished: bool) -> None:
        self.writer.close()
