"""The Amphista draft model (DESIGN.md §2).

    u_t  = W_f [h_t ; E(x_{t+1})]                  token fusion
    a^s  = SAL_s(a^{s-1}),  a^0 = u                staged adaptation layers (causal, RoPE)
    g_k  = ResBlock_k(a^{stage(k)}_t)              per-head residual blocks
    z    = AEB([g_1 .. g_K] + P)                   bi-directional attention over the K heads
    l_k  = lm_head(RMSNorm(z_k))                   target's frozen lm_head (maybe a sub-vocabulary)

Two entry points compute the same function: `forward` over whole sequences
(teacher forcing, for training) and `extend` over newly accepted positions
with a per-sequence SAL cache (for drafting).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vllm_amphista.config import AmphistaConfig
from vllm_amphista.kernels.head_attention import head_attention
from vllm_amphista.target import TargetWeights


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class SwiGLU(nn.Module):
    def __init__(self, size: int, ffn_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(size, ffn_size, bias=False)
        self.up_proj = nn.Linear(size, ffn_size, bias=False)
        self.down_proj = nn.Linear(ffn_size, size, bias=False)
        nn.init.zeros_(self.down_proj.weight)  # the residual branch starts silent

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate x [B, H, T, hd] by its sequence positions [B, T] (Llama's half-split layout)."""
    half = x.shape[-1] // 2
    inv_freq = theta ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = positions.to(torch.float32)[:, None, :, None] * inv_freq  # [B, 1, T, half]
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x.float()[..., :half], x.float()[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class StagedAdaptationLayer(nn.Module):
    """One Llama-style decoder layer: causal self-attention with RoPE, then SwiGLU."""

    def __init__(self, cfg: AmphistaConfig) -> None:
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.rope_theta = (
            cfg.num_attention_heads, cfg.num_key_value_heads, cfg.rope_theta)
        self.input_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.q_proj = nn.Linear(d, self.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, self.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, self.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.num_heads * hd, d, bias=False)
        nn.init.zeros_(self.o_proj.weight)
        self.post_attn_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.mlp = SwiGLU(d, cfg.ffn_size)

    def forward(
        self,
        x: torch.Tensor,  # [B, T, d]
        positions: torch.Tensor,  # [B, T]
        past: tuple[torch.Tensor, torch.Tensor] | None = None,  # [B, Hkv, L, hd] each
        mask: torch.Tensor | None = None,  # [B, 1, T, L+T] bool, True = may attend
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns the layer output and this call's new keys / values [B, Hkv, T, hd]."""
        b, t, _ = x.shape
        h = self.input_norm(x)
        q = self.q_proj(h).view(b, t, self.num_heads, -1).transpose(1, 2)
        k = self.k_proj(h).view(b, t, self.num_kv_heads, -1).transpose(1, 2)
        v = self.v_proj(h).view(b, t, self.num_kv_heads, -1).transpose(1, 2)
        q = apply_rope(q, positions, self.rope_theta)
        k = apply_rope(k, positions, self.rope_theta)
        keys, values = (k, v) if past is None else (
            torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2))
        attn = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, is_causal=mask is None,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
        x = x + self.o_proj(attn.transpose(1, 2).reshape(b, t, -1))
        x = x + self.mlp(self.post_attn_norm(x))
        return x, k, v


class ResBlock(nn.Module):
    """Medusa's residual block: x + SiLU(W x + b), zero-initialised to the identity."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(size, size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


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
        g = g + self.position_embedding
        for layer in self.layers:
            g = layer(g)
        return g


class SALCache:
    """Keys and values of every accepted position of one sequence, for each SAL stage.

    Storage grows by doubling so that appending one step's rows is amortised O(rows).
    """

    def __init__(self) -> None:
        self.length = 0
        self._keys: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []

    def keys(self, stage: int) -> torch.Tensor:  # [Hkv, length, hd]
        return self._keys[stage][:, : self.length]

    def values(self, stage: int) -> torch.Tensor:
        return self._values[stage][:, : self.length]

    def append(self, new_keys: list[torch.Tensor], new_values: list[torch.Tensor]) -> None:
        """Add [Hkv, n, hd] rows for every stage."""
        n = new_keys[0].shape[1]
        needed = self.length + n
        if not self._keys or needed > self._keys[0].shape[1]:
            capacity = max(needed, 2 * (self._keys[0].shape[1] if self._keys else 16))
            self._keys = [self._grow(old, new, capacity) for old, new in
                          zip(self._keys or [None] * len(new_keys), new_keys, strict=True)]
            self._values = [self._grow(old, new, capacity) for old, new in
                            zip(self._values or [None] * len(new_values), new_values, strict=True)]
        for stage, (k, v) in enumerate(zip(new_keys, new_values, strict=True)):
            self._keys[stage][:, self.length : needed] = k
            self._values[stage][:, self.length : needed] = v
        self.length = needed

    def _grow(self, old: torch.Tensor | None, like: torch.Tensor, capacity: int) -> torch.Tensor:
        buffer = like.new_empty(like.shape[0], capacity, like.shape[2])
        if old is not None:
            buffer[:, : self.length] = old[:, : self.length]
        return buffer

    def reset(self) -> None:
        self.length = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._keys + self._values)


class AmphistaDraftModel(nn.Module):
    def __init__(self, config: AmphistaConfig, target: TargetWeights | None = None) -> None:
        super().__init__()
        self.config = cfg = config
        d = cfg.hidden_size
        self.fusion = nn.Linear(2 * d, d, bias=False) if cfg.use_token_fusion else None
        if self.fusion is not None:
            # Start as "read h_t": identity on the hidden state, silent on the token embedding.
            with torch.no_grad():
                self.fusion.weight.zero_()
                self.fusion.weight[:, :d] = torch.eye(d)
        self.stages = nn.ModuleList(StagedAdaptationLayer(cfg) for _ in range(cfg.num_stages))
        self.heads = nn.ModuleList(
            nn.Sequential(*(ResBlock(d) for _ in range(cfg.num_head_layers)))
            for _ in range(cfg.num_heads))
        self.aeb = AutoEmbeddingBlock(cfg) if cfg.use_aeb else None
        self.final_norm = RMSNorm(d, cfg.rms_norm_eps) if cfg.uses_final_norm else None
        self.lm_heads = (nn.ParameterList(
            nn.Parameter(torch.zeros(cfg.logits_size, d)) for _ in range(cfg.num_heads))
            if cfg.own_lm_heads else None)
        if cfg.draft_vocab_size:
            self.register_buffer(
                "draft_to_target", torch.arange(cfg.draft_vocab_size, dtype=torch.long))
        else:
            self.draft_to_target = None
        # The target's frozen pieces: never saved, attached by attach_target().
        self.register_buffer("embed_tokens", None, persistent=False)
        self.register_buffer("lm_head_weight", None, persistent=False)
        if target is not None:
            self.attach_target(target)

    def attach_target(self, target: TargetWeights) -> None:
        cfg = self.config
        if (target.hidden_size, target.vocab_size) != (cfg.hidden_size, cfg.vocab_size):
            raise ValueError(
                f"target {target.name!r} has hidden_size={target.hidden_size}, "
                f"vocab_size={target.vocab_size}; the heads expect "
                f"hidden_size={cfg.hidden_size}, vocab_size={cfg.vocab_size}")
        dtype = next(self.parameters()).dtype
        self.embed_tokens = target.embed_tokens.to(dtype) if cfg.use_token_fusion else None
        self.refresh_lm_head(target.lm_head.to(dtype))

    def refresh_lm_head(self, lm_head: torch.Tensor) -> None:
        """Cache the lm_head rows of the draft vocabulary (all rows without a token map)."""
        self.lm_head_weight = (lm_head if self.draft_to_target is None
                               else lm_head[self.draft_to_target.to(lm_head.device)])

    # -- shared pieces -------------------------------------------------------------------
    def _fuse(self, hidden: torch.Tensor, next_tokens: torch.Tensor) -> torch.Tensor:
        if self.fusion is None:
            return hidden
        if self.embed_tokens is None:
            raise RuntimeError("token fusion needs the target's embedding: call attach_target()")
        return self.fusion(torch.cat((hidden, F.embedding(next_tokens, self.embed_tokens)), -1))

    def _head_logits(self, stage_features: list[torch.Tensor]) -> torch.Tensor:
        """Per-stage features [..., d] (index 0 = the fused input) -> logits [..., K, V']."""
        cfg = self.config
        g = torch.stack([
            head(stage_features[1 + cfg.stage_of_head(k) if cfg.num_stages else 0])
            for k, head in enumerate(self.heads)], dim=-2)
        if self.aeb is not None:
            g = self.aeb(g.reshape(-1, cfg.num_heads, cfg.hidden_size)).reshape(g.shape)
        if self.final_norm is not None:
            g = self.final_norm(g)
        if self.lm_heads is not None:
            return torch.stack([g[..., k, :] @ w.T for k, w in enumerate(self.lm_heads)], -2)
        if self.lm_head_weight is None:
            raise RuntimeError("logits need the target's lm_head: call attach_target()")
        return g @ self.lm_head_weight.T

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        if self.draft_to_target is None:
            return draft_ids
        return self.draft_to_target[draft_ids]

    # -- training: whole sequences -------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor, next_token_ids: torch.Tensor) -> torch.Tensor:
        """hidden_states [B, T, d], next_token_ids [B, T] -> logits [B, T, K, V'].

        Position t reads h_t and x_{t+1}; head k predicts x_{t+2+k}. Causal over T.
        """
        b, t, _ = hidden_states.shape
        positions = torch.arange(t, device=hidden_states.device).expand(b, t)
        features = [self._fuse(hidden_states, next_token_ids)]
        for stage in self.stages:
            features.append(stage(features[-1], positions)[0])
        return self._head_logits(features)

    # -- drafting: new positions against a per-sequence cache ------------------------------
    @torch.no_grad()
    def extend(
        self,
        caches: list[SALCache],
        hidden_states: list[torch.Tensor],  # per sequence [n_i, d], n_i >= 1
        next_token_ids: list[torch.Tensor],  # per sequence [n_i]
    ) -> torch.Tensor:
        """Consume accepted positions into each cache; logits [B, K, V'] at each last position."""
        b = len(caches)
        device = hidden_states[0].device
        lengths = torch.tensor([h.shape[0] for h in hidden_states], device=device)
        if int(lengths.min()) < 1:
            raise ValueError("every sequence must bring at least one new position")
        n_max = int(lengths.max())
        pad = [(0, 0, 0, n_max - h.shape[0]) for h in hidden_states]
        hidden = torch.stack([F.pad(h, p) for h, p in zip(hidden_states, pad, strict=True)])
        tokens = torch.stack([F.pad(x, (0, n_max - x.shape[0])) for x in next_token_ids])
        past_len = torch.tensor([c.length for c in caches], device=device)
        positions = past_len[:, None] + torch.arange(n_max, device=device)
        rows = torch.arange(b, device=device)
        features = [self._fuse(hidden, tokens)]
        if self.stages:
            l_max = int(past_len.max())
            # Key j < l_max is cached position j (valid if j < L_i); key l_max + m is new
            # position m, visible to query q when m <= q and m < n_i.
            key_idx = torch.arange(l_max + n_max, device=device)
            query_idx = torch.arange(n_max, device=device)
            new_idx = key_idx - l_max
            cached_ok = (key_idx[None, :] < past_len[:, None])[:, None, :]
            new_ok = ((new_idx[None, None, :] <= query_idx[None, :, None])
                      & (new_idx[None, None, :] >= 0)
                      & (new_idx[None, None, :] < lengths[:, None, None]))
            mask = (cached_ok | new_ok)[:, None]  # [B, 1, n_max, l_max + n_max]
            new_keys: list[list[torch.Tensor]] = [[] for _ in range(b)]
            new_values: list[list[torch.Tensor]] = [[] for _ in range(b)]
            for s, stage in enumerate(self.stages):
                past = self._padded_past(caches, s, l_max, hidden) if l_max else None
                out, k, v = stage(features[-1], positions, past, mask)
                features.append(out)
                for i in range(b):
                    new_keys[i].append(k[i, :, : int(lengths[i])])
                    new_values[i].append(v[i, :, : int(lengths[i])])
            for cache, ks, vs in zip(caches, new_keys, new_values, strict=True):
                cache.append(ks, vs)
        last = [f[rows, lengths - 1] for f in features]
        return self._head_logits(last)

    def _padded_past(self, caches: list[SALCache], stage: int, l_max: int,
                     like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage `stage`'s cached keys and values, zero-padded to [B, Hkv, l_max, hd]."""
        cfg = self.config
        shape = (len(caches), cfg.num_key_value_heads, l_max, cfg.head_dim)
        keys = like.new_zeros(shape)
        values = like.new_zeros(shape)
        for i, cache in enumerate(caches):
            if cache.length:
                keys[i, :, : cache.length] = cache.keys(stage)
                values[i, :, : cache.length] = cache.values(stage)
        return keys, values

    # -- checkpoint format (vllm_amphista.checkpoint) -----------------------------------
    def save_pretrained(self, folder) -> None:
        from vllm_amphista.checkpoint import save_checkpoint

        save_checkpoint(self, folder)

    @classmethod
    def from_pretrained(cls, folder, target: TargetWeights | None = None,
                        dtype: torch.dtype = torch.float32) -> AmphistaDraftModel:
        from vllm_amphista.checkpoint import load_checkpoint

        return load_checkpoint(folder, target=target, dtype=dtype)
