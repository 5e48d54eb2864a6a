"""Log-probs of chosen tokens under a causal LM, with the LM head and log-softmax only where they are asked for.

``compute_token_logprobs(model, input_ids, attention_mask, positions=...)`` returns, at each asked position
``t`` of row ``b``, ``log p(input_ids[b, t] | input_ids[b, <t])`` (0 elsewhere). Two ways to run the model:

- ``"prefix"`` (packed): the rows become their prefix tree in one sequence (``gym_plugin.packing``): a prompt
  shared by G samples, and the system prompt shared by every row, is computed once; no padding. The model gets
  a custom 4D attention mask, the tree's positions, and ``logits_to_keep`` = the nodes whose next token is
  asked for, so the LM head runs on those nodes only. Needs a Hugging Face model with SDPA or eager
  attention (those take a custom 4D mask); works through DDP/FSDP wrappers, whose forward passes the
  keyword arguments on (a call that bypassed the wrapper would skip DDP's gradient sync or FSDP's unshard).
- ``"none"`` (padded rows): the classic ``[B, t]`` forward (``trim_padding`` cuts unused columns); the LM
  head runs on the asked columns only when the model takes ``logits_to_keep``, else the model's own logits
  are used. Any module that takes ``input_ids``/``attention_mask`` and returns ``.logits`` works here.

Either way the float32 log-softmax is computed in chunks of ``chunk_size`` positions under activation
checkpointing, so at most one float32 ``[chunk, V]`` block exists beyond the logits themselves.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from gym_plugin.errors import ConfigError, did_you_mean
from gym_plugin.packing import pack_rows

PACKING_MODES = ("auto", "prefix", "none")
_MASKABLE_ATTENTION = ("sdpa", "eager")
"""Attention implementations that apply a custom 4D additive mask as given (flash and flex attention do not)."""


def _accepts(fn: Any, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _inner(model: torch.nn.Module) -> torch.nn.Module:
    from gym_plugin.weight_sync import unwrap_model

    return unwrap_model(model)


def can_pack(model: torch.nn.Module) -> bool:
    """True for (wrapped) Hugging Face causal LMs whose attention takes a custom 4D mask and whose forward takes
    ``position_ids`` and ``logits_to_keep``."""
    inner = _inner(model)
    impl = getattr(getattr(inner, "config", None), "_attn_implementation", None)
    forward = getattr(inner, "forward", None)
    return impl in _MASKABLE_ATTENTION and "logits_to_keep" in inspect.signature(forward).parameters and \
        _accepts(forward, "position_ids")


def resolve_packing(model: torch.nn.Module, packing: str) -> str:
    """``"auto"`` -> ``"prefix"`` when ``can_pack(model)``, else ``"none"``; ConfigError for a model that cannot
    pack when ``"prefix"`` is asked for."""
    if packing not in PACKING_MODES:
        raise ConfigError(f"step.packing={packing!r} is not one of {list(PACKING_MODES)}."
                          f"{did_you_mean(str(packing), PACKING_MODES)}")
    if packing == "auto":
        return "prefix" if can_pack(model) else "none"
    if packing == "prefix" and not can_pack(model):
        inner = _inner(model)
        impl = getattr(getattr(inner, "config", None), "_attn_implementation", None)
        raise ConfigError(
            f"step.packing='prefix' needs a Hugging Face causal LM with attention 'sdpa' or 'eager' (a custom 4D "
            f"mask) and a forward taking logits_to_keep; {type(inner).__name__} has attention {impl!r}. Load it "
            "with attn_implementation='sdpa', or set step.packing=auto (padded rows for such models)."
        )
    return packing


def _lse_chunk(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32)).logsumexp(dim=-1)  # [C]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _lse_of_block(x: torch.Tensor, to_logits, *params: torch.Tensor | None) -> torch.Tensor:
    return _lse_chunk(to_logits(x, *params))  # [C]


def _chunked_lse(
    rows: torch.Tensor, to_logits, params: tuple, chunk_size: int, want_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``rows`` [U, D] -> the log-normalizer [U] (float32 or wider) of ``to_logits(rows, *params)`` [U, V] and the
    entropy [U] of those distributions (no grad) or None, ``chunk_size`` rows at a time. Each chunk's float32
    block is recomputed in backward instead of kept, so at most one [chunk, V] block exists at a time (beyond
    ``rows`` themselves, which are the logits when ``to_logits`` is the identity)."""
    use_checkpoint = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (rows, *params))
    lse_parts, ent_parts = [], []
    for start in range(0, rows.shape[0], chunk_size):
        x = rows[start : start + chunk_size]  # [C, D]
        lse = checkpoint(_lse_of_block, x, to_logits, *params, use_reentrant=False) if use_checkpoint \
            else _lse_of_block(x, to_logits, *params)  # [C]
        lse_parts.append(lse)
        if want_entropy:
            with torch.no_grad():  # reported only
                logits = to_logits(x.detach(), *params).to(lse.dtype)  # [C, V]
                ent_parts.append(lse.detach() - (torch.exp(logits - lse.detach()[:, None]) * logits).sum(dim=-1))
    lse_all = torch.cat(lse_parts) if lse_parts else rows.new_zeros(0, dtype=torch.float32)  # [U]
    return lse_all, (torch.cat(ent_parts) if want_entropy and ent_parts else None)


def _gather_logprobs(
    logits: torch.Tensor, index: torch.Tensor, targets: torch.Tensor, chunk_size: int, want_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``logits`` [U, V] (rows that predict), ``index`` [K] (which row predicts each target), ``targets`` [K]
    -> log-probs [K] (float32 or wider) and the entropy [K] of the predicting distributions (no grad) or None."""
    lse_all, ent = _chunked_lse(logits, _identity, (), chunk_size, want_entropy)  # [U], [U]
    picked = logits[index, targets].to(lse_all.dtype)  # [K]
    return picked - lse_all[index], (ent[index] if ent is not None else None)


def compute_token_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    positions: torch.Tensor | None = None,
    chunk_size: int = 512,
    compute_entropy: bool = False,
    packing: str = "auto",
    trim_padding: bool = True,
    chunked_head: bool = False,
    stats: dict[str, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs of ``input_ids`` under ``model`` where ``positions`` asks for them.

    Args:
        model: a causal LM (or a DDP/FSDP wrapper of one); see the module docstring for the two paths.
        input_ids: [B, T] int64; left or right padded (each row's real tokens contiguous).
        attention_mask: [B, T] 1 on real tokens.
        positions: [B, T] bool, the tokens whose log-prob is wanted (default: every token that has a real
            predecessor). Only those positions cost an LM head row.
        chunk_size: positions per float32 log-softmax block.
        compute_entropy: also return the entropy of the distribution that predicted each asked token.
        packing: ``"auto"``, ``"prefix"`` or ``"none"`` (module docstring).
        trim_padding: padded path only: run the model on the columns the rows use.
        chunked_head: packed path, a model not sharded by FSDP: the model returns its last hidden states and the
            LM head runs here, ``chunk_size`` positions at a time under checkpointing, so neither the [U, V]
            logits nor their gradient exist at once (checked on every call against one row of the model's own
            logits: a model whose logits are not ``lm_head(last hidden state)`` raises ConfigError).
        stats: if given, ``stats["forward_tokens"]`` is increased by the tokens the model ran on (packed nodes,
            or padded rows x columns).

    Returns:
        logprobs [B, T] (0 where not asked, at t = 0 and where the predecessor is padding) and entropy [B, T]
        (same zeros) or None.
    """
    device = input_ids.device
    real = attention_mask.to(device).bool()  # [B, T]
    valid = torch.zeros_like(real)
    valid[:, 1:] = real[:, 1:] & real[:, :-1]  # [B, T] token and its predecessor are real
    want = valid if positions is None else valid & positions.to(device).bool()  # [B, T]
    rows, cols = torch.nonzero(want, as_tuple=True)  # [K], [K]
    targets = input_ids[rows, cols]  # [K]
    mode = resolve_packing(model, packing)
    if mode == "prefix" and rows.numel():
        lp_k, ent_k, ran = _packed(model, input_ids, real, rows, cols, targets, chunk_size, compute_entropy,
                                   chunked_head)
    else:
        lp_k, ent_k, ran = _padded(model, input_ids, real, rows, cols, targets, chunk_size, compute_entropy,
                                   trim_padding)
    if stats is not None:
        stats["forward_tokens"] = stats.get("forward_tokens", 0.0) + float(ran)
    logprobs = torch.zeros(input_ids.shape, dtype=lp_k.dtype, device=device).index_put((rows, cols), lp_k)  # [B, T]
    entropy = None
    if compute_entropy:
        entropy = torch.zeros(input_ids.shape, dtype=lp_k.dtype, device=device)
        if ent_k is not None:
            entropy = entropy.index_put((rows, cols), ent_k.to(lp_k.dtype))
    return logprobs, entropy


def _packed(model, input_ids, real, rows, cols, targets, chunk_size, want_entropy, chunked_head=False):
    """Prefix-tree path: one forward of the packed rows, LM head on the nodes that predict an asked token."""
    device = input_ids.device
    lengths = real.sum(dim=1)  # [B]
    starts = real.to(torch.int8).argmax(dim=1)  # [B] first real column (first maximum)
    ids_cpu, starts_cpu, lengths_cpu = input_ids.cpu().numpy(), starts.cpu().tolist(), lengths.cpu().tolist()
    # rows without an asked token still take part (they may share a prefix); empty rows cannot
    tokens = [ids_cpu[b, s : s + n] if n else np.zeros(1, dtype=np.int64) for b, (s, n) in
              enumerate(zip(starts_cpu, lengths_cpu))]
    packed = pack_rows(tokens)
    token_index = cols - starts[rows]  # [K] index of each asked token within its row's real tokens (>= 1)
    predictor = packed.node_of.to(device)[rows, token_index - 1]  # [K] node whose next token is asked
    keep, index = torch.unique(predictor, return_inverse=True)  # [U], [K]
    dtype = next(_inner(model).parameters()).dtype
    head = _output_head(model) if chunked_head else None
    out = model(
        input_ids=packed.input_ids.to(device),
        position_ids=packed.position_ids.to(device),
        attention_mask=packed.additive_mask(dtype, device),
        logits_to_keep=keep if head is None else keep[:1],  # chunked: one row, to check the head against
        use_cache=False,
        output_hidden_states=head is not None,
    )
    if head is not None:
        hidden = out.hidden_states[-1][0, keep]  # [U, H] the final (normed) hidden state of each kept node
        _check_head(head, hidden[:1], out.logits[0, :1])
        return (*_gather_logprobs_from_hidden(hidden, head, index, targets, chunk_size, want_entropy),
                packed.num_nodes)
    logits = out.logits[0]  # [U, V]
    return (*_gather_logprobs(logits, index, targets, chunk_size, want_entropy), packed.num_nodes)


def _output_head(model: torch.nn.Module) -> torch.nn.Linear:
    """The model's LM head as a Linear, for the chunked path (ConfigError where it cannot be used)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        FSDPModule = ()  # noqa: N806
    if any(isinstance(m, FSDPModule) for m in (model, _inner(model))):
        raise ConfigError("step.chunked_lm_head=true does not work with distributed.strategy=fsdp (the LM head's "
                          "parameters are sharded outside the model's forward); set step.chunked_lm_head=false.")
    inner = _inner(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        raise ConfigError(f"step.chunked_lm_head=true needs a Hugging Face causal LM whose output embedding is a "
                          f"Linear; {type(inner).__name__} has {type(head).__name__}. Set step.chunked_lm_head=false.")
    return head


def _check_head(head: torch.nn.Linear, hidden: torch.Tensor, logits: torch.Tensor) -> None:
    """``head(hidden)`` [1, V] must be the model's own ``logits`` [1, V] (no soft-capping, scaling, ...)."""
    with torch.no_grad():
        mine = head(hidden).float()
        theirs = logits.detach().float()
        tol = 1e-3 * float(theirs.abs().max()) + 1e-4
        if mine.shape != theirs.shape or float((mine - theirs).abs().max()) > tol:
            raise ConfigError("step.chunked_lm_head=true: this model's logits are not its LM head applied to its "
                              "last hidden state (e.g. soft-capped or scaled logits), so the head cannot run in "
                              "chunks here; set step.chunked_lm_head=false.")


def _gather_logprobs_from_hidden(
    hidden: torch.Tensor, head: torch.nn.Linear, index: torch.Tensor, targets: torch.Tensor, chunk_size: int,
    want_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``_gather_logprobs`` with the LM head inside: ``hidden`` [U, H] -> log-probs [K] and entropy [K] or None.
    The logit of each target is a dot product (no [U, V] block); the log-normalizer runs per chunk of positions,
    head included, recomputed in backward, so at most one [chunk, V] block of logits (and its gradient) exists."""
    weight, bias = head.weight, head.bias
    lse_all, ent = _chunked_lse(hidden, torch.nn.functional.linear, (weight, bias), chunk_size, want_entropy)
    picked = (hidden[index] * weight[targets]).sum(dim=-1)  # [K] the targets' logits
    if bias is not None:
        picked = picked + bias[targets]
    return picked.to(lse_all.dtype) - lse_all[index], (ent[index] if ent is not None else None)


def _padded(model, input_ids, real, rows, cols, targets, chunk_size, want_entropy, trim_padding):
    """Padded-rows path: [B, t] forward; LM head on the asked columns when the model takes logits_to_keep."""
    first, last = 0, input_ids.shape[1] - 1
    if trim_padding:
        used = torch.nonzero(real.any(dim=0)).squeeze(1)  # [t] columns some row uses
        if used.numel():
            first, last = int(used[0]), int(used[-1])
    ids = input_ids[:, first : last + 1]  # [B, t]
    attn = real[:, first : last + 1].long()  # [B, t]
    position_ids = (attn.cumsum(dim=-1) - 1).clamp(min=0)  # [B, t] real tokens only: left padding does not shift
    inner = _inner(model)
    kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": attn}
    if _accepts(inner.forward, "position_ids"):
        kwargs["position_ids"] = position_ids
    predictor_col = cols - 1 - first  # [K] column (in the trimmed block) that predicts each asked token
    takes_keep = "logits_to_keep" in inspect.signature(inner.forward).parameters
    if takes_keep:
        keep, col_index = torch.unique(predictor_col, return_inverse=True)  # [U], [K]
        kwargs["logits_to_keep"] = keep
        kwargs["use_cache"] = False
    out = model(**kwargs)
    logits = out.logits if hasattr(out, "logits") else out  # [B, U or t, V]
    width = logits.shape[1]
    flat = logits.reshape(-1, logits.shape[-1])  # [B * width, V]
    index = rows * width + (col_index if takes_keep else predictor_col)  # [K]
    # only the positions that predict an asked token go through the log-softmax
    keep_rows, index = torch.unique(index, return_inverse=True)  # [U'], [K]
    return (*_gather_logprobs(flat[keep_rows], index, targets, chunk_size, want_entropy), ids.numel())
