"""The Amphista draft model.

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

from vllm_amphista.model.config import AmphistaConfig
from vllm_amphista.model.layers import AutoEmbeddingBlock, ResBlock, RMSNorm, StagedAdaptationLayer
from vllm_amphista.model.sal_cache import SALCache
from vllm_amphista.model.target import TargetWeights


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
