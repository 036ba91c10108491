"""Triton kernel for tree attention (see tree.tree_attention_reference).

One program per (sequence, query head, block of tree nodes). It streams the cached
prefix in BLOCK_N tiles with an online softmax (no mask needed: every node sees
all of it), then attends to the tree's own keys under the tree mask. Grouped-query
heads read their shared KV head. Accumulation is fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _tree_attention_kernel(
    q_ptr, kp_ptr, vp_ptr, kt_ptr, vt_ptr, mask_ptr, out_ptr,
    num_q_heads, group_size, prefix_len, num_nodes, head_dim,
    s_qb, s_qh, s_qt,
    s_kpb, s_kph, s_kpt,
    s_vpb, s_vph, s_vpt,
    s_ktb, s_kth, s_ktt,
    s_vtb, s_vth, s_vtt,
    s_ob, s_oh, s_ot,
    scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = pid_bh // num_q_heads
    h = pid_bh % num_q_heads
    kv_h = h // group_size
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < num_nodes
    dim_ok = dims < head_dim
    q = tl.load(q_ptr + b * s_qb + h * s_qh + rows[:, None] * s_qt + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0).to(tl.float32)

    running_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # The cached prefix: visible to every node.
    for start in range(0, prefix_len, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < prefix_len
        tile = col_ok[:, None] & dim_ok[None, :]
        k = tl.load(kp_ptr + b * s_kpb + kv_h * s_kph + cols[:, None] * s_kpt + dims[None, :],
                    mask=tile, other=0.0).to(tl.float32)
        v = tl.load(vp_ptr + b * s_vpb + kv_h * s_vph + cols[:, None] * s_vpt + dims[None, :],
                    mask=tile, other=0.0).to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        scores = tl.where(col_ok[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        correction = tl.exp(running_max - new_max)
        weights = tl.exp(scores - new_max[:, None])
        running_sum = running_sum * correction + tl.sum(weights, axis=1)
        acc = acc * correction[:, None] + tl.dot(weights, v, input_precision="ieee")
        running_max = new_max

    # The tree itself: node i sees node j where mask[i, j] (ancestors and itself).
    cols = tl.arange(0, BLOCK_T)
    col_ok = cols < num_nodes
    tile = col_ok[:, None] & dim_ok[None, :]
    k = tl.load(kt_ptr + b * s_ktb + kv_h * s_kth + cols[:, None] * s_ktt + dims[None, :],
                mask=tile, other=0.0).to(tl.float32)
    v = tl.load(vt_ptr + b * s_vtb + kv_h * s_vth + cols[:, None] * s_vtt + dims[None, :],
                mask=tile, other=0.0).to(tl.float32)
    visible = tl.load(mask_ptr + rows[:, None] * num_nodes + cols[None, :],
                      mask=row_ok[:, None] & col_ok[None, :], other=0) != 0
    scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    scores = tl.where(visible, scores, float("-inf"))
    new_max = tl.maximum(running_max, tl.max(scores, axis=1))
    # Padded query rows see nothing at all: keep their arithmetic finite.
    new_max = tl.where(new_max == float("-inf"), 0.0, new_max)
    correction = tl.exp(running_max - new_max)
    weights = tl.exp(scores - new_max[:, None])
    running_sum = running_sum * correction + tl.sum(weights, axis=1)
    acc = acc * correction[:, None] + tl.dot(weights, v, input_precision="ieee")

    out = acc / tl.where(running_sum == 0.0, 1.0, running_sum)[:, None]
    tl.store(out_ptr + b * s_ob + h * s_oh + rows[:, None] * s_ot + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


def triton_tree_attention(q, k_prefix, v_prefix, k_tree, v_tree, tree_mask) -> torch.Tensor:
    """Shapes as tree_attention_reference; the last dim of every tensor contiguous."""
    batch, num_q_heads, num_nodes, head_dim = q.shape
    num_kv_heads, prefix_len = k_prefix.shape[1], k_prefix.shape[2]
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads are not a multiple of {num_kv_heads}")
    if tree_mask.shape != (num_nodes, num_nodes):
        raise ValueError(f"tree_mask is {tuple(tree_mask.shape)}, needs ({num_nodes}, "
                         f"{num_nodes})")
    if num_nodes > 256 or head_dim > 256:
        raise ValueError(f"{num_nodes} tree nodes (max 256) or head_dim {head_dim} (max 256)")
    tensors = [t if t.stride(-1) == 1 else t.contiguous()
               for t in (q, k_prefix, v_prefix, k_tree, v_tree)]
    q, k_prefix, v_prefix, k_tree, v_tree = tensors
    mask = tree_mask.to(device=q.device, dtype=torch.int8).contiguous()
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    block_m = 16 if num_nodes <= 16 else 32
    block_t = max(16, triton.next_power_of_2(num_nodes))
    block_d = max(16, triton.next_power_of_2(head_dim))
    grid = (batch * num_q_heads, triton.cdiv(num_nodes, block_m))
    _tree_attention_kernel[grid](
        q, k_prefix, v_prefix, k_tree, v_tree, mask, out,
        num_q_heads, num_q_heads // num_kv_heads, prefix_len, num_nodes, head_dim,
        *q.stride()[:3], *k_prefix.stride()[:3], *v_prefix.stride()[:3],
        *k_tree.stride()[:3], *v_tree.stride()[:3], *out.stride()[:3],
        head_dim ** -0.5,
        BLOCK_M=block_m, BLOCK_N=64, BLOCK_T=block_t, BLOCK_D=block_d,
    )
    return out
