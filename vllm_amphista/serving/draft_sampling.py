"""Draft tokens for the rejection sampler: argmax for greedy requests, samples from q otherwise.

Speculative sampling keeps the target's distribution p exactly when each draft token is
drawn from a known distribution q and verified with acceptance min(1, p/q), a rejection
resampling from max(p - q, 0). vLLM's rejection sampler does that when it is given q as
`draft_probs`; without them it treats a draft as one-hot (q = 1 at the drafted token),
which is also exact. Amphista's heads give every position its own q in one pass; head k's
q does not depend on the tokens drafted at earlier positions, so it is the distribution
the draft at position k was drawn from, as the acceptance test requires.

For a sampled request, q is the head's softmax at the request's temperature, cut to its
top-k and top-p, over the draft vocabulary (zeros elsewhere in the target's vocabulary).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

# "sample": sampled requests draw drafts from q and send q; "argmax": every request drafts
# its heads' argmax and vLLM treats it as one-hot.
DraftSampling = Literal["sample", "argmax"]
DRAFT_SAMPLING_MODES: tuple[DraftSampling, ...] = ("sample", "argmax")


@dataclass
class RequestSampling:
    """Sampling parameters of the requests being drafted for, one row each."""

    temperature: torch.Tensor  # [n] float; 0 = greedy
    top_k: torch.Tensor | None  # [n] int; >= vocabulary size = no cut
    top_p: torch.Tensor | None  # [n] float; 1 = no cut
    generators: dict[int, torch.Generator]  # row -> the request's own generator (seeded)

    @property
    def is_greedy(self) -> torch.Tensor:
        return self.temperature == 0

    def rows(self, index: list[int]) -> RequestSampling:
        """The rows `index` (in that order), generators renumbered to match."""
        at = torch.tensor(index, dtype=torch.long)
        position = {old: new for new, old in enumerate(index)}
        return RequestSampling(
            temperature=self.temperature[at],
            top_k=None if self.top_k is None else self.top_k[at],
            top_p=None if self.top_p is None else self.top_p[at],
            generators={position[i]: g for i, g in self.generators.items() if i in position})


# A cut (top-k, or top-p whose mass the leading tokens already hold) is looked for among
# this many leading tokens per row and head: ranking them is a partial sort, ~25x cheaper
# than sorting the whole draft vocabulary at batch 256.
CANDIDATES = 256


@dataclass
class DraftQ:
    """q on its support: probs [n, K, c] of draft-vocabulary ids [n, K, c], zero elsewhere."""

    probs: torch.Tensor
    ids: torch.Tensor

    def write_into(self, out: torch.Tensor, rows: torch.Tensor,
                   draft_to_target: torch.Tensor | None) -> None:
        """out[rows[i], k, target id] = q: out [N, K, V] over the target vocabulary, zeros
        where q is zero (out comes zeroed)."""
        ids = self.ids if draft_to_target is None else draft_to_target[self.ids]
        heads = torch.arange(ids.shape[1], device=ids.device)
        out[rows[:, None, None], heads[None, :, None], ids] = self.probs

    def dense(self, vocab_size: int, draft_to_target: torch.Tensor | None = None) -> torch.Tensor:
        """q as [n, K, vocab_size]."""
        out = self.probs.new_zeros(*self.probs.shape[:2], vocab_size)
        self.write_into(out, torch.arange(len(out), device=out.device), draft_to_target)
        return out


def draft_distribution(logits: torch.Tensor, sampling: RequestSampling) -> DraftQ:
    """logits [n, K, V'] -> q at each row's temperature, top-k, top-p. Rows must not be
    greedy (temperature > 0)."""
    logits = logits.float() / sampling.temperature.float()[:, None, None]
    n, k, v = logits.shape
    if sampling.top_k is None and sampling.top_p is None:
        return DraftQ(logits.softmax(-1), torch.arange(v, device=logits.device).expand(n, k, v))
    top_k = (torch.full((n,), v) if sampling.top_k is None
             else sampling.top_k.clamp(max=v)).to(logits.device)[:, None, None]
    # Top-p weighs each token against the tokens top-k keeps: all of them where it keeps all.
    full_norm = None if sampling.top_p is None else logits.logsumexp(-1, keepdim=True)
    ranked, order = _leading(logits, top_k, sampling.top_p, full_norm)
    rank = torch.arange(ranked.shape[-1], device=ranked.device)
    drop = rank >= top_k
    if sampling.top_p is not None:
        kept = ranked.masked_fill(drop, float("-inf"))
        norm = torch.where(top_k >= v, full_norm, kept.logsumexp(-1, keepdim=True))
        probs = (kept - norm).exp()
        mass_before = probs.cumsum(-1) - probs  # the most likely token is always kept
        drop = drop | (mass_before >= sampling.top_p.to(ranked.device)[:, None, None])
    return DraftQ(ranked.masked_fill(drop, float("-inf")).softmax(-1), order)


def _leading(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor | None,
             full_norm: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The leading tokens of every row and head, most likely first, enough to hold each
    row's cut: the top max(top_k) when that is at most CANDIDATES, or the top CANDIDATES
    when they already hold each uncut row's top_p mass; otherwise the whole sorted row."""
    v = logits.shape[-1]
    width = int(top_k.max())
    if width <= CANDIDATES:
        return logits.topk(width, -1)
    if top_p is not None and full_norm is not None and CANDIDATES < v:
        ranked, order = logits.topk(CANDIDATES, -1)
        mass = (ranked - full_norm).exp().sum(-1, keepdim=True)
        # Rows cut by top-k renormalise over their top-k; only rows top-k leaves whole
        # can use the full-vocabulary mass, so any other wide row takes the full sort.
        holds = torch.where(top_k > CANDIDATES, (top_k >= v) & (mass >= top_p.to(
            mass.device)[:, None, None]), torch.ones_like(mass, dtype=torch.bool))
        if bool(holds.all()):
            return ranked, order
    return logits.sort(-1, descending=True)


def sample_drafts(q: DraftQ, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """One draft-vocabulary token per (row, head); seeded rows use their own generator."""
    n, k, c = q.probs.shape
    pick = torch.multinomial(q.probs.reshape(n * k, c), 1).view(n, k, 1)
    for row, generator in generators.items():
        pick[row] = torch.multinomial(q.probs[row], 1, generator=generator)
    return q.ids.gather(-1, pick).squeeze(-1)
