"""process_rollouts(): rollouts in the Gym wire format -> a padded ``RolloutBatch`` of tensors.

A rollout's ``response.output`` holds one token-carrying item per model call (the last item of the call)
with ``prompt_token_ids`` (the call's whole prompt), ``generation_token_ids`` and ``generation_log_probs``.
A multi-turn rollout becomes one training row without re-tokenizing anything the model produced:

    row = prompt_0 + gen_0 + (prompt_1 - prompt_0 - gen_0) + gen_1 + ...
    mask   0         1        0 (tool output, scaffolding)    1

which is only valid when each call's prompt starts with everything seen before it. When it does not
(chat-template drift, e.g. a template that drops earlier reasoning) the rollout is never trained on as if it
did: ``drift_policy`` splits it into one row per contiguous segment (``"split"``), keeps the last model call
only (``"last_turn"``) or drops it (``"drop"``), and ``rollout/drift_count`` counts it.

Choices worth knowing:
- Failure records (``record["failure"]`` not None, or ``reward`` None) and verifier ``mask_sample: true``
  rows are left out of the batch and counted (``rollout/num_failed``, ``rollout/num_masked``). Group
  advantages are computed over the rollouts that remain, one vote per rollout (the rows of a split rollout
  share its advantage).
- Rows longer than ``max_seq_len`` are cut at the end (the prompt stays, the tail of the generation goes) and
  kept with ``sample_mask`` 0 (the issue's rule: a truncated sequence is not trained on), unless
  ``train_on_truncated=True``. Their reward still counts in their group's statistics: it is a real outcome.
- A model call marked ``constrained: true`` (sampled under ``tool_choice: "required"``, a named tool, a response
  format or a grammar) reports log-probs of the constrained distribution, not of the policy: by default
  (``constrained_policy="mask"``) its tokens stay in the row as context with ``loss_mask`` 0; ``"drop"`` leaves
  the whole rollout out, ``"train"`` trains on them anyway. ``rollout/num_constrained_calls`` and
  ``rollout/num_constrained_rollouts`` count them.
- ``loss_mask`` is 1 only on sampled tokens, whatever ``sample_mask`` says; the trainer multiplies the two
  (``RolloutBatch.train_mask()``). ``attention_mask`` comes from the row lengths, never from ``!= pad_id``
  (the pad id is often also a real token, e.g. eos).

The hot path is vectorized with numpy: per row, two Python-list -> array conversions (the last call's
prompt and generation, which together are the whole row once the prefix checks passed), per call one list
slice comparison (C speed), and one fancy-indexing scatter into the padded [B, T] arrays.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from gym_plugin.advantages import ADVANTAGE_MODES, compute_advantages, zero_variance_members
from gym_plugin.errors import ConfigError, ProtocolError, did_you_mean
from gym_plugin.protocol import DRIFT, splice_offsets

DRIFT_POLICIES = ("split", "last_turn", "drop")
CONSTRAINED_POLICIES = ("mask", "drop", "train")
MISSING_TOKENS_POLICIES = ("exclude", "retokenize")
PADDING_SIDES = ("right", "left")
_TOKEN_FIELDS = ("prompt_token_ids", "generation_token_ids", "generation_log_probs")


@dataclasses.dataclass
class RolloutBatch:
    """A batch of training rows. ``B`` rows (a rollout may give several rows, see ``drift_policy``), ``T``
    padded tokens. Position ``t`` of ``rollout_logprobs`` is the sampler's log-prob of ``input_ids[:, t]``."""

    input_ids: torch.Tensor
    """[B, T] int64 token ids; padding holds the tokenizer's pad id."""
    attention_mask: torch.Tensor
    """[B, T] int64, 1 on real tokens (from row lengths, not from the pad id)."""
    loss_mask: torch.Tensor
    """[B, T] float32, 1 only on tokens the policy sampled (generation tokens), 0 on prompt, tool output,
    template scaffolding and padding."""
    rollout_logprobs: torch.Tensor
    """[B, T] float32 log-probs the sampler reported for each sampled token; 0 where ``loss_mask`` is 0 (and
    on re-tokenized rows, which have none)."""
    rewards: torch.Tensor
    """[B] float32 reward of the rollout the row comes from."""
    advantages: torch.Tensor
    """[B] float32 group-relative advantage of the rollout the row comes from (raw reward when
    ``advantage_mode`` is None)."""
    group_ids: torch.Tensor
    """[B] int64 group of the row (rollouts of the same prompt share it), compacted to 0..G-1."""
    sample_mask: torch.Tensor
    """[B] float32, 0 for rows not to train on (truncated by ``max_seq_len``, zero-variance group filtered)."""
    rollout_index: torch.Tensor
    """[B] int64 position in the input ``rollouts`` list of the rollout each row comes from."""
    retokenized: torch.Tensor
    """[B] bool, True for rows rebuilt with the chat template (``missing_tokens_policy="retokenize"``)."""
    num_trained_tokens: int
    """Sum of ``loss_mask * sample_mask``: the tokens the loss is normalized by."""
    metrics: dict[str, float]
    """``rollout/...`` metrics: counts, lengths, truncation, drift, reward and group statistics."""

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def train_mask(self) -> torch.Tensor:
        """[B, T] float32 ``loss_mask * sample_mask``: the tokens the loss trains on."""
        return self.loss_mask * self.sample_mask[:, None]

    def to(self, device: torch.device | str) -> RolloutBatch:
        """A copy with every tensor on ``device``."""
        moved = {
            f.name: (v.to(device) if isinstance(v, torch.Tensor) else v)
            for f in dataclasses.fields(self)
            for v in [getattr(self, f.name)]
        }
        return RolloutBatch(**moved)

    def select(self, rows: slice | torch.Tensor) -> RolloutBatch:
        """The rows ``rows`` (a slice or an index tensor) as a new batch; ``T`` unchanged, metrics shared,
        ``num_trained_tokens`` recounted for the selection."""
        picked = {
            f.name: (v[rows] if isinstance(v, torch.Tensor) else v)
            for f in dataclasses.fields(self)
            for v in [getattr(self, f.name)]
        }
        sub = RolloutBatch(**picked)
        sub.num_trained_tokens = int(sub.train_mask().sum().item())
        return sub


def _is_failure(record: Mapping[str, Any]) -> bool:
    """The collector's failure test (docs/architecture.md): a record with a non-None ``failure``."""
    return record.get("failure") is not None


def _as_dict(rollout: Any, index: int) -> Mapping[str, Any]:
    if type(rollout) is dict or isinstance(rollout, Mapping):  # exact-type test first: ABC checks are slow
        return rollout
    to_dict = getattr(rollout, "to_dict", None)
    if callable(to_dict):
        return to_dict()
    raise ProtocolError(
        f"rollouts[{index}] is a {type(rollout).__name__}, not a dict in the Gym wire format. Pass the records "
        "the collector yields (dicts with 'response' and 'reward'), or objects with a .to_dict()."
    )


def _model_calls(record: Mapping[str, Any], constrained: list[int] | None = None) -> list[tuple[list, list, list]] | str:
    """The (prompt_token_ids, generation_token_ids, generation_log_probs) of each model call, in order, or a
    reason string when the rollout cannot be used as is ("missing" / "malformed"). The indices of calls marked
    ``constrained`` are appended to ``constrained``."""
    response = record.get("response")
    output = response.get("output") if type(response) is dict or isinstance(response, Mapping) else None
    if not output:
        return "missing"
    calls = []
    for item in output:
        if type(item) is not dict and not isinstance(item, Mapping):
            return "malformed"
        gen = item.get("generation_token_ids")
        if gen is None:
            if item.get("prompt_token_ids") is None and item.get("generation_log_probs") is None:
                continue  # tool outputs, reasoning, earlier items of the same model call carry no tokens
            return "malformed"
        prompt = item.get("prompt_token_ids")
        lps = item.get("generation_log_probs")
        if prompt is None or lps is None or len(gen) != len(lps):
            return "malformed"  # the protocol says all three or none, with one log-prob per token
        if constrained is not None and item.get("constrained"):
            constrained.append(len(calls))
        calls.append((prompt, gen, lps))
    return calls if calls else "missing"


def _segments(offsets: list[int]) -> list[list[int]]:
    """Split the call indices into maximal runs where each prompt extends the previous prompt + generation
    (``offsets`` from `gym_plugin.protocol.splice_offsets`, the splice shared with the NeMo-RL message logs)."""
    segments = [[0]]
    for k in range(1, len(offsets)):
        if offsets[k] == DRIFT:
            segments.append([k])
        else:
            segments[-1].append(k)
    return segments


def _messages_for_retokenize(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The conversation of a rollout as chat messages: the request's input, then the output items."""
    params = record.get("responses_create_params") or {}
    raw_input = params.get("input", [])
    if isinstance(raw_input, str):
        raw_input = [{"role": "user", "content": raw_input}]
    messages: list[dict[str, Any]] = []
    for item in list(raw_input) + list((record.get("response") or {}).get("output") or []):
        kind = item.get("type", "message")
        if kind == "message":
            content = item.get("content", "")
            if isinstance(content, list):  # Responses content parts: keep their text
                content = "".join(part.get("text", "") for part in content if isinstance(part, Mapping))
            messages.append({"role": item.get("role", "assistant"), "content": content})
        elif kind == "function_call":
            call = {"type": "function", "function": {"name": item.get("name"), "arguments": item.get("arguments")}}
            if messages and messages[-1]["role"] == "assistant" and "tool_calls" in messages[-1]:
                messages[-1]["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append({"role": "tool", "content": str(item.get("output", "")), "tool_call_id": item.get("call_id")})
        # reasoning items: templates differ on whether they render them; left out (the row is flagged anyway)
    return messages


def _retokenized_calls(record: Mapping[str, Any], tokenizer: Any) -> list[tuple[list, list, list]] | None:
    """Pseudo model calls rebuilt with the chat template: one per assistant message, prompt = the messages
    before it rendered with the generation prompt, generation = what rendering the message adds. Log-probs
    are zeros (unknown). None when the template does not extend its own renderings (cannot mask safely)."""
    messages = _messages_for_retokenize(record)
    tools = (record.get("responses_create_params") or {}).get("tools")
    kwargs = {"tools": tools} if tools else {}

    def render(msgs: list[dict[str, Any]], add_generation_prompt: bool) -> list[int]:
        ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt, tokenize=True, **kwargs)
        if isinstance(ids, Mapping):  # transformers 5 returns a BatchEncoding by default
            ids = ids["input_ids"]
        return list(ids)

    calls = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(messages[:i], True)
        full = render(messages[: i + 1], False)
        if full[: len(prompt)] != prompt:
            return None
        gen = full[len(prompt) :]
        calls.append((prompt, gen, [0.0] * len(gen)))
    return calls or None


def _concat_lists(lists: list[list], dtype: type) -> np.ndarray:
    """One flat array from Python lists, converting each with ``np.fromiter`` (no intermediate list)."""
    arrays = [np.fromiter(values, dtype=dtype, count=len(values)) for values in lists if len(values)]
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype=dtype)


def _group_key(record: Mapping[str, Any], group_key: str, index: int) -> Any:
    if group_key not in record:
        raise ProtocolError(
            f"rollouts[{index}] has no {group_key!r} to group it by (keys: {sorted(record)[:12]}). Pass "
            "group_ids=[...] (one per rollout), set group_key to a key every rollout has, or collect with the "
            "gym_plugin collector, which adds '_ng_task_index'."
        )
    return record[group_key]


def _check_options(
    padding_side: str, drift_policy: str, missing_tokens_policy: str, advantage_mode: str | None,
    pad_to_multiple_of: int | None, max_seq_len: int | None, constrained_policy: str = "mask",
) -> None:
    problems = []
    for name, value, choices in (
        ("padding_side", padding_side, PADDING_SIDES),
        ("drift_policy", drift_policy, DRIFT_POLICIES),
        ("missing_tokens_policy", missing_tokens_policy, MISSING_TOKENS_POLICIES),
        ("constrained_policy", constrained_policy, CONSTRAINED_POLICIES),
    ):
        if value not in choices:
            problems.append(f"{name}={value!r} is not one of {list(choices)}.{did_you_mean(str(value), choices)}")
    if advantage_mode is not None and advantage_mode not in ADVANTAGE_MODES:
        problems.append(
            f"advantage_mode={advantage_mode!r} is not one of {list(ADVANTAGE_MODES)} or None."
            f"{did_you_mean(str(advantage_mode), ADVANTAGE_MODES)}"
        )
    for name, value in (("pad_to_multiple_of", pad_to_multiple_of), ("max_seq_len", max_seq_len)):
        if value is not None and (not isinstance(value, int) or value < 1):
            problems.append(f"{name}={value!r} must be a positive int or None.")
    if problems:
        raise ConfigError(problems)


def process_rollouts(
    rollouts: Sequence[Any],
    tokenizer: Any = None,
    *,
    pad_token_id: int | None = None,
    padding_side: str = "right",
    pad_to_multiple_of: int | None = None,
    max_seq_len: int | None = None,
    train_on_truncated: bool = False,
    drift_policy: str = "split",
    missing_tokens_policy: str = "exclude",
    advantage_mode: str | None = "grpo",
    group_key: str = "_ng_task_index",
    group_ids: Sequence[Any] | None = None,
    filter_zero_variance: bool = False,
    advantage_eps: float = 1e-6,
    constrained_policy: str = "mask",
) -> RolloutBatch:
    """Turn collected rollouts into a padded ``RolloutBatch``.

    Args:
        rollouts: records in the Gym wire format (dicts with ``response.output`` and ``reward``; failure
            records allowed), or objects with ``.to_dict()``.
        tokenizer: supplies ``pad_token_id`` (unless given) and, for ``missing_tokens_policy="retokenize"``,
            ``apply_chat_template``. Model output is never re-tokenized otherwise.
        pad_token_id: the pad id; defaults to ``tokenizer.pad_token_id`` (then ``eos_token_id``).
        padding_side: ``"right"`` (default) or ``"left"``.
        pad_to_multiple_of: round ``T`` up to a multiple of this.
        max_seq_len: cut rows longer than this at the end; such rows get ``sample_mask`` 0.
        train_on_truncated: keep ``sample_mask`` 1 on rows cut by ``max_seq_len``.
        drift_policy: what to do with a rollout whose later prompt does not extend the earlier tokens:
            ``"split"`` (one row per contiguous segment), ``"last_turn"`` (the last model call only),
            ``"drop"``.
        missing_tokens_policy: rollouts without token ids: ``"exclude"`` (counted) or ``"retokenize"`` (rebuilt
            with the chat template, zero rollout log-probs, flagged in ``retokenized``).
        advantage_mode: ``"grpo"``, ``"dr_grpo"``, ``"rloo"`` or None (advantage = reward).
        group_key: record key whose value groups rollouts of the same prompt.
        group_ids: explicit group of each rollout (same length as ``rollouts``), overrides ``group_key``.
        filter_zero_variance: ``sample_mask`` 0 on rows of groups whose rewards are all equal.
        advantage_eps: added to the group std in ``"grpo"`` mode.
        constrained_policy: model calls marked ``constrained`` (log-probs of a grammar-constrained
            distribution): ``"mask"`` (kept as context, not trained on), ``"drop"`` (the rollout is left out),
            ``"train"`` (trained on like any call).
    """
    _check_options(padding_side, drift_policy, missing_tokens_policy, advantage_mode, pad_to_multiple_of, max_seq_len,
                   constrained_policy)
    if group_ids is not None and len(group_ids) != len(rollouts):
        raise ConfigError(
            f"group_ids has {len(group_ids)} entries but there are {len(rollouts)} rollouts; pass one group id "
            "per rollout (or leave group_ids None to group by group_key)."
        )
    if pad_token_id is None:
        pad_token_id = getattr(tokenizer, "pad_token_id", None)
        if pad_token_id is None:
            pad_token_id = getattr(tokenizer, "eos_token_id", None)
        if pad_token_id is None:
            raise ConfigError(
                "process_rollouts needs a pad id: pass pad_token_id=..., or a tokenizer whose pad_token_id "
                f"(or eos_token_id) is set (got tokenizer={type(tokenizer).__name__})."
            )

    counts = dict.fromkeys(
        ("failed", "masked", "missing", "malformed", "retokenized", "drift", "drift_dropped", "incomplete",
         "constrained_calls", "constrained_rollouts", "constrained_dropped"), 0
    )
    mask_constrained = constrained_policy == "mask"
    # Per kept rollout (vote once in its group):
    kept_rewards: list[float] = []
    kept_groups: list[Any] = []
    # Per row: the lists that, concatenated, are the row's ids; mask piece lengths/values; log-prob lists.
    row_id_sources: list[list] = []
    row_lengths: list[int] = []
    row_of_rollout: list[int] = []  # index into kept_* of each row
    row_source_index: list[int] = []
    row_retokenized: list[bool] = []
    piece_lengths: list[int] = []
    piece_values: list[int] = []
    logprob_sources: list[list] = []

    for index, raw in enumerate(rollouts):
        record = _as_dict(raw, index)
        if _is_failure(record) or record.get("reward") is None:
            counts["failed"] += 1
            continue
        if record.get("mask_sample"):
            counts["masked"] += 1
            continue
        constrained: list[int] = []
        calls = _model_calls(record, constrained)
        retokenized = False
        if isinstance(calls, str):
            counts[calls] += 1
            if missing_tokens_policy != "retokenize":
                continue
            if tokenizer is None or not hasattr(tokenizer, "apply_chat_template"):
                raise ConfigError(
                    f"missing_tokens_policy='retokenize' needs a tokenizer with apply_chat_template (rollouts[{index}] "
                    f"has no token ids; got tokenizer={type(tokenizer).__name__}). Pass the policy's tokenizer or "
                    "use missing_tokens_policy='exclude'."
                )
            calls = _retokenized_calls(record, tokenizer)
            if calls is None:
                continue  # counted as missing/malformed; the template cannot be masked safely
            counts["retokenized"] += 1
            retokenized = True
            constrained.clear()  # indices of a record that could not be read; rebuilt calls carry no marks
        if constrained:
            counts["constrained_calls"] += len(constrained)
            counts["constrained_rollouts"] += 1
            if constrained_policy == "drop":
                counts["constrained_dropped"] += 1
                continue

        offsets = splice_offsets(calls)
        segments = _segments(offsets)
        if len(segments) > 1:
            counts["drift"] += 1
            if drift_policy == "drop":
                counts["drift_dropped"] += 1
                continue
            if drift_policy == "last_turn":
                segments = [[len(calls) - 1]]

        if group_ids is not None:
            group = group_ids[index]
        else:
            group = record[group_key] if group_key in record else _group_key(record, group_key, index)
        if (record.get("response") or {}).get("incomplete_details"):
            counts["incomplete"] += 1  # the sampler stopped on a length limit (kept; the verifier judged it)
        kept_index = len(kept_rewards)
        kept_rewards.append(float(record["reward"]))
        kept_groups.append(group)
        for segment in segments:
            last_prompt, last_gen, _ = calls[segment[-1]]
            # Prefix checks passed, so the row is exactly the last call's prompt + generation.
            row_id_sources.append(last_prompt)
            row_id_sources.append(last_gen)
            row_lengths.append(len(last_prompt) + len(last_gen))
            row_of_rollout.append(kept_index)
            row_source_index.append(index)
            row_retokenized.append(retokenized)
            for k in segment:
                prompt, gen, lps = calls[k]
                # Context since the last generation (the whole prompt for a segment's first call; then tool
                # output / template scaffolding): prompt[offset:], never trained.
                context = len(prompt) - (offsets[k] if k != segment[0] else 0)
                if context:
                    piece_lengths.append(context)
                    piece_values.append(0)
                piece_lengths.append(len(gen))
                if mask_constrained and constrained and k in constrained:
                    piece_values.append(0)  # sampled under a grammar: context, not a policy sample
                else:
                    piece_values.append(1)
                    logprob_sources.append(lps)

    num_rows = len(row_lengths)
    num_kept = len(kept_rewards)
    if num_rows == 0:
        raise ProtocolError(
            f"no usable rollout among {len(rollouts)}: {counts['failed']} failed, {counts['masked']} masked by the "
            f"verifier, {counts['missing']} without token ids, {counts['malformed']} malformed, "
            f"{counts['drift_dropped']} dropped for chat-template drift, {counts['constrained_dropped']} dropped as "
            "constrained (constrained_policy='drop'). Check the collector's failure records; "
            "for rollouts without token ids use a policy server that returns them, or "
            "missing_tokens_policy='retokenize'."
        )

    # ---- flat token arrays (row after row) -------------------------------------------------------------
    lengths = np.asarray(row_lengths, dtype=np.int64)  # [B]
    total = int(lengths.sum())
    # np.fromiter with a count is the fastest list -> array conversion measured here (~55 M values/s).
    flat_ids = _concat_lists(row_id_sources, np.int64)  # [N]
    flat_mask = np.repeat(np.asarray(piece_values, dtype=np.int8), np.asarray(piece_lengths, dtype=np.int64))  # [N]
    assert flat_mask.shape[0] == total, "mask pieces must tile the rows exactly"
    lp_values = _concat_lists(logprob_sources, np.float32)  # [S] one per sampled token, in flat order

    # ---- truncation --------------------------------------------------------------------------------------
    # Rows are laid out by boolean masks over [B, T] (row-major order = the flat order): no per-token index
    # arrays, and boolean assignment is cheaper than fancy indexing.
    truncated = np.zeros(num_rows, dtype=bool)
    if max_seq_len is not None and total and int(lengths.max()) > max_seq_len:
        truncated = lengths > max_seq_len
        columns = np.arange(int(lengths.max()))  # [L]
        full_layout = columns[None, :] < lengths[:, None]  # [B, L] where the untruncated tokens sit
        keep = np.broadcast_to(columns[None, :] < max_seq_len, full_layout.shape)[full_layout]  # [N] token within the first max_seq_len of its row
        lp_values = lp_values[keep[flat_mask.view(bool)]]
        flat_ids, flat_mask = flat_ids[keep], flat_mask[keep]
        lengths = np.minimum(lengths, max_seq_len)

    # ---- scatter into [B, T] -----------------------------------------------------------------------------
    width = int(lengths.max()) if num_rows else 0
    if pad_to_multiple_of:
        width = int(math.ceil(width / pad_to_multiple_of) * pad_to_multiple_of)
    columns = np.arange(width)  # [T]
    if padding_side == "left":
        layout = columns[None, :] >= (width - lengths)[:, None]  # [B, T]
    else:
        layout = columns[None, :] < lengths[:, None]  # [B, T]
    input_ids = np.full((num_rows, width), pad_token_id, dtype=np.int64)
    input_ids[layout] = flat_ids
    attention = layout.astype(np.int64)
    sampled = np.zeros((num_rows, width), dtype=bool)  # [B, T] model-sampled tokens
    sampled[layout] = flat_mask.view(bool)
    loss_mask = sampled.astype(np.float32)  # a contiguous cast is cheaper than a float boolean scatter
    rollout_lp = np.zeros((num_rows, width), dtype=np.float32)
    rollout_lp[sampled] = lp_values  # sampled tokens in row-major order = the order of lp_values

    # ---- rewards, groups, advantages (per kept rollout, then broadcast to its rows) ------------------------
    rewards_k = torch.tensor(kept_rewards, dtype=torch.float32)  # [K]
    if all(isinstance(g, (int, np.integer)) and not isinstance(g, bool) for g in kept_groups):
        raw_groups = np.asarray(kept_groups, dtype=np.int64)
    else:
        raw_groups = np.asarray([repr(g) for g in kept_groups])
    _, compact = np.unique(raw_groups, return_inverse=True)
    groups_k = torch.from_numpy(compact.astype(np.int64).reshape(-1))  # [K]
    if advantage_mode is None:
        adv_k = rewards_k.clone()  # raw reward: the caller brings its own baseline
        _, adv_metrics = compute_advantages(rewards_k, groups_k, mode="dr_grpo", eps=advantage_eps)
    else:
        adv_k, adv_metrics = compute_advantages(rewards_k, groups_k, mode=advantage_mode, eps=advantage_eps)
    zero_var_k = zero_variance_members(rewards_k, groups_k)  # [K] bool

    row_kept = torch.as_tensor(np.asarray(row_of_rollout, dtype=np.int64))  # [B]
    sample_mask = torch.ones(num_rows, dtype=torch.float32)
    truncated_t = torch.from_numpy(truncated)
    if not train_on_truncated:
        sample_mask[truncated_t] = 0.0
    if filter_zero_variance:
        sample_mask[zero_var_k[row_kept]] = 0.0

    loss_mask_t = torch.from_numpy(loss_mask)
    # Row sums from the flat pieces (numpy, no [B, T] pass): generated tokens per row.
    gen_lens = np.zeros(num_rows, dtype=np.int64)  # [B] generated tokens per row, from the flat mask
    if flat_mask.size:
        row_starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        nonempty = lengths > 0  # reduceat would return the next row's first element for an empty row
        gen_lens[nonempty] = np.add.reduceat(flat_mask, row_starts[nonempty], dtype=np.int64)
    num_trained = int((gen_lens * sample_mask.numpy()).sum())
    seq_lens = lengths.astype(np.float64)
    metrics: dict[str, float] = {
        "rollout/num_rollouts": float(len(rollouts)),
        "rollout/num_kept": float(num_kept),
        "rollout/num_rows": float(num_rows),
        "rollout/num_failed": float(counts["failed"]),
        "rollout/num_masked": float(counts["masked"]),
        "rollout/num_missing_tokens": float(counts["missing"]),
        "rollout/num_malformed": float(counts["malformed"]),
        "rollout/num_retokenized": float(counts["retokenized"]),
        "rollout/drift_count": float(counts["drift"]),
        "rollout/num_drift_dropped": float(counts["drift_dropped"]),
        "rollout/num_constrained_calls": float(counts["constrained_calls"]),
        "rollout/num_constrained_rollouts": float(counts["constrained_rollouts"]),
        "rollout/num_constrained_dropped": float(counts["constrained_dropped"]),
        "rollout/num_truncated": float(truncated.sum()),
        "rollout/num_incomplete": float(counts["incomplete"]),
        "rollout/truncated_frac": float(truncated.mean()),
        "rollout/num_trained_tokens": float(num_trained),
        "rollout/seq_len_mean": float(seq_lens.mean()),
        "rollout/seq_len_max": float(seq_lens.max()),
        "rollout/seq_len_min": float(seq_lens.min()),
        "rollout/gen_len_mean": float(gen_lens.mean()),
        "rollout/pad_frac": float(1.0 - seq_lens.sum() / max(num_rows * width, 1)),
        "rollout/reward_mean": float(rewards_k.mean()),
        "rollout/reward_std": float(rewards_k.std(unbiased=False)),
        "rollout/reward_min": float(rewards_k.min()),
        "rollout/reward_max": float(rewards_k.max()),
        "rollout/num_zero_variance_filtered": float(zero_var_k[row_kept].sum()) if filter_zero_variance else 0.0,
    }
    metrics.update(adv_metrics)

    return RolloutBatch(
        input_ids=torch.from_numpy(input_ids),
        attention_mask=torch.from_numpy(attention),
        loss_mask=loss_mask_t,
        rollout_logprobs=torch.from_numpy(rollout_lp),
        rewards=rewards_k[row_kept],
        advantages=adv_k[row_kept].to(torch.float32),
        group_ids=groups_k[row_kept],
        sample_mask=sample_mask,
        rollout_index=torch.as_tensor(np.asarray(row_source_index, dtype=np.int64)),
        retokenized=torch.as_tensor(np.asarray(row_retokenized, dtype=bool)),
        num_trained_tokens=num_trained,
        metrics=metrics,
    )
