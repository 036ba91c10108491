"""The Amphista draft model.

    u_t  = W_f [h_t ; E(x_{t+1})]                  token fusion
    a^s  = SAL_s(a^{s-1}),  a^0 = u                staged adaptation layers (causal, RoPE)
    g_k  = ResBlock_k(a^{stage(k)}_t)              per-head residual blocks
    z    = AEB([g_1 .. g_K] + P)                   bi-directional attention over the K heads
    l_k  = lm_head(RMSNorm(z_k))                   target's frozen lm_head (maybe a sub-vocabulary)

Two entry points compute the same function: `forward` over whole sequences
(teacher forcing, for training) and `extend` over newly accepted positions
against a SAL cache indexed by batch slot (for drafting).
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vllm_amphista.kernels.packed_linear import PackedLinear, can_pack, pack_linears
from vllm_amphista.model.config import AmphistaConfig
from vllm_amphista.model.layers import (
    AutoEmbeddingBlock,
    ResBlock,
    ResBlockGroup,
    RMSNorm,
    RotaryTable,
    StagedAdaptationLayer,
    SwiGLU,
    attention_dtype,
)
from vllm_amphista.model.sal_cache import SALCache, rows_by_slot
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
        self.rope = RotaryTable(cfg.head_dim, cfg.rope_theta)
        self.heads = nn.ModuleList(
            nn.Sequential(*(ResBlock(d) for _ in range(cfg.num_head_layers)))
            for _ in range(cfg.num_heads))
        self.head_groups: nn.ModuleList | None = None  # pack_for_drafting()
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
        self.packed_lm_head: PackedLinear | None = None  # pack_for_drafting()
        self.drafted_heads = cfg.num_heads  # draft_leading_heads()
        if target is not None:
            self.attach_target(target)

    def attach_target(self, target: TargetWeights) -> None:
        cfg = self.config
        if (target.hidden_size, target.vocab_size) != (cfg.hidden_size, cfg.vocab_size):
            raise ValueError(
                f"target {target.name!r} has hidden_size={target.hidden_size}, "
                f"vocab_size={target.vocab_size}; the heads expect "
                f"hidden_size={cfg.hidden_size}, vocab_size={cfg.vocab_size}")
        dtype = self._a_weight().dtype
        self.embed_tokens = target.embed_tokens.to(dtype) if cfg.use_token_fusion else None
        self.refresh_lm_head(target.lm_head.to(dtype))

    def refresh_lm_head(self, lm_head: torch.Tensor) -> None:
        """Cache the lm_head rows of the draft vocabulary (all rows without a token map)."""
        self.lm_head_weight = (lm_head if self.draft_to_target is None
                               else lm_head[self.draft_to_target.to(lm_head.device)])
        if self.packed_lm_head is not None:
            self.packed_lm_head = PackedLinear(self.lm_head_weight)

    def pack_for_drafting(self) -> bool:
        """Prepack every weight matrix, the vocabulary projection included, for faster
        drafting on a CPU (kernels/packed_linear.py), the products that read the same input
        fused into one (q/k/v, gate/up); no-op elsewhere. After this
        the model drafts (extend, forward without grad) but cannot be trained."""
        weight = self._a_weight()
        if not can_pack(weight.dtype, weight.device) or self.lm_head_weight is None:
            return False
        for layer in [m for m in self.modules() if isinstance(m, (StagedAdaptationLayer, SwiGLU))]:
            layer.fuse_for_drafting()
        if self.config.num_head_layers == 1:
            # The heads of one stage read the same features: one product per stage (with
            # num_stages <= num_heads every stage has a head).
            cfg = self.config
            self.head_groups = nn.ModuleList(
                ResBlockGroup([self.heads[k][0] for k in range(cfg.num_heads)
                               if cfg.stage_of_head(k) == stage])
                for stage in range(max(1, cfg.num_stages)))
            self.heads = None
        pack_linears(self)
        self.packed_lm_head = PackedLinear(self.lm_head_weight)
        return True

    def draft_leading_heads(self, heads: int) -> None:
        """Draft with the first `heads` heads only: `extend` and `forward` compute their
        logits and the SAL stages they read, nothing for the heads after them (K=4, S=2,
        two heads: one SAL stage of two, two heads' blocks, the AEB over two positions).
        The AEB then attends over those heads alone, so their logits are not the whole
        model's (the shipped heads' drafts, first two of four: docs/results.md). Before
        the first `new_cache`: a cache holds the stages it was made for."""
        if not 1 <= heads <= self.config.num_heads:
            raise ValueError(f"{heads} drafted heads: the model has {self.config.num_heads}")
        self.drafted_heads = heads

    # -- shared pieces -------------------------------------------------------------------
    def _a_weight(self) -> torch.Tensor:
        """A weight in the dtype and on the device the model computes in. Packed weights
        are buffers: Medusa-mode heads, once packed, have no parameters left."""
        return next(t for t in itertools.chain(self.parameters(), self.buffers())
                    if t.is_floating_point())

    def _fuse(self, hidden: torch.Tensor, next_tokens: torch.Tensor) -> torch.Tensor:
        if self.fusion is None:
            return hidden
        if self.embed_tokens is None:
            raise RuntimeError("token fusion needs the target's embedding: call attach_target()")
        return self.fusion(torch.cat((hidden, F.embedding(next_tokens, self.embed_tokens)), -1))

    def _drafted_stages(self) -> list[StagedAdaptationLayer]:
        """The SAL stages the drafted heads read (none without stages). A list, not a
        ModuleList slice: building one of those costs ~8 us, twice a pass."""
        count = self.config.stage_of_head(self.drafted_heads - 1) + 1 if self.stages else 0
        return list(itertools.islice(self.stages, count))

    def _head_logits(self, stage_features: list[torch.Tensor]) -> torch.Tensor:
        """Per-stage features [..., d] (index 0 = the fused input) -> the drafted heads'
        logits [..., K', V']."""
        cfg, heads = self.config, self.drafted_heads
        if self.head_groups is not None:
            groups = self.head_groups[: max(1, len(self._drafted_stages()))]
            g = torch.cat([group(stage_features[1 + stage if cfg.num_stages else 0])
                           for stage, group in enumerate(groups)], dim=-2)[..., :heads, :]
        else:
            g = torch.stack([
                self.heads[k](stage_features[1 + cfg.stage_of_head(k) if cfg.num_stages else 0])
                for k in range(heads)], dim=-2)
        if self.aeb is not None:
            g = self.aeb(g.reshape(-1, heads, cfg.hidden_size)).reshape(g.shape)
        if self.final_norm is not None:
            g = self.final_norm(g)
        if self.lm_heads is not None:
            return torch.stack([g[..., k, :] @ self.lm_heads[k].T for k in range(heads)], -2)
        if self.packed_lm_head is not None:
            return self.packed_lm_head(g)
        if self.lm_head_weight is None:
            raise RuntimeError("logits need the target's lm_head: call attach_target()")
        return g @ self.lm_head_weight.T

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        if self.draft_to_target is None:
            return draft_ids
        return self.draft_to_target[draft_ids]

    # -- training: whole sequences -------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor, next_token_ids: torch.Tensor,
                at: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """hidden_states [B, T, d], next_token_ids [B, T] -> logits [B, T, K', V'] of the
        drafted heads (all K unless `draft_leading_heads` cut them).

        Position t reads h_t and x_{t+1}; head k predicts x_{t+2+k}. Causal over T.
        at = (rows [N], positions [N]): logits at those positions only, [N, K', V'] (the
        heads and the projection onto the vocabulary, most of the cost, see no other).
        """
        b, t, _ = hidden_states.shape
        features = [self._fuse(hidden_states, next_token_ids)]
        if self.stages:
            cos, sin = self.rope.lookup(
                torch.arange(t, device=hidden_states.device).expand(b, t), t)
            for stage in self._drafted_stages():
                features.append(stage(features[-1], cos, sin))
        if at is not None:
            features = [f[at] for f in features]
        return self._head_logits(features)

    # -- drafting: new rows against the SAL cache ---------------------------------------
    def new_cache(self) -> SALCache:
        """An empty SAL cache for the stages drafting reads, on this model's device, in
        the dtype its attention against the cache computes in (`attention_dtype`)."""
        weight = self._a_weight()
        return SALCache(self.config, attention_dtype(weight.dtype, weight.device),
                        weight.device, stages=len(self._drafted_stages()))

    @torch.no_grad()
    def extend(self, cache: SALCache, hidden_states: torch.Tensor, next_token_ids: torch.Tensor,
               counts: np.ndarray, logits: bool = True) -> torch.Tensor | None:
        """Consume new positions into cache slots 0..B-1; logits [B, K', V'] of the
        drafted heads (K' = `drafted_heads`) at each slot's last new position
        (logits=False: only the cache, about half the pass's time).

        hidden_states [N, d] and next_token_ids [N] are the new rows of every slot, slot by
        slot in order, counts[i] of them for slot i (0: slot i sits this step out; its
        logits row is then meaningless; at least one row in all). Position j of a slot
        attends to its cached positions and to its new positions up to j.
        """
        counts = np.asarray(counts, np.int64)
        if not counts.any():
            raise ValueError("extend needs at least one new row")
        b, device = len(counts), hidden_states.device
        n_max = max(1, int(counts.max()))
        ends = np.cumsum(counts)
        row_slot, row_offset = rows_by_slot(counts)
        slot_t, offset_t = (torch.from_numpy(a).to(device) for a in (row_slot, row_offset))
        last = torch.from_numpy(np.maximum(ends - 1, 0)).to(device)  # each slot's last row

        # Everything but attention runs on the new rows alone, as one sequence [1, N, d]:
        # padded to [B, n_max, d] a joining prompt would cost B times its length.
        x = self._fuse(hidden_states, next_token_ids)[None]
        features = [x[0, last]]
        cache.reserve(b, 1)
        past = cache.lengths[:b].copy()
        total = int((past + counts).max())
        cache.reserve(b, total)  # stage-less heads: positions counted, nothing stored
        stages = self._drafted_stages()
        if stages:
            # Each row's position in its slot; key j of slot i is visible to the new
            # position p of slot i (padded to [B, n_max]) when j <= p.
            write_at = torch.from_numpy(past[row_slot] + row_offset).to(device)
            cos, sin = self.rope.lookup(write_at[None], total)
            positions = torch.from_numpy(past[:, None] + np.arange(n_max)).to(device)
            mask = (torch.arange(total, device=device) <= positions[..., None])[:, None]
            # Every slot with n_max new rows (always at one request): the rows are the
            # padded batch already, reshaped; else scattered into it and gathered back.
            uniform = bool((counts == n_max).all())
            for s, stage in enumerate(stages):
                q, k, v = (t[0].transpose(0, 1) for t in stage.project(x, cos, sin))
                cache.keys[s, slot_t, :, write_at] = k.to(cache.keys.dtype)
                cache.values[s, slot_t, :, write_at] = v.to(cache.values.dtype)
                if uniform:
                    padded = q.view(b, n_max, *q.shape[1:])
                else:
                    padded = q.new_zeros(b, n_max, *q.shape[1:])
                    padded[slot_t, offset_t] = q
                attn = stage.attend(padded.transpose(1, 2), cache.keys[s, :b, :, :total],
                                    cache.values[s, :b, :, :total], mask)
                attn = (attn.transpose(1, 2).reshape(q.shape) if uniform
                        else attn[slot_t, :, offset_t])
                x = stage.finish(x, attn.transpose(0, 1)[None])
                features.append(x[0, last])
        cache.lengths[:b] = past + counts
        return self._head_logits(features) if logits else None
