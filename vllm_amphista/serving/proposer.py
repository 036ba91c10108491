"""AmphistaProposer: drafts K tokens per request inside vLLM's model runner.

vLLM 0.32 builds it through the `custom_class` hook. That hook
passes no hidden states, so serving/patches.py routes the runner's
`propose_draft_token_ids` to `propose_from_step`, which gets, for each
request, the target's hidden-state rows of this step and where they sit.

Per request the proposer keeps a SAL cache of every accepted position. A step's
rows for request i start at absolute position s_i (its computed tokens before
the step). The rows whose KV the target kept are the prefill chunk, or in a
decode step the last sampled token plus the accepted drafts: exactly
`len(sampled_i)` rows then. Row t pairs with the next token x_{t+1}, read from
the runner's token table, which already holds this step's accepted tokens.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from vllm_amphista.machine import resolve_dtype
from vllm_amphista.model.checkpoint import check_target, load_checkpoint
from vllm_amphista.model.draft_model import AmphistaDraftModel
from vllm_amphista.model.sal_cache import SALCache
from vllm_amphista.model.target import TargetWeights
from vllm_amphista.serving.draft_sampling import (
    DraftSampling,
    draft_distribution,
    sample_drafts,
    to_target_vocab,
)
from vllm_amphista.serving.spec_config import ADDITIONAL_CONFIG_KEY, DEFAULT_DRAFT_SAMPLING
from vllm_amphista.serving.step import Proposal, StepDrafter, StepRows

# A child of vLLM's logger, so our lines appear with vLLM's own, formatted alike.
logger = logging.getLogger("vllm.amphista")



class AmphistaProposer(StepDrafter):
    def __init__(self, vllm_config) -> None:
        spec = vllm_config.speculative_config
        settings = (vllm_config.additional_config or {}).get(ADDITIONAL_CONFIG_KEY)
        if not settings or "heads" not in settings:
            raise ValueError(
                "AmphistaProposer needs speculative_config method 'amphista' with the "
                "heads folder as 'model'")
        self.heads_dir = Path(settings["heads"])
        # Above this many decoding requests a step gets no drafts: verifying K+1 tokens
        # per request costs more than it saves once the target is compute-bound.
        self.disable_by_batch_size: int | None = settings.get("disable_by_batch_size")
        self.draft_sampling: DraftSampling = settings.get("draft_sampling",
                                                          DEFAULT_DRAFT_SAMPLING)
        self.target_dir = Path(vllm_config.model_config.model)
        self.num_speculative_tokens = spec.num_speculative_tokens
        self.device = torch.device(vllm_config.device_config.device)
        # The draft model's own compute dtype (machine.py), whatever the target's: the
        # target's hidden states are cast to it.
        self.dtype = resolve_dtype(settings.get("draft_dtype"), self.device)
        self.tensor_parallel_size = vllm_config.parallel_config.tensor_parallel_size
        self.model: AmphistaDraftModel = load_checkpoint(self.heads_dir, dtype=self.dtype)
        self.model.to(self.device)
        if self.num_speculative_tokens > self.model.config.num_heads:
            raise ValueError(
                f"num_speculative_tokens={self.num_speculative_tokens} exceeds the "
                f"{self.model.config.num_heads} heads in {self.heads_dir}")
        self.caches: dict[str, SALCache] = {}
        # (start position the next rows must have) per request, to detect recompute.
        self._next_position: dict[str, int] = {}

    # -- vLLM's custom_class interface ---------------------------------------------------
    def load_model(self, target_model: torch.nn.Module) -> None:
        """Attach the target's frozen embedding and lm_head (called by the runner)."""
        target = None
        if self.tensor_parallel_size == 1:
            target = self._weights_from_vllm_model(target_model)
        if target is None:  # vocab-sharded weights or an unknown layout: read the files
            target = TargetWeights.from_folder(self.target_dir)
        check_target(self.model.config, target, self.heads_dir)
        self.model.attach_target(target)
        self.model.to(self.device)

    def _weights_from_vllm_model(self, target_model: torch.nn.Module) -> TargetWeights | None:
        vocab = self.model.config.vocab_size
        embed = getattr(getattr(target_model, "model", None), "embed_tokens", None)
        head = getattr(target_model, "lm_head", None)
        if embed is None or head is None or embed.weight.shape[0] < vocab:
            return None
        return TargetWeights(name=self.target_dir.name, hidden_size=embed.weight.shape[1],
                             vocab_size=vocab, embed_tokens=embed.weight[:vocab],
                             lm_head=head.weight[:vocab])

    # -- the real entry point ------------------------------------------------------------
    def propose_from_step(self, step: StepRows) -> Proposal:
        drafts: list[list[int]] = [[] for _ in step.req_ids]
        if self.disable_by_batch_size is not None and sum(
                1 for s in step.sampled_token_ids if s) > self.disable_by_batch_size:
            # Pause: no draft pass at all. A paused request's cache no longer ends where
            # its next rows start, so _cache_for restarts it when drafting resumes.
            return Proposal(drafts)
        caches, hiddens, next_tokens, drafting = [], [], [], []
        hidden_states = step.hidden_states.to(self.dtype)
        for i, req_id in enumerate(step.req_ids):
            rows = step.accepted_rows(i)
            if rows == 0:
                continue
            start = int(step.start_positions[i])
            cache = self._cache_for(req_id, start)
            first = int(step.query_start_loc[i])
            caches.append(cache)
            hiddens.append(hidden_states[first: first + rows])
            next_tokens.append(torch.from_numpy(
                step.token_ids[i, start + 1: start + rows + 1].astype(np.int64)).to(self.device))
            drafting.append(i)
            self._next_position[req_id] = start + rows
        if not caches:
            return Proposal(drafts)
        logits = self.model.extend(caches, hiddens, next_tokens)[:, : self.num_speculative_tokens]
        ids, draft_probs = self._choose(logits, step, drafting)
        tokens = self.model.to_target_ids(ids).tolist()
        for row, i in enumerate(drafting):
            if step.sampled_token_ids[i]:  # a partial prefill gets no draft
                drafts[i] = tokens[row]
        return Proposal(drafts, draft_probs)

    def _choose(self, logits: torch.Tensor, step: StepRows,
                drafting: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Draft-vocabulary ids [n, K] for the drafting requests, and their q
        (Proposal.draft_probs) if any of them samples."""
        ids = logits.argmax(-1)
        if step.sampling is None or self.draft_sampling == "argmax":
            return ids, None
        rows = step.sampling.rows(drafting)
        sampled = (~rows.is_greedy).nonzero().flatten().tolist()
        if not sampled:
            return ids, None
        sampled_rows = rows.rows(sampled)
        q = draft_distribution(logits[sampled], sampled_rows)
        ids[sampled] = sample_drafts(q, sampled_rows.generators)
        vocab_size = self.model.config.vocab_size
        draft_probs = q.new_zeros(len(step.req_ids), logits.shape[1], vocab_size)
        draft_probs[[drafting[r] for r in sampled]] = to_target_vocab(
            q, self.model.draft_to_target, vocab_size)
        return ids, draft_probs

    def _cache_for(self, req_id: str, start: int) -> SALCache:
        cache = self.caches.get(req_id)
        if cache is None:
            cache = self.caches[req_id] = SALCache()
        elif self._next_position.get(req_id) != start:
            # Preempted and recomputed (start 0) or a gap: what the cache holds no longer
            # precedes these rows. RoPE attention is shift-invariant, so starting afresh at
            # any position is sound.
            cache.reset()
        return cache

    def release(self, req_id: str, request=None) -> None:
        """Forget a finished or aborted request."""
        if self.caches.pop(req_id, None) is not None and not self.caches:
            logger.info("amphista: draft caches empty (all requests released)")
        self._next_position.pop(req_id, None)

    def cache_stats(self) -> dict[str, int]:
        return {"sequences": len(self.caches),
                "bytes": sum(c.nbytes() for c in self.caches.values())}
