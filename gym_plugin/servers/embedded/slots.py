"""Forward passes of a Llama-layout causal LM over per-slot KV buffers (the continuous-batching engine's model).

The engine keeps one KV buffer per layer, ``[S, Hkv, C, D]``: S slots (one generated row each), C positions.
Active rows occupy slots ``0 .. B-1`` (the engine moves a row into the hole a finished one leaves), so a
forward over rows ``slot0 .. slot0 + B`` reads the KV as a view ``buf[slot0 : slot0 + B, :, :L]``: nothing is
gathered or concatenated per step. Each row has its own length; a row's new keys/values are written at its own
positions and a boolean mask lets each query see only its row's positions up to its own.

Why a forward of our own rather than transformers' ``model.forward``: the HF path builds a 4-D mask per call
and, with a mask, repeats every KV head for the grouped query heads (``repeat_kv``: a copy of the whole cache
at every layer of every step, which is why long answers ran at a third of the machine's limit), and it has no
notion of rows of different lengths joining a running batch. Here the grouped query heads are folded into the
query axis (``[B, Hkv, G*T, D]``), so attention reads each KV head once, and the LM head runs only at the last
position of each row. The weights are the model's own parameters, so a weight update, shared weights or a
trainer stepping them in place are seen at once.

Where the layers have the usual layout (fp32 on the CPU, ``torch.nn.Linear`` projections, a SiLU-gated MLP, RMS
norms: ``layers_unsupported_reason``), a forward runs all of them in one call of a function compiled by
TorchScript (``_plain_layers``, or ``_packed_layers`` from packed weights), its parameters listed once per busy
period (``release`` drops the list); otherwise (another norm or activation, a projection wrapped by an adapter,
bf16, a GPU) it calls the modules one by one. Same ops, same bits.

Supported: ``LlamaForCausalLM`` and the same layout (Mistral without sliding window, Qwen2 with its q/k/v
biases); ``unsupported_reason`` says why another model is not (the engine then uses the batch-at-a-time path).

Packed weights (``pack``): on the CPU in fp32 with MKL, the linear layers can also run from a copy of their
weights in MKL's packed GEMM layout (``torch.ops.mkl._mkl_reorder_linear_weight`` / ``_mkl_linear``, the ops
behind ``torch.jit.freeze``'s MKL linear). Decode steps multiply a few dozen rows by every weight matrix, where
sgemm spends a good part of its time re-laying out the weight panel at every call; packed once, the products of
SmolLM2-135M at 32 rows take 35 ms instead of 43 (LM head 7.5 instead of 9.8), and the engine samples ~10-15%
more tokens/s. MKL runs a packed product only at the row count it was packed for (``_mkl_linear`` falls back to
the plain weight otherwise), so a decode step of 3/4 of that count or more is padded up to it (measured: 24 rows
padded 68 ms against 74 plain; 16 rows 69 against 64, not padded); prefill runs plain. The packed copy fuses
q/k/v into one product and gate/up into another (3 and 2 fewer calls a layer, each call's output split as
views: ~5% of a decode step; the products after a GEMM pay for the cache it evicted). The results are the same
bits as ``F.linear`` on the machines measured (padded or not, fused or not, bias or not; the tests hold them to
1e-5). The copy costs as much memory as the linear weights (SmolLM2-135M fp32: ~510 MB) and is stale once the
weights change, so the engine packs only while it generates (after a few decode steps: a short burst does not
pay the ~0.15 s packing) and drops the copy when it goes idle. A packed forward runs every layer in one call of
``_packed_layers``, compiled by TorchScript (see the note above it): it takes the norm weights and packed
weights as lists, so packing needs the layout it assumes (``packing_unsupported_reason``).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
import warnings
from typing import List, Optional

import torch

log = logging.getLogger(__name__)

_LAYOUTS = ("llama", "mistral", "qwen2")
_MLP_PARTS = ("gate_proj", "up_proj", "down_proj", "act_fn")
_RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")
_SILUS = ("SiLUActivation", "SiLU")


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """None if ``SlotModel`` can run ``model``; otherwise why not (shown in the engine's log)."""
    cfg = getattr(model, "config", None)
    kind = getattr(cfg, "model_type", None)
    if kind not in _LAYOUTS:
        return f"model_type {kind!r} is not one of {list(_LAYOUTS)}"
    inner = getattr(model, "model", None)
    if inner is None or not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return "the model has no .model.{embed_tokens, layers, norm, rotary_emb}"
    if getattr(model, "lm_head", None) is None:
        return "the model has no lm_head"
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])):
        return "some layers use sliding-window attention"
    if kind == "mistral" and getattr(cfg, "sliding_window", None):
        return "Mistral with a sliding window"
    for layer in inner.layers:
        attn = getattr(layer, "self_attn", None)
        if attn is None or not all(hasattr(attn, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj")):
            return "a layer has no self_attn.{q,k,v,o}_proj"
        if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
            return "attention has q/k norms"
    return None


def layers_unsupported_reason(model: torch.nn.Module) -> str | None:
    """None if every decoder layer of ``model`` (one ``unsupported_reason`` accepts) has the layout the layer
    functions (``_plain_layers``, ``_packed_layers``) assume: fp32 on the CPU, torch.nn.Linear projections (biases
    on all or none of q/k/v and of gate/up), a SiLU-gated MLP, RMS norms; otherwise why not (``SlotModel`` then
    calls the modules one by one: e.g. a projection wrapped by an adapter)."""
    p = next(model.parameters())
    if p.device.type != "cpu":
        return f"the model is on {p.device}, the layer functions run on the CPU only"
    if p.dtype != torch.float32:
        return f"the model is {p.dtype}, the layer functions are fp32 only"
    for layer in model.model.layers:
        a, mlp = layer.self_attn, layer.mlp
        linears = (a.q_proj, a.k_proj, a.v_proj, a.o_proj, getattr(mlp, "gate_proj", None),
                   getattr(mlp, "up_proj", None), getattr(mlp, "down_proj", None))
        if not all(type(m) is torch.nn.Linear for m in linears):
            return "a layer's projections are not all torch.nn.Linear (gate_proj, up_proj, down_proj included)"
        if not (a.q_proj.bias is None) == (a.k_proj.bias is None) == (a.v_proj.bias is None):
            return "q/k/v projections where only some have a bias"
        if (mlp.gate_proj.bias is None) != (mlp.up_proj.bias is None):
            return "gate/up projections where only one has a bias"
        act = type(getattr(mlp, "act_fn", None)).__name__
        if act not in _SILUS:
            return f"the MLP's activation is {act}, not SiLU"
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if type(norm).__name__ not in _RMS_NORMS or getattr(norm, "variance_epsilon", None) is None:
                return f"a layer's norm is a {type(norm).__name__}, not one of {list(_RMS_NORMS)}"
    return None


def packing_unsupported_reason(model: torch.nn.Module) -> str | None:
    """None if ``SlotModel.pack`` applies to ``model`` (the layout ``layers_unsupported_reason`` accepts: CPU,
    fp32; a torch built with MKL; a plain LM head); otherwise why not."""
    why = layers_unsupported_reason(model)
    if why is not None:
        return why
    if not torch.backends.mkl.is_available():
        return "this torch build has no MKL"
    try:
        torch.ops.mkl._mkl_reorder_linear_weight, torch.ops.mkl._mkl_linear  # noqa: B018
    except (AttributeError, RuntimeError):
        return "this torch build has no torch.ops.mkl._mkl_linear"
    if type(model.lm_head) is not torch.nn.Linear:
        return f"the LM head is a {type(model.lm_head).__name__}, not a torch.nn.Linear"
    return None


@functools.lru_cache(maxsize=64)
def _no_weight(out: int, k: int) -> torch.Tensor:
    """A [out, k] tensor that holds no memory: ``_mkl_linear``'s plain-weight argument where it is never read."""
    return torch.zeros((), dtype=torch.float32).expand(out, k)


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    """``parts`` concatenated along dim 0; a single part as itself (no copy of e.g. the LM head's weight)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


# ---------------------------------------------------------------------- the layers as tensor functions
# Written for TorchScript (annotated, tensors and numbers only): ``_plain_layers`` / ``_packed_layers`` run as one
# scripted call per forward, so the ~20 ops a layer has between its products run from C++ with no Python in
# between. Why: a matrix product streams 1.3-3.5 MB of weights through each core's 2 MB L2 and evicts the
# interpreter's and dispatcher's code and data, so the first ops after it ran 3-5x slower than warm (an RMS norm
# 110-130 us against 30-40, whichever spelling: 3 kernels or 10 cost the same); from C++ there is less of that
# to fetch again. Measured on SmolLM2-135M (2 cores, alternating): a 32-row packed decode step 84-104 -> 79-94
# ms, 32 rows unpacked 111 -> 103, 4 rows 63 -> 58.


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kbuf: torch.Tensor, vbuf: torch.Tensor,
            flat: torch.Tensor, slot0: int, length: int, mask: torch.Tensor, cos: torch.Tensor,
            signed_sin: torch.Tensor, heads: int, kv_heads: int, scaling: float) -> torch.Tensor:
    """One layer's attention after its projections: rotary embedding, the new keys/values written into the
    layer's KV buffers, attention over the first ``length`` positions of the rows' slots.

    q: [B, T, H*D]; k, v: [B, T, Hkv*D]; kbuf, vbuf: [S, Hkv, C, D]; flat: [B*Hkv*T] where each new key goes in
    the buffer seen as [S*Hkv*C, D]; mask: [B, 1, G*T or 1, length] additive; cos, signed_sin: [B, 1, T, D].
    Returns [B, T, H*D]."""
    B, T = q.size(0), q.size(1)
    D = kbuf.size(-1)
    q = q.view(B, T, heads, D).transpose(1, 2)  # [B, H, T, D]
    k = k.view(B, T, kv_heads, D).transpose(1, 2)  # [B, Hkv, T, D]
    v = v.view(B, T, kv_heads, D).transpose(1, 2)  # [B, Hkv, T, D]
    # rotary in 3 kernels: rotate_half(x) * sin == x.roll(D/2) * signed_sin (HF's spelling takes 7)
    q = torch.addcmul(q * cos, q.roll(D // 2, -1), signed_sin)
    k = torch.addcmul(k * cos, k.roll(D // 2, -1), signed_sin)
    kbuf.view(-1, D).index_copy_(0, flat, k.reshape(-1, D))  # [B*Hkv*T, D] into [S*Hkv*C, D]
    vbuf.view(-1, D).index_copy_(0, flat, v.reshape(-1, D))
    keys = kbuf[slot0 : slot0 + B, :, :length]  # [B, Hkv, L, D] view
    values = vbuf[slot0 : slot0 + B, :, :length]
    qg = q.reshape(B, kv_heads, (heads // kv_heads) * T, D)  # grouped heads folded into the query axis
    o = torch.nn.functional.scaled_dot_product_attention(qg, keys, values, attn_mask=mask,
                                                         scale=scaling)  # [B, Hkv, G*T, D]
    return o.reshape(B, heads, T, D).transpose(1, 2).reshape(B, T, heads * D)  # [B, T, H*D]


def _packed_product(x: torch.Tensor, w: torch.Tensor, plain: torch.Tensor, bias: Optional[torch.Tensor],
                    rows: int) -> torch.Tensor:
    """``x @ W.T + b`` from W packed for ``rows`` rows, x's rows zero-padded up to ``rows`` (MKL runs a packed
    product only at the row count it was packed for and reads ``plain``, [out, in], otherwise: it is given one
    that holds no memory, so a wrong count would show, not fall back). x: [..., in] -> [..., out]"""
    k = x.size(-1)
    x2 = x.reshape(-1, k)  # [n, in]
    n = x2.size(0)
    if n < rows:
        x2 = torch.nn.functional.pad(x2, [0, 0, 0, rows - n])  # [rows, in]
    y = torch.ops.mkl._mkl_linear(x2, w, plain, bias, rows)  # [rows, out]
    if n < rows:
        y = y[:n]
    return y.view(list(x.shape[:-1]) + [plain.size(0)])


def _packed_layers(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, mask: torch.Tensor,
                   flat: torch.Tensor, slot0: int, length: int, kbufs: List[torch.Tensor],
                   vbufs: List[torch.Tensor], norms: List[torch.Tensor], eps: List[float],
                   weights: List[torch.Tensor], plains: List[torch.Tensor], biases: List[Optional[torch.Tensor]],
                   rows: int, heads: int, kv_heads: int, scaling: float) -> torch.Tensor:
    """Every decoder layer from packed weights (``SlotModel.pack``): per layer, 2 RMS norm weights and eps
    (input, post-attention) and 4 products (q/k/v fused, o, gate/up fused, down; ``_packed_product``'s w, plain,
    bias). x: [B, T, hidden] -> [B, T, hidden]"""
    D = kbufs[0].size(-1)
    nq, nk = heads * D, kv_heads * D
    hidden = [x.size(-1)]
    for i in range(len(kbufs)):
        h = torch.rms_norm(x, hidden, norms[2 * i], eps[2 * i])
        qkv = _packed_product(h, weights[4 * i], plains[4 * i], biases[4 * i], rows)  # [B, T, nq + 2 nk]
        o = _attend(qkv[:, :, :nq], qkv[:, :, nq : nq + nk], qkv[:, :, nq + nk :], kbufs[i], vbufs[i], flat,
                    slot0, length, mask, cos, signed_sin, heads, kv_heads, scaling)  # [B, T, H*D]
        x = x + _packed_product(o, weights[4 * i + 1], plains[4 * i + 1], biases[4 * i + 1], rows)
        h = torch.rms_norm(x, hidden, norms[2 * i + 1], eps[2 * i + 1])
        gu = _packed_product(h, weights[4 * i + 2], plains[4 * i + 2], biases[4 * i + 2], rows)  # [B, T, 2 I]
        n = gu.size(-1) // 2
        a = torch.nn.functional.silu(gu[:, :, :n]) * gu[:, :, n:]  # [B, T, I]
        x = x + _packed_product(a, weights[4 * i + 3], plains[4 * i + 3], biases[4 * i + 3], rows)
    return x


def _plain_layers(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, mask: torch.Tensor,
                  flat: torch.Tensor, slot0: int, length: int, kbufs: List[torch.Tensor],
                  vbufs: List[torch.Tensor], norms: List[torch.Tensor], eps: List[float],
                  weights: List[torch.Tensor], biases: List[Optional[torch.Tensor]], heads: int, kv_heads: int,
                  scaling: float) -> torch.Tensor:
    """Every decoder layer from the modules' own weights: per layer, 2 RMS norm weights and eps (input,
    post-attention) and 7 weights and biases (q, k, v, o, gate, up, down). x: [B, T, hidden] -> [B, T, hidden]"""
    hidden = [x.size(-1)]
    F = torch.nn.functional
    for i in range(len(kbufs)):
        w = weights[7 * i : 7 * i + 7]
        b = biases[7 * i : 7 * i + 7]
        h = torch.rms_norm(x, hidden, norms[2 * i], eps[2 * i])
        o = _attend(F.linear(h, w[0], b[0]), F.linear(h, w[1], b[1]), F.linear(h, w[2], b[2]), kbufs[i], vbufs[i],
                    flat, slot0, length, mask, cos, signed_sin, heads, kv_heads, scaling)  # [B, T, H*D]
        x = x + F.linear(o, w[3], b[3])
        h = torch.rms_norm(x, hidden, norms[2 * i + 1], eps[2 * i + 1])
        x = x + F.linear(F.silu(F.linear(h, w[4], b[4])) * F.linear(h, w[5], b[5]), w[6], b[6])
    return x


SCRIPTED = os.environ.get("GYM_PLUGIN_SCRIPTED_LAYERS", "1") != "0"
"""Run the layer functions compiled by TorchScript (False: ``_packed_layers`` as Python and, unpacked, the module
loop). ``GYM_PLUGIN_SCRIPTED_LAYERS=0`` in the environment turns it off for a process (the same tokens, ~6-11%
slower here): a way out should TorchScript misbehave with some torch."""


_SCRIPT_LOCK = threading.Lock()


@functools.lru_cache(maxsize=None)
def _scripted(fn):
    """``fn`` (``_plain_layers`` or ``_packed_layers``) compiled by TorchScript once per process; ``fn`` itself
    where TorchScript cannot compile it (torch deprecates ``torch.jit.script`` in favour of ``torch.compile``,
    which took minutes to compile this model's forward here and then ran it slower; a torch without it, or
    sources not on disk, land here: the same ops then run from Python)."""
    try:
        with _SCRIPT_LOCK, warnings.catch_warnings():  # two engines' first forwards: one compiles
            warnings.simplefilter("ignore")
            return torch.jit.script(fn)
    except Exception as exc:  # any failure to compile: the function runs as Python
        log.info("embedded policy: %s runs as Python, TorchScript could not compile it (%s: %s)", fn.__name__,
                 type(exc).__name__, str(exc)[:200])
        return fn


class SlotModel:
    """The model's forward over slots of preallocated KV buffers. Not thread-safe (the engine's worker owns it)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.inner = model.model
        cfg = model.config
        attn0 = self.inner.layers[0].self_attn
        self.num_heads = int(cfg.num_attention_heads)
        self.num_kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.num_heads)
        self.head_dim = int(getattr(attn0, "head_dim", None) or cfg.hidden_size // self.num_heads)
        self.groups = self.num_heads // self.num_kv_heads
        self.scaling = float(getattr(attn0, "scaling", self.head_dim ** -0.5))
        p = next(model.parameters())
        self.dtype, self.device = p.dtype, p.device
        self.k: list[torch.Tensor] = []  # per layer [S, Hkv, C, D]
        self.v: list[torch.Tensor] = []
        self.packed: dict[torch.nn.Module, tuple[torch.Tensor, torch.Tensor | None, int]] = {}
        """Module -> (its weight(s) in MKL's packed layout, bias, out features) (``pack``): a layer's ``self_attn``
        (q, k, v fused), its ``mlp`` (gate, up fused), every ``o_proj``, ``down_proj`` and the LM head. Empty: every
        linear runs from its own weight."""
        self._pack_rows = 0
        self._plan: tuple | None = None
        """``_packed_layers``' per-layer arguments (norm weights, eps, packed weights, plain stand-ins, biases)."""
        self._plain: tuple | None = None  # (``_plain_plan``'s result,) once read
        self.initialized = 0
        """Positions ``0 .. initialized`` of every slot hold finite values (written or zeroed). Attention reads a
        view up to the longest row, so a shorter row's masked positions are read too: masked weights are 0, but
        0 * NaN (never-written memory) is NaN. Grown in steps of 64 before anything is written past it."""

    # ------------------------------------------------------------------ buffers
    @property
    def slots(self) -> int:
        return self.k[0].shape[0] if self.k else 0

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2] if self.k else 0

    @property
    def bytes_per_position(self) -> int:
        """KV bytes of one position of one row (all layers, keys and values)."""
        return len(self.inner.layers) * 2 * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    def reserve(self, slots: int, capacity: int, used: int) -> None:
        """Make room for ``slots`` rows of ``capacity`` positions, keeping the first ``used`` positions of the
        current rows. Buffers are allocated empty: the OS backs pages only once rows reach them."""
        if slots <= self.slots and capacity <= self.capacity:
            return
        s = max(slots, self.slots)
        c = max(capacity, self.capacity)
        if self.k:  # grow: at least double, so a slowly growing need does not copy at every step
            c = max(c, min(2 * self.capacity, c + 4096)) if capacity > self.capacity else c
        c = -(-c // 64) * 64
        shape = (s, self.num_kv_heads, c, self.head_dim)
        new_k, new_v = [], []
        n = self.initialized if self.k else 0
        for i in range(len(self.inner.layers)):
            k = torch.empty(shape, dtype=self.dtype, device=self.device)  # [S, Hkv, C, D]
            v = torch.empty(shape, dtype=self.dtype, device=self.device)
            if n:
                old_s = self.k[i].shape[0]
                k[:old_s, :, :n] = self.k[i][:, :, :n]
                v[:old_s, :, :n] = self.v[i][:, :, :n]
                k[old_s:, :, :n] = 0
                v[old_s:, :, :n] = 0
            new_k.append(k)
            new_v.append(v)
        self.k, self.v = new_k, new_v
        self.initialized = n

    def _init_upto(self, n: int) -> None:
        """Zero positions ``initialized .. n`` (rounded up to 64) of every slot, before anything is written there."""
        if n <= self.initialized:
            return
        end = min(self.capacity, -(-n // 64) * 64)
        for k, v in zip(self.k, self.v):
            k[:, :, self.initialized : end] = 0
            v[:, :, self.initialized : end] = 0
        self.initialized = end

    def release(self) -> None:
        """Drop the buffers (the engine is idle; the memory goes back to the trainer) and the plain plan (the
        modules are read again at the next forward)."""
        self.k, self.v = [], []
        self._plain = None
        self.initialized = 0

    def move(self, dst: list[int], src: list[int], used: int) -> None:
        """Copy rows ``src`` into slots ``dst`` (first ``used`` positions)."""
        if not dst:
            return
        self._init_upto(used)
        d = torch.tensor(dst, device=self.device)
        s = torch.tensor(src, device=self.device)
        for k, v in zip(self.k, self.v):
            k[d, :, :used] = k[s, :, :used]
            v[d, :, :used] = v[s, :, :used]

    def load(self, slot: int, kv: torch.Tensor, n: int) -> None:
        """Write positions ``0 .. n`` of ``kv`` [layers, 2, Hkv, >=n, D] (a prefix-cache entry) into ``slot``."""
        self._init_upto(n)
        for i, (k, v) in enumerate(zip(self.k, self.v)):
            k[slot, :, :n] = kv[i, 0, :, :n]
            v[slot, :, :n] = kv[i, 1, :, :n]

    def save(self, slot: int, n: int) -> torch.Tensor:
        """A copy of positions ``0 .. n`` of ``slot``: [layers, 2, Hkv, n, D]."""
        return torch.stack([torch.stack([k[slot, :, :n], v[slot, :, :n]]) for k, v in zip(self.k, self.v)])

    # ------------------------------------------------------------------ packed weights
    def pack(self, rows: int) -> float:
        """Pack the weights of every linear layer (attention, MLP, LM head) for MKL's GEMM at ``rows`` rows per
        product (decode steps of ``rows`` or a little fewer use them). Call only where
        ``packing_unsupported_reason`` is None, while the weights cannot change (the engine holds its weights
        lock). Returns the seconds it took."""
        t0 = time.perf_counter()
        self._pack_rows = max(1, int(rows))
        packed = {}

        def put(key: torch.nn.Module, parts: list[torch.nn.Linear]) -> None:
            w = _joined([m.weight.detach() for m in parts])
            bias = None if parts[0].bias is None else _joined([m.bias.detach() for m in parts])
            packed[key] = (torch.ops.mkl._mkl_reorder_linear_weight(w, self._pack_rows), bias, w.shape[0])

        put(self.model.lm_head, [self.model.lm_head])
        weights, plains, biases = [], [], []
        for layer in self.inner.layers:
            a, mlp = layer.self_attn, layer.mlp
            for key, parts in ((a, [a.q_proj, a.k_proj, a.v_proj]), (a.o_proj, [a.o_proj]),
                               (mlp, [mlp.gate_proj, mlp.up_proj]), (mlp.down_proj, [mlp.down_proj])):
                put(key, parts)
                w, bias, out = packed[key]
                weights.append(w)
                plains.append(_no_weight(out, parts[0].in_features))
                biases.append(bias)
        self.packed = packed
        self._plan = (*self._norm_args(), weights, plains, biases)
        return time.perf_counter() - t0

    def unpack(self) -> None:
        """Drop the packed copies (the engine is idle: the weights may change, the memory goes back)."""
        self.packed = {}
        self._plan = None

    def _plain_plan(self) -> tuple | None:
        """``_plain_layers``' per-layer arguments (norm weights, eps, the 7 projections' weights and biases), or
        None where ``layers_unsupported_reason`` says the layers are not its layout. Read from the modules at the
        first forward after ``release`` (reading them takes ~1 ms, a step 50-100) and kept until the next: the
        parameters themselves are listed, so weights changed in place (``copy_``, an optimizer step,
        ``p.data = ...``) are seen at once; a module or parameter replaced by another object is seen from the
        next busy period (the engine releases when it goes idle, and weights change only then)."""
        if self._plain is None:
            self._plain = (self._read_plain_plan(),)
        return self._plain[0]

    def _read_plain_plan(self) -> tuple | None:
        if layers_unsupported_reason(self.model) is not None:
            return None
        weights, biases = [], []
        for layer in self.inner.layers:
            a, mlp = layer.self_attn, layer.mlp
            for m in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
                weights.append(m.weight)
                biases.append(m.bias)
        return (*self._norm_args(), weights, biases)

    def _norm_args(self) -> tuple[list[torch.Tensor], list[float]]:
        """The layer functions' norm arguments: each layer's input and post-attention RMS norm weights (the
        parameters themselves) and their eps, in that order."""
        norms, eps = [], []
        for layer in self.inner.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norms.append(norm.weight)
                eps.append(float(norm.variance_epsilon))
        return norms, eps

    def _packs(self, rows: int) -> bool:
        """Whether a product of ``rows`` rows runs from the packed weights: 3/4 of the packed row count to all of
        it (fewer rows run faster plain than padded)."""
        return bool(self.packed) and 3 * self._pack_rows <= 4 * rows <= 4 * self._pack_rows

    def _linear(self, m: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """``m(x)``, from its packed weight when there is one for these rows. x: [..., in] -> [..., out]"""
        p = self.packed.get(m) if self._packs(x.numel() // x.shape[-1]) else None
        if p is None:
            return m(x)
        w, bias, out = p
        return _packed_product(x, w, _no_weight(out, x.shape[-1]), bias, self._pack_rows)

    # ------------------------------------------------------------------ forward
    def forward(self, slot0: int, ids: torch.Tensor, start: torch.Tensor, n_new: torch.Tensor) -> torch.Tensor:
        """Run rows ``slot0 .. slot0 + B`` over their new tokens; return fp32 logits at each row's last new token.

        ids: [B, T] new tokens, right-padded (row b's real ones are ``ids[b, :n_new[b]]``); start: [B] the row's
        length before them (its cached positions); n_new: [B] >= 1. Row b's token t sits at position
        ``start[b] + t``; its keys/values are written there. Padding positions are written too (at most up to
        the buffer's end), past the row's length: later tokens overwrite them before any query can see them.
        Returns [B, V].
        """
        B, T = ids.shape
        C = self.capacity
        H, Hkv, G = self.num_heads, self.num_kv_heads, self.groups
        pos = start[:, None] + torch.arange(T, device=ids.device)[None, :]  # [B, T]
        L = int((start + n_new).max())  # keys any real query needs
        write = pos.clamp(max=C - 1)  # [B, T]
        self._init_upto(min(C, int(start.max()) + T))
        # Where row b's token t goes in a layer's buffer seen as [S * Hkv * C, D]: one index_copy_ per buffer.
        slot = torch.arange(slot0, slot0 + B, device=ids.device)[:, None, None]  # [B, 1, 1]
        heads = torch.arange(Hkv, device=ids.device)[None, :, None]  # [1, Hkv, 1]
        flat = ((slot * Hkv + heads) * C + write[:, None, :]).reshape(-1)  # [B * Hkv * T]
        # Additive mask (0 / -inf), built once: query t of row b (any grouped head) sees key j iff j <= its position.
        seen = torch.arange(L, device=ids.device)[None, None, :] <= pos[:, :, None]  # [B, T, L]
        mask = torch.zeros(seen.shape, dtype=self.dtype, device=ids.device).masked_fill_(~seen, float("-inf"))
        mask = mask[:, None] if T == 1 else mask.repeat(1, G, 1)[:, None]  # [B, 1, G*T or 1, L]

        x = self.inner.embed_tokens(ids)  # [B, T, hidden]
        cos, sin = self.inner.rotary_emb(x, pos)  # [B, T, D] each
        cos, sin = cos[:, None], self._signed_sin(sin)[:, None]  # [B, 1, T, D]
        if self._plan is not None and self._packs(B * T):
            run, args = _packed_layers, (*self._plan, self._pack_rows)
        else:
            run, args = _plain_layers, self._plain_plan() if SCRIPTED else None
        if args is not None:
            # TorchScript's optimizing executor would profile the first calls and specialize the graph to their
            # shapes (rows and keys change every step); it has nothing to fuse on CPU: the plain executor
            with torch.jit.optimized_execution(False):
                x = (_scripted(run) if SCRIPTED else run)(x, cos, sin, mask, flat, slot0, L, self.k, self.v, *args,
                                                          H, Hkv, self.scaling)
        else:  # a layout the layer functions do not cover (or SCRIPTED off): the modules one by one
            for i, layer in enumerate(self.inner.layers):
                attn = layer.self_attn
                h = self._norm(layer.input_layernorm, x)
                o = _attend(attn.q_proj(h), attn.k_proj(h), attn.v_proj(h), self.k[i], self.v[i], flat, slot0, L,
                            mask, cos, sin, H, Hkv, self.scaling)  # [B, T, H*D]
                x = x + attn.o_proj(o)
                x = x + layer.mlp(self._norm(layer.post_attention_layernorm, x))
        last = x[torch.arange(B, device=ids.device), n_new - 1]  # [B, hidden]
        return self._linear(self.model.lm_head, self._norm(self.inner.norm, last)).float()  # [B, V]

    @staticmethod
    def _norm(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The model's RMSNorm as one fused kernel (``F.rms_norm``: fp32 inputs give the module's own result within
        rounding); any other norm module runs as itself."""
        eps = getattr(module, "variance_epsilon", None)
        if eps is None or x.dtype != torch.float32 or type(module).__name__ not in _RMS_NORMS:
            return module(x)
        return torch.nn.functional.rms_norm(x, (x.shape[-1],), module.weight, eps)

    @staticmethod
    def _signed_sin(sin: torch.Tensor) -> torch.Tensor:
        """``sin`` with its first half negated: ``rotate_half(x) * sin == x.roll(D/2) * signed_sin`` for the Llama
        layout, whose halves share the same frequencies. [..., D] -> [..., D]"""
        half = sin.shape[-1] // 2
        return torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
