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

from vllm_amphista.kernels.argmax import last_dim_argmax
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
    """q on its support: probs [n, K, c] of draft-vocabulary ids [n, K, c], zero elsewhere."""

    probs: torch.Tensor
    ids: torch.Tensor

    def write_into(self, out: torch.Tensor, rows: torch.Tensor,
                   draft_to_target: torch.Tensor | None) -> None:
        """out[rows[i], k, target id] = q: out [N, K, V] over the target vocabulary, zeros
        where q is zero (out comes zeroed). By positions in out taken as flat: indexing
        by three broadcast index tensors took 1.1 ms for 4 requests x 3 heads x 8192
        entries, this 0.7 (one thread)."""
        ids = self.ids if draft_to_target is None else draft_to_target[self.ids]
        heads = torch.arange(ids.shape[1], device=ids.device)
        _, k, vocab = out.shape
        start = (rows[:, None] * k + heads) * vocab
        out.put_(start[..., None] + ids, self.probs)

    def dense(self, vocab_size: int, draft_to_target: torch.Tensor | None = None) -> torch.Tensor:
        """q as [n, K, vocab_size]."""
        out = self.probs.new_zeros(*self.probs.shape[:2], vocab_size)
        self.write_into(out, torch.arange(len(out), device=out.device), draft_to_target)
        return out


def draft_distribution(logits: torch.Tensor, sampling: RequestSampling) -> DraftQ:
    """logits [n, K, V'] -> q at each row's temperature, top-k, top-p (vLLM's cut). Rows
    must not be greedy (temperature > 0)."""
    logits = logits.float() / sampling.temperature.float()[:, None, None]
    n, k, v = logits.shape
    if sampling.top_k is None and sampling.top_p is None:
        return DraftQ(logits.softmax(-1), torch.arange(v, device=logits.device).expand(n, k, v))
    top_k, top_p = (None if x is None else x[:, None].expand(n, k)  # each head, its row's
                    for x in (sampling.top_k, sampling.top_p))
    ranked, order, kept = leading_cut(logits, top_k, top_p)
    return DraftQ(ranked.masked_fill(~kept, float("-inf")).softmax(-1), order)


def inverse_exponential_noise(shape: tuple[int, ...], generators: dict[int, torch.Generator],
                              dtype: torch.dtype, device) -> torch.Tensor:
    """1 / E of `shape`, E ~ Exponential(1): the argmax of p * (1 / E) over the last
    dimension is a draw from p (the exponential race). Row i (of the first dimension) from
    generators[i] where given, else from the global generator. E is taken as
    -log(1 - U), U uniform in [0, 1): what `exponential_` computes, 5x faster on a CPU
    (one thread, 4 x 49,152 in fp32: 0.68 against 3.3 ms). E is kept above 0: at 0 a token
    of probability 0 would score 0 / 0."""
    u = torch.empty(shape, dtype=dtype, device=device).uniform_()
    for i, generator in generators.items():
        u[i].uniform_(generator=generator)
    return u.neg_().log1p_().neg_().clamp_min_(torch.finfo(dtype).tiny).reciprocal_()


def sample_drafts(q: DraftQ, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """One draft-vocabulary token per (row, head), drawn from q by the exponential race;
    seeded rows use their own generator. `torch.multinomial` took 4x as long (one thread,
    4 requests x 3 heads x 8192 entries: 2.7 against 0.7 ms)."""
    noise = inverse_exponential_noise(q.probs.shape, generators, q.probs.dtype, q.probs.device)
    pick = last_dim_argmax(q.probs * noise)
    return q.ids.gather(-1, pick[..., None]).squeeze(-1)
