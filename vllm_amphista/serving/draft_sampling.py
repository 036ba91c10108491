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

from vllm_amphista.serving.top_k_top_p import leading_cut

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


@dataclass
class DraftQ:
    """q over the draft vocabulary: probs [n, K, c] of draft-vocabulary ids [n, K, c], zero
    elsewhere; ids None: probs cover every draft id, in id order (no top-k, top-p cut)."""

    probs: torch.Tensor
    ids: torch.Tensor | None = None

    def dense(self, vocab_size: int, draft_to_target: torch.Tensor | None = None) -> torch.Tensor:
        """q as [n, K, vocab_size] over the target vocabulary (the draft vocabulary's ids
        mapped by draft_to_target; None: they are the target's). Columns copied whole
        (`index_copy_`): putting q there entry by entry took twice as long (one thread,
        4 requests x 3 heads x 8192 entries into 49,152 columns: 0.91 against 0.43 ms)."""
        n, k, _ = self.probs.shape
        draft_vocab = vocab_size if draft_to_target is None else len(draft_to_target)
        probs = self.probs
        if self.ids is not None:
            probs = probs.new_zeros(n, k, draft_vocab).scatter_(-1, self.ids, probs)
        if draft_to_target is None:
            return probs
        return probs.new_zeros(n, k, vocab_size).index_copy_(-1, draft_to_target, probs)


def draft_distribution(logits: torch.Tensor, sampling: RequestSampling) -> DraftQ:
    """logits [n, K, V'] -> q at each row's temperature, top-k, top-p (vLLM's cut). Rows
    must not be greedy (temperature > 0)."""
    logits = logits.float() / sampling.temperature.float()[:, None, None]
    n, k, _ = logits.shape
    if sampling.top_k is None and sampling.top_p is None:
        return DraftQ(logits.softmax(-1))
    top_k, top_p = (None if x is None else x[:, None].expand(n, k)  # each head, its row's
                    for x in (sampling.top_k, sampling.top_p))
    ranked, order, kept = leading_cut(logits, top_k, top_p)
    return DraftQ(ranked.masked_fill(~kept, float("-inf")).softmax(-1), order)


def seeded_uniform(shape: tuple[int, ...], generators: dict[int, torch.Generator],
                   dtype: torch.dtype, device) -> torch.Tensor:
    """Uniforms in [0, 1) of `shape`; row i (of the first dimension) from generators[i]
    where given (a seeded request's), the rest from the global generator."""
    uniform = torch.rand(shape, dtype=dtype, device=device)
    for row, generator in generators.items():
        uniform[row] = torch.rand(shape[1:], dtype=dtype, device=device, generator=generator)
    return uniform


def inverse_cdf(weights: torch.Tensor, uniform: torch.Tensor,
                dtype: torch.dtype | None = None) -> torch.Tensor:
    """weights [..., V] >= 0 (any total), uniform [...] -> an index per row drawn with
    probability proportional to its weight: the first whose running sum passes uniform
    times the row's total (a zero weight never does). PyTorch's CPU `cumsum` accumulates
    fp32 in double, so each running sum is off by < 1e-7 of the total. One uniform per
    draw where an exponential race (the argmax of weight / E) draws an exponential per
    entry: a fraction of its cost on a CPU (docs/decisions.md)."""
    cumulative = weights.cumsum(-1, dtype=dtype)
    target = uniform.to(cumulative.dtype) * cumulative[..., -1]
    pick = torch.searchsorted(cumulative, target[..., None], right=True)
    return pick.squeeze(-1).clamp_max_(weights.shape[-1] - 1)


def sample_drafts(q: DraftQ, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """One draft-vocabulary token per (row, head), drawn from q by inverse CDF, seeded rows
    from their own generator. One thread, 4 requests x 3 heads x 8192 entries: 0.10 ms,
    where an exponential race took 0.61 and `torch.multinomial` 2.2."""
    pick = inverse_cdf(q.probs, seeded_uniform(q.probs.shape[:2], generators, q.probs.dtype,
                                               q.probs.device))
    return pick if q.ids is None else q.ids.gather(-1, pick[..., None]).squeeze(-1)
