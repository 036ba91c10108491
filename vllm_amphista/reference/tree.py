"""Static draft trees (Medusa's format).

A tree is a list of paths: (i,) is the i-th candidate of head 1, (i, j) the j-th
candidate of head 2 below it, and so on. Node 0 is the root: the token the
target just produced. `TreeBuffers` holds what verification needs (the tree mask that
kernels/tree_attention.py applies).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

Path = tuple[int, ...]


@dataclass
class TreeBuffers:
    paths: list[Path]  # sorted by (depth, path); node i + 1 is paths[i]
    mask: torch.Tensor  # [T, T] bool, T = len(paths) + 1: node i sees node j (ancestor or self)
    depths: torch.Tensor  # [T] long: position offset of each node (root 0)
    candidate_index: torch.Tensor  # [T] long: index into [root, head1 top-k.., head2 top-k..]
    retrieve: torch.Tensor  # [leaves, max_depth + 1] long: node ids along each leaf path, -1 pad
    top_k: int  # candidates per head the candidate index assumes

    @property
    def num_nodes(self) -> int:
        return len(self.paths) + 1


def build_tree(paths: Sequence[Sequence[int]], top_k: int) -> TreeBuffers:
    """Validate a path list and build the tree mask, depths, candidate map, retrieve table."""
    ordered = sorted({tuple(p) for p in paths}, key=lambda p: (len(p), p))
    if len(ordered) != len(paths):
        raise ValueError("tree paths must be unique")
    index = {(): 0} | {p: i + 1 for i, p in enumerate(ordered)}
    for p in ordered:
        if not p or min(p) < 0 or max(p) >= top_k:
            raise ValueError(f"tree path {p} needs candidates in 0..{top_k - 1}")
        if p[:-1] not in index:
            raise ValueError(f"tree path {p} has no parent {p[:-1]} in the tree")
    n = len(ordered) + 1
    mask = torch.zeros(n, n, dtype=torch.bool)
    depths = torch.zeros(n, dtype=torch.long)
    candidate = torch.zeros(n, dtype=torch.long)
    for p, i in index.items():
        depths[i] = len(p)
        if p:
            candidate[i] = 1 + (len(p) - 1) * top_k + p[-1]
        for d in range(len(p) + 1):
            mask[i, index[p[:d]]] = True
    parents = {p[:-1] for p in ordered}
    leaves = [p for p in [(), *ordered] if p not in parents]
    max_depth = max((len(p) for p in ordered), default=0)
    retrieve = torch.full((len(leaves), max_depth + 1), -1, dtype=torch.long)
    for row, leaf in enumerate(leaves):
        for d in range(len(leaf) + 1):
            retrieve[row, d] = index[leaf[:d]]
    return TreeBuffers(ordered, mask, depths, candidate, retrieve, top_k)


def chain_tree(depth: int) -> list[Path]:
    """The chain of top-1 candidates: what vLLM's chain verification checks."""
    return [(0,) * d for d in range(1, depth + 1)]
