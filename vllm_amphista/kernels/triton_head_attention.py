"""Triton kernel for the AEB's bi-directional attention over the K head positions.

One program per (sequence, attention head): it loads that head's K x hd queries,
keys and values once, and does scores, softmax and the weighted sum in registers.
K <= 16 and hd <= 256 fit in one tile, so there is no loop and no causal mask.
Everything is computed in fp32 (IEEE dots): the op is memory-bound at these sizes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _head_attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr,
    num_heads, num_positions, head_dim,
    stride_qn, stride_qh, stride_qk,
    stride_kn, stride_kh, stride_kk,
    stride_vn, stride_vh, stride_vk,
    stride_on, stride_oh, stride_ok,
    scale,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    n = pid // num_heads
    h = pid % num_heads
    rows = tl.arange(0, BLOCK_K)
    dims = tl.arange(0, BLOCK_D)
    valid = (rows[:, None] < num_positions) & (dims[None, :] < head_dim)
    q = tl.load(q_ptr + n * stride_qn + h * stride_qh + rows[:, None] * stride_qk + dims[None, :],
                mask=valid, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + n * stride_kn + h * stride_kh + rows[:, None] * stride_kk + dims[None, :],
                mask=valid, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + n * stride_vn + h * stride_vh + rows[:, None] * stride_vk + dims[None, :],
                mask=valid, other=0.0).to(tl.float32)
    scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    scores = tl.where(rows[None, :] < num_positions, scores, float("-inf"))
    scores = scores - tl.max(scores, axis=1)[:, None]
    weights = tl.exp(scores)
    weights = weights / tl.sum(weights, axis=1)[:, None]
    out = tl.dot(weights, v, input_precision="ieee")
    tl.store(out_ptr + n * stride_on + h * stride_oh + rows[:, None] * stride_ok + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=valid)


def triton_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q, k, v [N, H, K, hd] (last dim contiguous) -> [N, H, K, hd] in q's dtype."""
    if q.shape != k.shape or q.shape != v.shape or q.dim() != 4:
        raise ValueError(f"q, k, v must share one [N, H, K, hd] shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    n, h, positions, head_dim = q.shape
    if positions > 16 or head_dim > 256:
        raise ValueError(f"K={positions} (max 16) or head_dim={head_dim} (max 256) too large")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if n * h == 0:
        return out
    # tl.dot needs every tile side >= 16.
    block_k = max(16, triton.next_power_of_2(positions))
    block_d = max(16, triton.next_power_of_2(head_dim))
    _head_attention_kernel[(n * h,)](
        q, k, v, out, h, positions, head_dim,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        head_dim ** -0.5, BLOCK_K=block_k, BLOCK_D=block_d,
    )
    return out
