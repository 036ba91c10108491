"""vLLM's top-k / top-p cut, found among each row's leading tokens instead of a full sort.

vLLM 0.32's sampler (`apply_top_k_top_p_pytorch`) keeps the tokens whose logit is at least
the k-th largest (ties at the k-th all kept), renormalises over them, then keeps each token
while the mass of the tokens ranked above it is below p. It finds that by sorting every
row whole: 49,152 entries for SmolLM2, ~5 ms a row on a 2-core CPU, and a speculative step
verifies K+1 rows per request where a plain step samples one. The same cut is decided by
the leading tokens alone when they hold it: the top k+1 when the (k+1)-th is below the
k-th (no tie runs past them), or the top CANDIDATES when they hold an uncut row's top-p
mass. Otherwise the row is sorted whole, as before.

The cut is the same; only float rounding of the masses differs (vLLM sums the whole row in
ascending order), which can move a token whose mass lands within an ulp of p.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

# Enough leading tokens to hold the top-p mass of all but flat rows; ranking them is a
# partial sort, ~15-25x cheaper than sorting a 49k-token row on this CPU.
CANDIDATES = 256


def leading_cut(logits: torch.Tensor, top_k: torch.Tensor | None,
                top_p: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [..., V]; top_k [...] (>= V: no cut) and top_p [...] (>= 1: no cut), either
    None for no cut in any row. Returns (ranked, order, kept), each [..., w]: each row's w
    leading logits, most likely first, their token ids, and which of them the cut keeps.
    Every token outside a row's w leading ones is cut (w = V when a row needs them all)."""
    cut = _Cut.of(logits, top_k, top_p)
    if cut.width < cut.v:
        ranked, order = logits.topk(cut.width, -1)
        if bool(cut.decided(ranked).all()):
            return ranked, order, cut.kept(ranked)
    ranked, order = logits.sort(-1, descending=True)
    return ranked, order, cut.kept(ranked)


def cut_logits(logits: torch.Tensor, top_k: torch.Tensor | None,
               top_p: torch.Tensor | None) -> torch.Tensor:
    """logits [N, V] with every token the cut drops set to -inf, in place. Rows that no cut
    touches (top-k >= V, top-p >= 1) are left as they are; rows whose leading tokens do
    not hold their cut are sorted whole, alone."""
    v = logits.shape[-1]
    touched = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    if top_k is not None:
        touched |= top_k.to(logits.device) < v
    if top_p is not None:
        touched |= top_p.to(logits.device) < 1
    rows = touched.nonzero().squeeze(-1)
    if len(rows) == 0:
        return logits
    sub = logits[rows]
    cut = _Cut.of(sub, None if top_k is None else top_k[rows],
                  None if top_p is None else top_p[rows])
    out = torch.full_like(sub, float("-inf"))
    sort = torch.ones(len(sub), dtype=torch.bool, device=sub.device)
    if cut.width < v:
        ranked, order = sub.topk(cut.width, -1)
        sort = ~cut.decided(ranked).squeeze(-1)
        held = ranked[~sort]  # only the rows the leading tokens decide
        cut_ranked = held.masked_fill(~cut.rows(~sort).kept(held), float("-inf"))
        out[~sort] = out[~sort].scatter_(-1, order[~sort], cut_ranked)
    if bool(sort.any()):
        ranked, order = sub[sort].sort(-1, descending=True)
        cut_ranked = ranked.masked_fill(~cut.rows(sort).kept(ranked), float("-inf"))
        out[sort] = out[sort].scatter_(-1, order, cut_ranked)
    logits[rows] = out
    return logits


@dataclass
class _Cut:
    """One batch's cut as [..., 1] columns: k (V = no top-k), p (inf = no top-p), the full
    rows' normaliser; and how many leading tokens to rank to find it."""

    v: int
    k: torch.Tensor
    p: torch.Tensor | None
    full_norm: torch.Tensor
    width: int

    @classmethod
    def of(cls, logits: torch.Tensor, top_k: torch.Tensor | None,
           top_p: torch.Tensor | None) -> _Cut:
        v = logits.shape[-1]
        k = (torch.full(logits.shape[:-1], v) if top_k is None
             else top_k.to(logits.device).clamp(max=v)).long().unsqueeze(-1)
        p = None
        if top_p is not None:  # p >= 1 cuts nothing (vLLM drops only tokens of probability 0)
            p = top_p.to(logits.device, torch.float32).unsqueeze(-1)
            p = p.masked_fill(p >= 1, float("inf"))
        top_k_cut = k < v
        top_p_cut = torch.zeros_like(top_k_cut) if p is None else torch.isfinite(p)
        if not bool((top_k_cut | top_p_cut).all()):
            width = v  # a row that keeps every token
        elif bool(top_k_cut.all()):
            width = min(int(k.max()) + 1, v)
        else:
            width = min(CANDIDATES, v)
        # The full row's normaliser, for the rows top-p cuts and top-k does not.
        full_norm = (logits.logsumexp(-1, keepdim=True) if bool((top_p_cut & ~top_k_cut).any())
                     else torch.zeros_like(k, dtype=logits.dtype))
        return cls(v, k, p, full_norm, width)

    def rows(self, index: torch.Tensor) -> _Cut:
        return replace(self, k=self.k[index], full_norm=self.full_norm[index],
                       p=None if self.p is None else self.p[index])

    def kth(self, ranked: torch.Tensor) -> torch.Tensor:
        """Each row's k-th largest logit; -inf where top-k keeps every token."""
        kth = ranked.gather(-1, (self.k - 1).clamp(max=ranked.shape[-1] - 1))
        return kth.masked_fill(self.k >= self.v, float("-inf"))

    def kept(self, ranked: torch.Tensor) -> torch.Tensor:
        """Which of the leading logits `ranked` [..., w] (most likely first) the cut keeps."""
        kept = ranked >= self.kth(ranked)
        if self.p is None:
            return kept
        # Top-p weighs each token against what top-k keeps: the whole row where it keeps all.
        within = ranked.masked_fill(~kept, float("-inf"))
        norm = torch.where(self.k >= self.v, self.full_norm, within.logsumexp(-1, keepdim=True))
        probs = (within - norm).exp()
        mass_before = probs.cumsum(-1) - probs  # the most likely token is always kept
        return kept & (mass_before < self.p)

    def decided(self, ranked: torch.Tensor) -> torch.Tensor:
        """[..., 1]: whether the leading logits hold the row's cut: for a top-k row, its
        k-th logit is above the last leading one; otherwise they hold its top-p mass."""
        top_k_held = ranked[..., -1:] < self.kth(ranked)
        if self.p is None:
            return top_k_held
        mass = (ranked - self.full_norm).exp().sum(-1, keepdim=True)
        return torch.where(self.k < self.v, top_k_held, mass >= self.p)
