"""SAL keys and values of the sequences being drafted, indexed by batch slot."""

from __future__ import annotations

import numpy as np
import torch

from vllm_amphista.model.config import AmphistaConfig


class SALCache:
    """Keys and values of every accepted position of each SAL stage, for a batch of
    sequences: [stages, slots, Hkv, capacity, hd], allocated once and grown by doubling
    (rarely); slot i holds `lengths[i]` valid positions. Drafting reads slots 0..B-1 as a
    view (as gpt-fast's KVCache and vLLM's persistent batch do): nothing is copied per step.
    Storage starts zeroed, so masked positions never hold NaN (0 * NaN would leak into
    attention)."""

    def __init__(self, config: AmphistaConfig, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", slots: int = 4, capacity: int = 128,
                 stages: int | None = None) -> None:
        """stages: how many of the model's SAL stages it holds (default all)."""
        self.shape = (config.num_stages if stages is None else stages,
                      config.num_key_value_heads, config.head_dim)
        stages, heads, dim = self.shape
        self.keys = torch.zeros(stages, slots, heads, capacity, dim, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self.lengths = np.zeros(slots, np.int64)

    @property
    def slots(self) -> int:
        return self.keys.shape[1]

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]

    def reserve(self, slots: int, capacity: int) -> None:
        """Room for `slots` sequences of `capacity` positions (doubling what is short)."""
        if slots <= self.slots and capacity <= self.capacity:
            return
        new_slots = grown_size(slots, self.slots)
        new_capacity = grown_size(capacity, self.capacity)
        stages, heads, dim = self.shape
        grown = []
        for old in (self.keys, self.values):
            new = old.new_zeros(stages, new_slots, heads, new_capacity, dim)
            new[:, : self.slots, :, : self.capacity] = old
            grown.append(new)
        self.keys, self.values = grown
        self.lengths = np.concatenate((self.lengths, np.zeros(new_slots - len(self.lengths),
                                                              np.int64)))

    def move(self, dest: list[int], src: list[int]) -> None:
        """Slot src[i]'s sequence now lives in slot dest[i] (the right side is gathered
        first, so swaps are safe)."""
        to, source = (torch.tensor(i, device=self.keys.device) for i in (dest, src))
        self.keys[:, to] = self.keys[:, source]
        self.values[:, to] = self.values[:, source]
        self.lengths[dest] = self.lengths[src]

    def nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()


def grown_size(needed: int, have: int) -> int:
    """A buffer's new size along one axis: unchanged if it holds `needed`, else doubled
    (or `needed`, if more), so growing is rare."""
    return max(needed, 2 * have) if needed > have else have


def rows_by_slot(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows given slot by slot, counts[i] of them for slot i: each row's slot and its
    offset among its slot's rows."""
    slot = np.repeat(np.arange(len(counts)), counts)
    return slot, np.arange(len(slot)) - np.repeat(np.cumsum(counts) - counts, counts)
