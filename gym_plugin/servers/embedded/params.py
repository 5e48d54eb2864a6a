"""The embedded engine's boundary types: sampling parameters in, generated rows out, queued requests, counters.

Their own module so the engine (``engine.py``) and its continuous scheduler (``continuous.py``) share them without
importing each other."""

from __future__ import annotations

import concurrent.futures
import time
from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    """How to sample one request (all ``n`` rows of it)."""

    max_tokens: int
    """Most new tokens per row (>= 1)."""
    temperature: float = 1.0
    """0 = greedy; otherwise logits are divided by it before sampling."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability sums to >= top_p (0 < top_p <= 1)."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 or -1 = off)."""
    seed: int | None = None
    """Seeds row i's generator with ``seed + i``; None = fresh randomness."""
    n: int = 1
    """Rows (choices) sharing the prompt."""
    stop: tuple[str, ...] = ()
    """Stop strings: a row ends once its decoded text contains one (the text is cut before it)."""
    stop_token_ids: tuple[int, ...] = ()
    """Extra token ids that end a row (besides the engine's eos ids)."""
    ignore_eos: bool = False
    """Keep generating past eos (benchmarks)."""
    top_logprobs: int = 0
    """Also return the ``top_logprobs`` most likely tokens (raw log-probs) at every step."""


@dataclass
class GenerationResult:
    """One generated row (one OpenAI choice)."""

    token_ids: list[int]
    """Generated token ids, including the eos / stop-string token that ended the row."""
    logprobs: list[float]
    """Raw model log-prob of each generated token (same length as ``token_ids``)."""
    finish_reason: str
    """``"stop"`` (eos or stop string) or ``"length"`` (hit max_tokens)."""
    policy_version: int
    """The weights version this row was generated with."""
    stop_reason: str | int | None = None
    """The stop string or token id that ended the row (None for eos and length), as vLLM reports it."""
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    """Per step, the (token id, raw log-prob) of the most likely tokens (empty unless asked for)."""


@dataclass
class _Request:
    prompt_ids: list[int]
    params: SamplingParams
    future: concurrent.futures.Future
    submitted: float = field(default_factory=time.monotonic)


@dataclass
class EngineStats:
    """Counters the server reports under ``/metrics``-style keys."""

    batches: int = 0
    rows: int = 0
    generated_tokens: int = 0
    """Tokens of finished batches."""
    decoded_tokens: int = 0
    """Tokens sampled so far, counted at every decoding step (a live count while a batch runs)."""
    max_rows_in_batch: int = 0
    busy_s: float = 0.0
    packs: int = 0
    """Times the weights were packed for MKL's GEMM (once per busy period that ran ``PACK_AFTER_STEPS`` steps)."""
    pack_s: float = 0.0
    """Seconds spent packing (included in ``busy_s``)."""
