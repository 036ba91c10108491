"""Building blocks of the draft model: Llama-style norms, MLP and RoPE, the staged
adaptation layer, Medusa's residual block, and the auto-embedding block."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vllm_amphista.kernels.cache_attention import cache_attention
from vllm_amphista.kernels.head_attention import head_attention
from vllm_amphista.kernels.packed_linear import PackedLinear
from vllm_amphista.kernels.rms_norm import rms_norm
from vllm_amphista.machine import CpuInfo, cpu_info
from vllm_amphista.model.config import AmphistaConfig


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class SwiGLU(nn.Module):
    def __init__(self, size: int, ffn_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(size, ffn_size, bias=False)
        self.up_proj = nn.Linear(size, ffn_size, bias=False)
        self.down_proj = nn.Linear(ffn_size, size, bias=False)
        nn.init.zeros_(self.down_proj.weight)  # the residual branch starts silent
        self.gate_up: PackedLinear | None = None  # fuse_for_drafting()

    def fuse_for_drafting(self) -> None:
        """gate and up as one packed product: at a few rows each product has a fixed cost
        (one row, AVX2 EPYC, fp16 weights: 174 us as two, 112 us as one)."""
        self.gate_up = PackedLinear(torch.cat((self.gate_proj.weight, self.up_proj.weight)))
        self.gate_proj = self.up_proj = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is not None:
            gate, up = self.gate_up(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class RotaryTable:
    """cos/sin of Llama's RoPE for positions 0..length-1, each repeated over both halves
    of a head (as `apply_rope` multiplies), computed once and grown by doubling, so that a
    drafting step only indexes it."""

    def __init__(self, head_dim: int, theta: float) -> None:
        half = head_dim // 2
        self.inv_freq = theta ** (-torch.arange(half, dtype=torch.float32) / half)
        self.cos = self.sin = torch.empty(0, head_dim)

    def lookup(self, positions: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T], all below `length` -> cos, sin [B, T, 1, head_dim] (fp32)."""
        needed = length
        if needed > self.cos.shape[0] or self.cos.device != positions.device:
            length = max(needed, 2 * self.cos.shape[0], 64)
            angles = (torch.arange(length, dtype=torch.float32, device=positions.device)[:, None]
                      * self.inv_freq.to(positions.device))
            self.cos, self.sin = angles.cos().repeat(1, 2), angles.sin().repeat(1, 2)
        return self.cos[positions][:, :, None], self.sin[positions][:, :, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, H, hd] (Llama's half-split layout) by RotaryTable.lookup's cos/sin:
    (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), in fp32."""
    half = x.shape[-1] // 2
    x32 = x.float()
    rotated = torch.cat((-x32[..., half:], x32[..., :half]), dim=-1)
    return (x32 * cos + rotated * sin).to(x.dtype)


def attention_dtype(dtype: torch.dtype, device: torch.device | str,
                    cpu: CpuInfo | None = None) -> torch.dtype:
    """The dtype drafting's attention against the SAL cache computes in, and so the
    cache's: fp32 for bf16 on a CPU without AMX, where PyTorch's attention kernel takes ~6x
    longer in bf16 at that shape (206 vs 32 us for 1 query against 200 keys, AMD EPYC with
    avx512_bf16). With AMX bf16 is the faster one (Intel Xeon, one thread, 9 query heads
    over 3 against 201 keys: 21 vs 27 us at 1 request, 60 vs 85 at 4, 291 vs 452 at 16),
    and half the bytes to read. A cache kept in bf16 where attention runs in fp32 would
    be cast whole at every pass (docs/decisions.md has the measurements)."""
    if (dtype == torch.bfloat16 and torch.device(device).type == "cpu"
            and (cpu or cpu_info()).bf16_kind != "amx-bf16"):
        return torch.float32
    return dtype


class StagedAdaptationLayer(nn.Module):
    """One Llama-style decoder layer: causal self-attention with RoPE, then SwiGLU.

    `forward` runs whole sequences (training); drafting runs `project`, attends against
    its cache, then `finish` (AmphistaDraftModel.extend)."""

    def __init__(self, cfg: AmphistaConfig) -> None:
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.input_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.q_proj = nn.Linear(d, self.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, self.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, self.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.num_heads * hd, d, bias=False)
        nn.init.zeros_(self.o_proj.weight)
        self.post_attn_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.mlp = SwiGLU(d, cfg.ffn_size)
        self.qkv: PackedLinear | None = None  # fuse_for_drafting()

    def fuse_for_drafting(self) -> None:
        """q, k and v as one packed product (one row, AVX2 EPYC: 92 us as three, 44 as one)."""
        self.qkv = PackedLinear(torch.cat((self.q_proj.weight, self.k_proj.weight,
                                           self.v_proj.weight)))
        self.q_proj = self.k_proj = self.v_proj = None

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, d] -> q [B, H, T, hd], k and v [B, Hkv, T, hd], RoPE applied."""
        b, t, _ = x.shape
        h = self.input_norm(x)
        if self.qkv is not None:
            # Drafting: q's and k's heads rotated together, one RoPE for both.
            qkv = self.qkv(h).view(b, t, self.num_heads + 2 * self.num_kv_heads, -1)
            qk = apply_rope(qkv[:, :, : self.num_heads + self.num_kv_heads], cos, sin)
            q, k = qk.split((self.num_heads, self.num_kv_heads), dim=2)
            v = qkv[:, :, self.num_heads + self.num_kv_heads:]
        else:
            q = apply_rope(self.q_proj(h).view(b, t, self.num_heads, -1), cos, sin)
            k = apply_rope(self.k_proj(h).view(b, t, self.num_kv_heads, -1), cos, sin)
            v = self.v_proj(h).view(b, t, self.num_kv_heads, -1)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               mask: torch.Tensor | None) -> torch.Tensor:
        """mask [B, 1, T, L] bool (True = may attend); None = causal over T = L.

        Drafting (a mask, a few queries against the cache) computes in
        `attention_dtype`, which the cache is kept in: only q is cast then."""
        dtype = q.dtype
        if mask is None:
            return F.scaled_dot_product_attention(
                q, keys, values, is_causal=True, enable_gqa=self.num_heads != self.num_kv_heads)
        work = attention_dtype(dtype, q.device)
        return cache_attention(q.to(work), keys.to(work), values.to(work), mask).to(dtype)

    def finish(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        b, _, t, _ = attn.shape
        x = x + self.o_proj(attn.transpose(1, 2).reshape(b, t, -1))
        return x + self.mlp(self.post_attn_norm(x))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        q, k, v = self.project(x, cos, sin)
        return self.finish(x, self.attend(q, k, v, None))


class ResBlock(nn.Module):
    """Medusa's residual block: x + SiLU(W x + b), zero-initialised to the identity."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(size, size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


class ResBlockGroup(nn.Module):
    """Residual blocks that read the same input (the heads of one stage) as one packed
    product, for drafting: x -> [..., n, d], block i's x + SiLU(W_i x + b_i) at i. At a
    few rows each product has a fixed cost (the SmolLM2 heads, four blocks of 576: the
    draft pass 0.1-0.2 ms faster, weights warm, with two products instead of four)."""

    def __init__(self, blocks: list[ResBlock]) -> None:
        super().__init__()
        self.count = len(blocks)
        self.linear = PackedLinear(torch.cat([b.linear.weight for b in blocks]),
                                   torch.cat([b.linear.bias for b in blocks]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.silu(self.linear(x))
        return x[..., None, :] + y.view(*x.shape[:-1], self.count, x.shape[-1])


class AutoEmbeddingLayer(nn.Module):
    """Pre-norm encoder layer: bi-directional multi-head attention over the K heads, SwiGLU."""

    def __init__(self, cfg: AmphistaConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.attn_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.qkv_proj = nn.Linear(d, 3 * d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        nn.init.zeros_(self.o_proj.weight)
        self.ffn_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.mlp = SwiGLU(d, cfg.ffn_size)

    def forward(self, g: torch.Tensor) -> torch.Tensor:  # [N, K, d]
        n, k, d = g.shape
        qkv = self.qkv_proj(self.attn_norm(g)).view(n, k, 3, self.num_heads, -1)
        q, key, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [N, H, K, hd]
        attn = head_attention(q, key, v)
        g = g + self.o_proj(attn.transpose(1, 2).reshape(n, k, d))
        return g + self.mlp(self.ffn_norm(g))


class AutoEmbeddingBlock(nn.Module):
    def __init__(self, cfg: AmphistaConfig) -> None:
        super().__init__()
        self.position_embedding = nn.Parameter(torch.zeros(cfg.num_heads, cfg.hidden_size))
        self.layers = nn.ModuleList(AutoEmbeddingLayer(cfg) for _ in range(cfg.num_aeb_layers))

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        g = g + self.position_embedding[: g.shape[-2]]  # fewer when drafting fewer heads
        for layer in self.layers:
            g = layer(g)
        return g
