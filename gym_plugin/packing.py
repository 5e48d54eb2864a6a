"""Prefix-shared packing: the rows of a micro-batch as one sequence in which every distinct prefix appears once.

The G rollouts of a prompt share the prompt, and every prompt of a batch shares the chat template's system
prompt. A causal LM's hidden state at token ``t`` of a row depends only on the row's tokens ``0..t``, so rows
that agree on their first ``t + 1`` tokens have the same hidden states there. ``pack_rows`` builds the prefix
tree (trie) of the rows and lays its nodes out as one sequence:

    rows   A = [s s p1 a a]      B = [s s p1 b]      C = [s s p2 c c]
    packed     [s s p1 a a b p2 c c]            (9 tokens instead of 14, no padding)
    position    0 1 2  3 4 3 2  3 4             (a node's depth = its index in its rows)
    node i attends to node j  <=>  j is i or an ancestor of i in the tree

so one forward of the packed sequence computes exactly what the padded rows would (the attention mask is
block-causal over the tree; positions restart at each branch), and the shared prefix costs its FLOPs once.

How the tree is found without a trie walk: sorted lexicographically, each row shares with any earlier row at
most what it shares with the row just before it (``lcp``), so a row's first ``lcp`` tokens are the previous
row's nodes and the rest are new nodes. Pure tensor/numpy code, no model.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch


@dataclasses.dataclass
class PackedRows:
    """``R`` rows packed into one sequence of ``N`` distinct prefix nodes."""

    input_ids: torch.Tensor
    """[1, N] int64 token of each node."""
    position_ids: torch.Tensor
    """[1, N] int64 depth of each node (the index of its token in every row that contains it)."""
    allowed: torch.Tensor
    """[N, N] bool: node i may attend to node j (j is i or an ancestor of i)."""
    node_of: torch.Tensor
    """[R, L] int64 node of each row's real token t (``L`` = longest row); -1 past the row's end."""

    @property
    def num_nodes(self) -> int:
        return int(self.input_ids.shape[1])

    def additive_mask(self, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """[1, 1, N, N] mask to add to attention scores: 0 where allowed, the dtype's minimum elsewhere
        (the convention of Hugging Face's eager and SDPA attention for a custom 4D mask)."""
        zero = torch.zeros((), dtype=dtype, device=device)
        low = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=device)
        return torch.where(self.allowed.to(device), zero, low)[None, None]  # [1, 1, N, N]


def _lcp(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two 1-D arrays."""
    n = min(a.shape[0], b.shape[0])
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n


def pack_rows(rows: list[np.ndarray]) -> PackedRows:
    """Pack token rows (1-D int arrays of real tokens, no padding) into their prefix tree.

    Example: rows [5, 6, 7], [5, 6, 8], [9] -> input_ids [[5, 6, 7, 8, 9]], position_ids [[0, 1, 2, 2, 0]],
    node_of [[0, 1, 2], [0, 1, 3], [4, -1, -1]].
    """
    if not rows:
        raise ValueError("pack_rows needs at least one row")
    lengths = [int(r.shape[0]) for r in rows]
    if min(lengths) < 1:
        raise ValueError(f"pack_rows: every row needs >= 1 token; got lengths {lengths}")
    order = sorted(range(len(rows)), key=lambda r: rows[r].tolist())  # lexicographic; a prefix sorts first
    width = max(lengths)
    node_of = np.full((len(rows), width), -1, dtype=np.int64)  # [R, L]
    new_tokens, new_positions, shared = [], [], []
    next_node, prev = 0, None
    for r in order:
        row, n = rows[r], lengths[r]
        lcp = _lcp(rows[prev], row) if prev is not None else 0
        if lcp:
            node_of[r, :lcp] = node_of[prev, :lcp]
        node_of[r, lcp:n] = np.arange(next_node, next_node + n - lcp)
        next_node += n - lcp
        new_tokens.append(row[lcp:])
        new_positions.append(np.arange(lcp, n))
        shared.append(lcp)
        prev = r
    num_nodes = next_node
    allowed = np.zeros((num_nodes, num_nodes), dtype=bool)  # [N, N]
    for r, lcp in zip(order, shared):
        n = lengths[r]
        if lcp == n:  # a duplicate (or a prefix) of an earlier row: no node of its own
            continue
        mine = node_of[r, lcp:n]  # [n - lcp] the row's own nodes
        ancestors = node_of[r, :n]  # [n] every node on the row's path
        # own node at depth d attends to the path's nodes at depths 0..d
        allowed[mine[:, None], ancestors[None, :]] = np.arange(n)[None, :] <= np.arange(lcp, n)[:, None]
    return PackedRows(
        input_ids=torch.from_numpy(np.concatenate(new_tokens).astype(np.int64))[None],
        position_ids=torch.from_numpy(np.concatenate(new_positions).astype(np.int64))[None],
        allowed=torch.from_numpy(allowed),
        node_of=torch.from_numpy(node_of),
    )
