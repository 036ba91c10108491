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


def draft_distribution(logits: torch.Tensor, sampling: RequestSampling) -> torch.Tensor:
    """logits [n, K, V'] -> q [n, K, V'] float32 at each row's temperature, top-k, top-p.
    Rows must not be greedy (temperature > 0)."""
    logits = logits.float() / sampling.temperature.float()[:, None, None]
    if sampling.top_k is None and sampling.top_p is None:
        return logits.softmax(-1)
    ranked, order = logits.sort(-1, descending=True)
    drop = torch.zeros_like(ranked, dtype=torch.bool)
    if sampling.top_k is not None:
        rank = torch.arange(ranked.shape[-1], device=ranked.device)
        drop |= rank >= sampling.top_k.to(ranked.device)[:, None, None]
    if sampling.top_p is not None:
        probs = ranked.masked_fill(drop, float("-inf")).softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # the most likely token is always kept
        drop |= mass_before >= sampling.top_p.to(ranked.device)[:, None, None]
    ranked = ranked.masked_fill(drop, float("-inf"))
    return logits.scatter(-1, order, ranked).softmax(-1)


def sample_drafts(q: torch.Tensor, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """One token per (row, head) from q [n, K, V']; seeded rows use their own generator."""
    n, k, v = q.shape
    ids = torch.multinomial(q.reshape(n * k, v), 1).view(n, k)
    for row, generator in generators.items():
        ids[row] = torch.multinomial(q[row], 1, generator=generator).view(k)
    return ids


def to_target_vocab(q: torch.Tensor, draft_to_target: torch.Tensor | None,
                    vocab_size: int) -> torch.Tensor:
    """q over the draft vocabulary [..., V'] -> [..., V], zero outside it."""
    if draft_to_target is None:
        return q
    full = q.new_zeros(*q.shape[:-1], vocab_size)
    full[..., draft_to_target] = q
    return full
