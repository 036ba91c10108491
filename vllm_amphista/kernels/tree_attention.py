"""Tree attention: the PyTorch reference that defines it (triton_tree_attention.py
implements it as a kernel)."""

from __future__ import annotations

import torch


def tree_attention_reference(
    q: torch.Tensor,  # [B, Hq, T, hd]
    k_prefix: torch.Tensor,  # [B, Hkv, P, hd]
    v_prefix: torch.Tensor,
    k_tree: torch.Tensor,  # [B, Hkv, T, hd]
    v_tree: torch.Tensor,
    tree_mask: torch.Tensor,  # [T, T] bool
) -> torch.Tensor:
    """Each tree node attends to the whole cached prefix and to its own ancestors (and
    itself) in the tree. Grouped-query heads: Hq is a multiple of Hkv. fp32 softmax."""
    groups = q.shape[1] // k_prefix.shape[1]
    keys = torch.cat((k_prefix, k_tree), dim=2).repeat_interleave(groups, dim=1).float()
    values = torch.cat((v_prefix, v_tree), dim=2).repeat_interleave(groups, dim=1).float()
    visible = torch.cat((tree_mask.new_ones(tree_mask.shape[0], k_prefix.shape[2]),
                         tree_mask), dim=1)
    scores = q.float() @ keys.transpose(-1, -2) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~visible.to(q.device), float("-inf"))
    return (scores.softmax(-1) @ values).to(q.dtype)
