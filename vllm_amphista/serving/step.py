"""One engine step as a drafter sees it, and the interface of drafters fed that way.

vLLM 0.32's `custom_class` proposers get no hidden states; the runner patch
(patches.patch_model_runner) hands every `StepDrafter` a `StepRows` instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vllm_amphista.model.sal_cache import rows_by_slot
from vllm_amphista.serving.draft_sampling import RequestSampling


@dataclass
class StepRows:
    """What one engine step computed, in the runner's request order."""

    req_ids: list[str]
    sampled_token_ids: list[list[int]]  # accepted tokens (+ bonus); [] for a partial prefill
    hidden_states: torch.Tensor  # [num_tokens, d], final-normed target output
    query_start_loc: np.ndarray  # [num_reqs + 1] row ranges in hidden_states
    start_positions: np.ndarray  # [num_reqs] absolute position of each request's first row
    num_draft_tokens: np.ndarray  # [num_reqs] drafts that were verified this step
    token_ids: np.ndarray  # [max_reqs, max_len] every known token of each request
    sampling: RequestSampling | None = None  # per request; None = every request greedy

    def _rows_and_verified(self) -> list[tuple[int, int]]:
        """Per request, the rows it ran this step and the drafts of them verified. In
        plain Python: the proposer asks every engine step, and numpy's calls on a few
        values cost more than the arithmetic (draft_length.StepClock)."""
        num_reqs = len(self.req_ids)
        starts = self.query_start_loc[: num_reqs + 1].tolist()
        return [(end - start, verified) for start, end, verified
                in zip(starts[:-1], starts[1:], self.num_draft_tokens[:num_reqs].tolist(),
                       strict=True)]

    def accepted_counts(self) -> np.ndarray:
        """How many of each request's rows the target kept, [num_reqs] int64: the prefill
        chunk, or in a decode step the last sampled token plus the accepted drafts
        (len(sampled) rows)."""
        return np.array([rows - verified + accepted for (rows, verified), accepted
                         in zip(self._rows_and_verified(), self.accepted_drafts(), strict=True)],
                        np.int64)

    def accepted_drafts(self) -> list[int]:
        """Per request, the drafts the target accepted this step: the tokens it emitted
        past the first (none for a partial prefill, which emitted nothing)."""
        return [max(len(tokens) - 1, 0) for tokens in self.sampled_token_ids[: len(self.req_ids)]]

    def prefilling(self) -> np.ndarray:
        """[num_reqs] bool: which requests ran a prefill chunk (rows other than one plus
        their verified drafts)."""
        return np.array([rows != 1 + verified for rows, verified in self._rows_and_verified()],
                        bool)

    def decode_only(self) -> bool:
        """Whether every request ran one row plus its verified drafts (no prefill chunk).
        By the totals: no request runs fewer rows than that (a prefill chunk verifies no
        drafts), so the totals agree only where every request's do."""
        num_reqs = len(self.req_ids)
        return self.rows_run() == num_reqs + sum(self.num_draft_tokens[:num_reqs].tolist())

    def rows_run(self) -> int:
        """The rows every request ran this step, in all."""
        return int(self.query_start_loc[len(self.req_ids)] - self.query_start_loc[0])

    def sampled_requests(self) -> np.ndarray:
        """[num_reqs] bool: which requests sample (temperature > 0)."""
        num_reqs = len(self.req_ids)
        if self.sampling is None:
            return np.zeros(num_reqs, bool)
        return (~self.sampling.is_greedy[:num_reqs]).cpu().numpy()

    def any_sampled(self) -> bool:
        """Whether a request samples: what a paused call needs, at one tensor call where
        `sampled_requests` takes three and numpy's (in-process at 4 requests, T=0.7, bf16,
        family-26 EPYC: ~30 us in an engine step)."""
        return self.sampling is not None and any(
            self.sampling.temperature[: len(self.req_ids)].tolist())

    def accepted_row_index(self, counts: np.ndarray, skip: np.ndarray | None = None
                           ) -> tuple[np.ndarray, np.ndarray]:
        """For the kept rows of every request, slot by slot, past its first skip[i] (if
        given, less than counts[i]): their index into hidden_states, and the token each
        pairs with (x_{t+1}, from the token table)."""
        num_reqs = len(counts)
        first = np.asarray(self.query_start_loc[:num_reqs], np.int64)
        start = np.asarray(self.start_positions[:num_reqs], np.int64)
        if skip is not None:
            first, start, counts = first + skip, start + skip, counts - skip
        request, offset = rows_by_slot(counts)
        tokens = self.token_ids[request, start[request] + 1 + offset].astype(np.int64)
        return first[request] + offset, tokens


@dataclass
class Proposal:
    tokens: list[list[int]]  # per request, in the step's order; [] = no draft
    # [num_reqs, longest draft, vocab] the q each sampled draft was drawn from, zeros for
    # the other requests; None when every draft is an argmax (vLLM then treats drafts as
    # one-hot).
    draft_probs: torch.Tensor | None = None


class StepDrafter:
    """A vLLM `custom_class` proposer that the runner patch feeds with StepRows."""

    def load_model(self, target_model: torch.nn.Module) -> None:
        """Called by the runner with the target model once it is loaded."""

    def propose(self, *args, **kwargs):
        raise RuntimeError(
            f"{type(self).__name__}.propose was called directly: the runner patch in "
            "vllm_amphista.serving.patches is not installed (is the plugin loaded?)")

    def propose_from_step(self, step: StepRows) -> Proposal:
        raise NotImplementedError

    def release(self, req_id: str, request=None) -> None:
        """vLLM dropped a finished or aborted request; `request` is the runner's
        CachedRequestState (prompt and output token ids)."""
