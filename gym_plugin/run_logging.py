"""What a training run shows and leaves behind: progress bars, one line per step, metrics.jsonl, rollouts.

``RunLogger`` is created on every rank but only rank 0 prints or writes (``enabled=False`` elsewhere), so the
recipe calls it unconditionally. Files in the run directory:

- ``metrics.jsonl``: one JSON object per step (``step`` plus namespaced metrics, ``rollout/...``, ``loss/...``,
  ``perf/...``), appended and flushed as each step ends, so a crash keeps every finished step;
- ``eval.jsonl``: one JSON object per evaluation (``step`` plus ``eval/...`` metrics over a fixed prompt set);
- ``rollouts/step_000001.jsonl``: the step's collector records (rollouts and failure records), one per line;
- ``reward_curve.png``: written by ``gym_plugin.plotting`` from metrics.jsonl.

With ``trackers`` (a ``gym_plugin.trackers.Trackers``: TensorBoard, W&B, MLflow) every step's and evaluation's
metrics go to them too (same names, same step), ``log_rollouts`` sends them a few sampled rollouts per step, and
``close`` sends the reward curve and the peak RSS and ends their runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Iterable, Mapping, Sequence

if TYPE_CHECKING:
    from gym_plugin.trackers import Trackers

STEP_LINE_KEYS = (
    ("rollout/reward_mean", "reward {:.3f}"),
    ("rollout/accuracy", "acc {:.3f}"),
    ("loss/total", "loss {:+.4f}"),
    ("perf/num_trained_tokens", "tokens {:.0f}"),
    ("perf/collect_time_s", "collect {:.1f}s"),
    ("perf/step_time_s", "train {:.1f}s"),
    ("perf/weight_sync_s", "sync {:.2f}s"),
    ("perf/iteration_time_s", "step {:.1f}s"),
    ("rollout/num_failed", "failed {:.0f}"),
    ("policy/staleness", "stale {:.0f}"),
)
"""(metric key, format) of the per-step line, in order; missing keys are skipped."""


def format_step_line(step: int, total_steps: int, metrics: Mapping[str, float]) -> str:
    """'step 3/6 | reward 0.469 | acc 0.469 | ...' from the keys in ``STEP_LINE_KEYS`` that are present."""
    parts = [f"step {step}/{total_steps}"]
    for key, fmt in STEP_LINE_KEYS:
        value = metrics.get(key)
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            parts.append(fmt.format(value))
    return " | ".join(parts)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None  # strict JSON: NaN/inf are not allowed
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value


class RunLogger:
    """Progress bars and files of one run (rank 0 only; a no-op elsewhere)."""

    def __init__(self, run_dir: str | Path, total_steps: int, *, enabled: bool = True, start_step: int = 0,
                 progress: bool = True, trackers: "Trackers | None" = None):
        self.run_dir = Path(run_dir)
        self.trackers = trackers if enabled else None
        if self.trackers is not None:
            self.trackers.on_error = self.info  # a failing tracker's one report goes above the bars
        self._last_step = start_step
        self.total_steps = total_steps
        self.enabled = enabled
        self.progress = progress and enabled
        self._step_bar = None
        if enabled:
            (self.run_dir / "rollouts").mkdir(parents=True, exist_ok=True)
            self.metrics_path = self.run_dir / "metrics.jsonl"
            self.eval_path = self.run_dir / "eval.jsonl"
            for path in (self.metrics_path, self.eval_path):
                if start_step == 0 and path.exists():
                    path.unlink()  # a fresh run in a reused folder starts a fresh log
                elif start_step > 0 and path.exists():
                    self._truncate_after(path, start_step)
        if self.progress:
            from tqdm.auto import tqdm

            self._step_bar = tqdm(total=total_steps, initial=start_step, desc="steps", unit="step",
                                  position=0, dynamic_ncols=True, file=sys.stderr)

    @staticmethod
    def _truncate_after(path: Path, step: int) -> None:
        """On resume, drop the lines of steps after the checkpoint (they will be redone)."""
        kept = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        path.write_text("".join(line + "\n" for line in kept))

    @contextlib.asynccontextmanager
    async def rollout_bar(self, total: int, desc: str = "rollouts",
                          tokens_sampled: Callable[[], int] | None = None) -> AsyncIterator[Any]:
        """A progress bar over the rollouts of one collection (``update(1)`` per record; a dummy when disabled).

        It shows no ETA: a batching policy finishes most rollouts of a batch at the same moment, so a rate
        measured on the first ones predicts nothing. With ``tokens_sampled`` (a counter of the policy's sampled
        tokens) it shows, once a second, how many tokens were sampled so far and at what rate: the live sign of
        progress while a batch runs."""
        if not self.progress:
            yield _NullBar()
            return
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=desc, unit="rollout", position=1, leave=False, dynamic_ncols=True,
                   file=sys.stderr, bar_format="{desc}: {n_fmt}/{total_fmt} rollouts |{bar}| {elapsed}{postfix}")
        ticker = None
        if tokens_sampled is not None:
            first, t0 = tokens_sampled(), time.perf_counter()

            async def tick() -> None:
                while True:
                    await asyncio.sleep(1.0)
                    n = tokens_sampled() - first
                    bar.set_postfix_str(f"{n} tokens sampled, {n / (time.perf_counter() - t0):.0f} tok/s")

            ticker = asyncio.ensure_future(tick())
        try:
            yield bar
        finally:
            if ticker is not None:
                ticker.cancel()
            bar.close()

    def train_progress(self, step: int) -> "TrainProgress":
        """A live line over one training step's micro-batches (see ``TrainProgress``)."""
        return TrainProgress(f"train step {step}", enabled=self.progress)

    def info(self, message: str) -> None:
        """One line to the console without breaking the bars."""
        if not self.enabled:
            return
        if self.progress:
            from tqdm.auto import tqdm

            tqdm.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def log_step(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Append the step's metrics to metrics.jsonl, print the step line, advance the step bar."""
        if not self.enabled:
            return
        row = {"step": step, "time": time.time(), **{k: _jsonable(v) for k, v in metrics.items()}}
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()
        if self.trackers is not None:
            self.trackers.log_metrics(step, metrics)
        self._last_step = step
        self.info(format_step_line(step, self.total_steps, metrics))
        if self._step_bar is not None:
            self._step_bar.update(1)

    def log_eval(self, step: int, metrics: Mapping[str, Any], num_prompts: int) -> None:
        """Append an evaluation (``eval/...`` metrics over the fixed prompt set, after ``step`` updates) to
        eval.jsonl and print one line."""
        if not self.enabled:
            return
        row = {"step": step, "time": time.time(), **{k: _jsonable(v) for k, v in metrics.items()}}
        with open(self.eval_path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.trackers is not None:
            self.trackers.log_metrics(step, metrics)
        reward = metrics.get("eval/reward_mean")
        self.info(f"eval after step {step}: reward {float('nan') if reward is None else reward:.3f} over "
                  f"{metrics.get('eval/num_rollouts', 0):.0f} rollouts of {num_prompts} fixed prompts")

    def write_rollouts(self, step: int, records: Iterable[Mapping[str, Any]]) -> Path | None:
        """Write the step's records to ``rollouts/step_{step:06d}.jsonl``; returns the path."""
        if not self.enabled:
            return None
        path = self.run_dir / "rollouts" / f"step_{step:06d}.jsonl"
        with open(path, "w") as fh:
            for r in records:
                fh.write(json.dumps(r, default=str) + "\n")
        return path

    def log_rollouts(self, step: int, records: Sequence[Mapping[str, Any]]) -> None:
        """Send a few of the step's records (prompt, completion, reward) to the trackers, if any."""
        if self.trackers is not None:
            self.trackers.log_rollouts(step, records)

    def close(self) -> None:
        """Close the bars; end the trackers' runs after sending them the reward curve and the peak RSS (a run
        that stopped before its last step ends as failed where the tracker records that)."""
        if self.trackers is not None:
            from gym_plugin.memory import peak_rss_mb

            self.trackers.close(image=self.run_dir / "reward_curve.png",
                                facts={"peak_rss_mb": round(peak_rss_mb(), 1)},
                                finished=self._last_step >= self.total_steps)
            names = ", ".join(t.name for t in self.trackers.trackers)
            if names:
                self.info(f"trackers ({names}): {self.trackers.seconds:.2f} s in all (opening, logging, closing)")
        if self._step_bar is not None:
            self._step_bar.close()
            self._step_bar = None


class TrainProgress:
    """The live line of a training step: micro-batches done out of the total, trained tokens per second and the
    elapsed time, redrawn every second even while one long micro-batch runs (the default recipe packs a whole
    step into one). Use as a context manager around the step and pass it as ``grpo_step``'s ``on_progress``
    (any object with ``micro_batches_done``, ``micro_batches_total``, ``tokens_done``, ``elapsed_s`` works)."""

    def __init__(self, desc: str, enabled: bool = True):
        self.desc = desc
        self.enabled = enabled
        self._bar = None
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def __enter__(self) -> "TrainProgress":
        if self.enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=None, desc=self.desc, unit="micro-batch", position=1, leave=False,
                             dynamic_ncols=True, file=sys.stderr,
                             bar_format="{desc}: {n_fmt}/{total_fmt} micro-batches {elapsed}{postfix}")
            self._ticker = threading.Thread(target=self._tick, name="train-progress", daemon=True)
            self._ticker.start()
        return self

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            self._bar.refresh()

    def __call__(self, progress: Any) -> None:
        if self._bar is None:
            return
        self._bar.total = progress.micro_batches_total
        rate = progress.tokens_done / progress.elapsed_s if progress.elapsed_s > 0 else 0.0
        self._bar.set_postfix_str(f"{progress.tokens_done} tokens, {rate:.0f} tok/s", refresh=False)
        self._bar.update(progress.micro_batches_done - self._bar.n)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def run_summary(run_dir: str | Path, elapsed_s: float) -> str:
    """The lines a run ends with: time, the eval reward at its first and last evaluation, and every file and
    folder it wrote with sizes (folders: file count and total), then the folder's total size."""
    run_dir = Path(run_dir)
    lines = [f"done in {elapsed_s // 60:.0f}m{elapsed_s % 60:02.0f}s"]
    eval_path = run_dir / "eval.jsonl"
    evals = [r for r in read_metrics(eval_path) if r.get("eval/reward_mean") is not None] if eval_path.is_file() else []
    if evals:
        first, last = evals[0], evals[-1]
        lines.append(f"eval reward {first['eval/reward_mean']:.3f} (step {first['step']}) -> "
                     f"{last['eval/reward_mean']:.3f} (step {last['step']}) over "
                     f"{last.get('eval/num_rollouts', 0):.0f} rollouts of the same prompts")
    lines.append(f"run dir {run_dir} ({_human(_size(run_dir))}):")
    for entry in sorted(run_dir.iterdir(), key=lambda p: (p.is_dir(), p.name)):
        if entry.is_dir():
            files = [p for p in entry.rglob("*") if p.is_file()]
            lines.append(f"  {entry.name + '/':<28} {_human(_size(entry)):>9}  ({len(files)} files)")
        else:
            lines.append(f"  {entry.name:<28} {_human(_size(entry)):>9}")
    return "\n".join(lines)


class _NullBar:
    def update(self, n: int = 1) -> None:
        return None

    def close(self) -> None:
        return None

    def __enter__(self) -> "_NullBar":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl file (skipping blank lines)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
