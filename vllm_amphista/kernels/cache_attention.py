"""Attention of a few new rows per request against their SAL cache, while drafting.

PyTorch's CPU attention kernel is fastest for one new row per request, and slow for
several: AMD EPYC of CPU family 26, fp32, 2 threads, 9 query heads over 3 key heads,
201 cached positions: one row 15 us at 1 request and 42 at 4 (as two matrix products:
28 and 54), but 3 rows at 4 requests 132 us against 81 as products, 2 rows at 16
requests 412 against 186. Rows beyond the first come from accepted drafts. The whole
pass with 3 rows a request: 5.28 -> 4.92 ms at 16 requests, unchanged at 1 and 4
(docs/results.md, "Attention over the SAL cache as matrix products").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def grouped_products_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                               mask: torch.Tensor) -> torch.Tensor:
    """q [B, H, T, hd], keys and values [B, Hkv, L, hd], mask [B, 1, T, L] bool (True =
    may attend; every row sees at least one key) -> [B, H, T, hd]. The H / Hkv query heads
    sharing a key head are that head's rows of one product, so keys are never repeated."""
    b, heads, rows, head_dim = q.shape
    kv_heads = keys.shape[1]
    grouped = q.reshape(b, kv_heads, heads // kv_heads * rows, head_dim)
    scores = grouped @ keys.transpose(-1, -2) * head_dim ** -0.5
    scores = scores.view(b, kv_heads, heads // kv_heads, rows, -1)
    scores.masked_fill_(~mask[:, :, None], float("-inf"))
    weights = scores.view(b, kv_heads, heads // kv_heads * rows, -1).softmax(-1)
    return (weights @ values).view(b, heads, rows, head_dim)


def cache_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                    mask: torch.Tensor) -> torch.Tensor:
    """As `grouped_products_attention`: the products for several fp32 rows per request
    on a CPU, PyTorch's kernel otherwise (one row; bf16, where it is what AMX is fast in;
    CUDA)."""
    if q.shape[2] > 1 and q.dtype == torch.float32 and q.device.type == "cpu":
        return grouped_products_attention(q, keys, values, mask)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                          enable_gqa=q.shape[1] != keys.shape[1])
