"""Rows the target kept that the SAL layers have not seen yet, per batch slot.

A paused proposer's warm-up before a probe used to run the SAL layers once a step, each
pass paying the whole fixed cost of reading the draft weights for one new row a request.
Kept here instead, the rows go through the SAL layers in one pass when the next draft
pass runs (`AmphistaProposer._catch_up`): over 8 rows a request that pass costs about
one step's (Intel Xeon with AMX, bf16, one thread: 8.9 ms at 16 requests against 8
passes of 4.9; 3.1 against 8 of 3.1 at one request), and nothing at all when no draft
pass follows. `extend` over rows at once computes what it computes over them one at a
time, so the drafts are the same.
"""

from __future__ import annotations

import numpy as np
import torch

from vllm_amphista.model.sal_cache import grown_size, rows_by_slot


class PendingRows:
    """hidden [slots, capacity, d] and next tokens [slots, capacity], allocated once and
    grown by doubling up to `limit` rows a slot; slot i holds `counts[i]` rows, oldest
    first. `from_prompt[i]`: some of them came from a prefill chunk (their pass is then
    no price for a warm-up of decode steps)."""

    def __init__(self, hidden_size: int, dtype: torch.dtype, device: torch.device,
                 limit: int, slots: int = 4, capacity: int = 16) -> None:
        self.limit = limit
        capacity = min(capacity, limit)
        self.hidden = torch.zeros(slots, capacity, hidden_size, dtype=dtype, device=device)
        self.tokens = torch.zeros(slots, capacity, dtype=torch.long, device=device)
        self.counts = np.zeros(slots, np.int64)
        self.from_prompt = np.zeros(slots, bool)

    def reserve(self, slots: int, capacity: int) -> None:
        old_slots, old_capacity = self.tokens.shape
        if slots <= old_slots and capacity <= old_capacity:
            return
        slots = grown_size(slots, old_slots)
        capacity = min(grown_size(capacity, old_capacity), self.limit)
        hidden = self.hidden.new_zeros(slots, capacity, self.hidden.shape[-1])
        tokens = self.tokens.new_zeros(slots, capacity)
        hidden[:old_slots, :old_capacity] = self.hidden
        tokens[:old_slots, :old_capacity] = self.tokens
        self.hidden, self.tokens = hidden, tokens
        grown = slots - old_slots
        self.counts = np.concatenate((self.counts, np.zeros(grown, np.int64)))
        self.from_prompt = np.concatenate((self.from_prompt, np.zeros(grown, bool)))

    def move(self, dest: list[int], src: list[int]) -> None:
        """Slot src[i]'s rows now belong to slot dest[i] (sources gathered first)."""
        to, source = (torch.tensor(i, device=self.tokens.device) for i in (dest, src))
        self.hidden[to] = self.hidden[source]
        self.tokens[to] = self.tokens[source]
        self.counts[dest] = self.counts[src]
        self.from_prompt[dest] = self.from_prompt[src]

    def clear(self, slots: np.ndarray) -> None:
        self.counts[slots] = 0
        self.from_prompt[slots] = False

    def add(self, hidden: torch.Tensor, tokens: torch.Tensor, counts: np.ndarray,
            from_prompt: np.ndarray) -> np.ndarray:
        """Append counts[i] (<= limit) rows to slot i, slot by slot in order as `extend`
        takes them. A slot that would hold more than `limit` drops its oldest: returns
        those slots, whose caches must restart (their rows no longer follow on)."""
        b = len(counts)
        overflow = np.flatnonzero(self.counts[:b] + counts > self.limit)
        for slot in overflow.tolist():
            keep, held = self.limit - int(counts[slot]), int(self.counts[slot])
            self.hidden[slot, :keep] = self.hidden[slot, held - keep: held].clone()
            self.tokens[slot, :keep] = self.tokens[slot, held - keep: held].clone()
            self.counts[slot] = keep
        self.reserve(b, int((self.counts[:b] + counts).max()))
        slot, offset = rows_by_slot(counts)
        at = (torch.from_numpy(slot), torch.from_numpy(self.counts[slot] + offset))
        self.hidden[at] = hidden.to(self.hidden.dtype)
        self.tokens[at] = tokens
        self.counts[:b] += counts
        self.from_prompt[:b] |= from_prompt & (counts > 0)
        return overflow

    def take(self, b: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, bool]:
        """Slots 0..b-1's rows (slot by slot, as `extend` takes them), their counts, and
        whether any came from a prompt; the slots are left empty."""
        counts = self.counts[:b].copy()
        at = tuple(map(torch.from_numpy, rows_by_slot(counts)))
        from_prompt = bool(self.from_prompt[:b].any())
        rows = self.hidden[at], self.tokens[at]
        self.clear(np.arange(b))
        return *rows, counts, from_prompt

