"""Bi-directional attention over the K draft-head positions (the Auto-embedding Block).

Every head position attends to every other one: no causal mask. Shapes are tiny
in K (<= 16) and large in batch (one row per running sequence), so the Triton
kernel gives each (sequence, attention-head) pair one program.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def head_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q, k, v [N, H, K, hd] -> [N, H, K, hd]; softmax in fp32, result in q's dtype."""
    scores = q.float() @ k.float().transpose(-1, -2) * q.shape[-1] ** -0.5
    return (scores.softmax(-1) @ v.float()).to(q.dtype)


def head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Fused Triton kernel on CUDA; PyTorch's SDPA elsewhere (and under autograd)."""
    if q.is_cuda and not torch.is_grad_enabled():
        from vllm_amphista.kernels.triton_head_attention import triton_head_attention

        return triton_head_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)
