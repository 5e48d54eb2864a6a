"""The embedded engine's prefix cache: KV of earlier sequences, reused by later prompts that start the same way.

What it catches: a GRPO group sent as G separate calls (the same prompt ids, prefilled once), turn k+1 of a
multi-turn rollout (its prompt extends turn k's prompt + generation, whose KV is stored when that row ends), and
any shared head such as the chat template's system prompt. A hit copies the matched positions' KV into the
row's slot and prefills only the rest; a key's KV depends only on the tokens up to it, so the result is the same
as prefilling everything (up to float rounding: the products run in other shapes).

Lookup: each entry's ids are cut into blocks of ``BLOCK`` tokens; the hash of every block-aligned prefix (a hash
chain) points at the newest entry holding it. A prompt walks its own chain to its longest block-aligned match,
then compares tokens one by one past it. Bounded by ``max_tokens`` positions in all, least recently used first
out; ``clear()`` on every weight change (the KV of other weights is wrong): by the engine on `update_weights` /
`exclusive_weights`, and by `check_weights` before each prefill, which also catches a trainer that stepped a
shared module in place without telling the engine (an in-place op on a parameter bumps its ``_version``). Not
every update does: writes through ``p.data`` escape the counter, and TRL's trainer step left the stamp unchanged
(cause not pinned), so a trainer sharing the module claims `exclusive_weights` after stepping (gym_plugin.trl does).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

BLOCK = 16


@dataclass
class _Entry:
    ids: tuple[int, ...]
    kv: torch.Tensor  # [layers, 2, Hkv, n, D]
    hashes: list[int]


class PrefixCache:
    """LRU map from token sequences to their KV; ``max_tokens`` = 0 disables it."""

    def __init__(self, max_tokens: int):
        self.max_tokens = max(0, int(max_tokens))
        self._entries: OrderedDict[tuple[int, ...], _Entry] = OrderedDict()
        self._by_hash: dict[int, tuple[int, ...]] = {}
        self.tokens = 0
        self.hits = 0
        self.hit_tokens = 0
        self.lookups = 0
        self._stamp: tuple | None = None

    def check_weights(self, model: torch.nn.Module) -> None:
        """Drop every entry if ``model``'s parameters changed since the last check: each one's storage and
        in-place version counter (an optimizer step, ``copy_``, ``load_state_dict`` all bump it). ~300 tensors:
        tens of microseconds, once per prefill."""
        stamp = tuple((p.data_ptr(), p._version) for p in model.parameters())
        if stamp != self._stamp:
            if self._stamp is not None:
                self.clear()
            self._stamp = stamp

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def _chain(ids: tuple[int, ...]) -> list[int]:
        """Hash of each block-aligned prefix: ``out[i]`` covers ``ids[: (i + 1) * BLOCK]``."""
        out, h = [], 0
        for i in range(len(ids) // BLOCK):
            h = hash((h, ids[i * BLOCK : (i + 1) * BLOCK]))
            out.append(h)
        return out

    def lookup(self, ids: tuple[int, ...], limit: int) -> tuple[int, torch.Tensor | None]:
        """(m, kv): the longest cached prefix of ``ids`` (at most ``limit`` tokens) and the entry's KV (its
        first m positions are that prefix's); (0, None) on a miss."""
        self.lookups += 1
        if not self._entries or limit <= 0:
            return 0, None
        best: _Entry | None = None
        m = 0
        h = 0
        for i in range(len(ids) // BLOCK):
            h = hash((h, ids[i * BLOCK : (i + 1) * BLOCK]))
            key = self._by_hash.get(h)
            if key is None:
                break
            best, m = self._entries[key], (i + 1) * BLOCK
        if best is None:  # no full block in common: the first block may still share a head with an entry
            best = next(reversed(self._entries.values()))
        e = best.ids
        n = min(len(e), len(ids), limit)
        m = min(m, n)
        if e[:m] != ids[:m]:  # a hash collision (never seen; checked so it cannot hand out wrong KV)
            m = 0
        while m < n and e[m] == ids[m]:
            m += 1
        if m == 0:
            return 0, None
        self._entries.move_to_end(best.ids)
        self.hits += 1
        self.hit_tokens += m
        return m, best.kv

    def insert(self, ids: tuple[int, ...], kv: torch.Tensor) -> None:
        """Store ``kv`` [layers, 2, Hkv, len(ids), D] for ``ids`` (replacing an entry of the same ids)."""
        n = len(ids)
        if n == 0 or n > self.max_tokens:
            return
        if ids in self._entries:
            self._entries.move_to_end(ids)
            return
        while self.tokens + n > self.max_tokens and self._entries:
            self._evict()
        hashes = self._chain(ids)
        self._entries[ids] = _Entry(ids, kv, hashes)
        self.tokens += n
        for h in hashes:
            self._by_hash[h] = ids

    def _evict(self) -> None:
        ids, e = self._entries.popitem(last=False)
        self.tokens -= len(ids)
        for h in e.hashes:
            if self._by_hash.get(h) == ids:
                del self._by_hash[h]

    def clear(self) -> None:
        self._entries.clear()
        self._by_hash.clear()
        self.tokens = 0
