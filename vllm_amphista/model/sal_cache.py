"""Per-sequence SAL key/value storage for drafting."""

from __future__ import annotations

import torch


class SALCache:
    """Keys and values of every accepted position of one sequence, for each SAL stage.

    Storage grows by doubling so that appending one step's rows is amortised O(rows).
    """

    def __init__(self) -> None:
        self.length = 0
        self._keys: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []

    def keys(self, stage: int) -> torch.Tensor:  # [Hkv, length, hd]
        return self._keys[stage][:, : self.length]

    def values(self, stage: int) -> torch.Tensor:
        return self._values[stage][:, : self.length]

    def append(self, new_keys: list[torch.Tensor], new_values: list[torch.Tensor]) -> None:
        """Add [Hkv, n, hd] rows for every stage."""
        n = new_keys[0].shape[1]
        needed = self.length + n
        if not self._keys or needed > self._keys[0].shape[1]:
            capacity = max(needed, 2 * (self._keys[0].shape[1] if self._keys else 16))
            self._keys = [self._grow(old, new, capacity) for old, new in
                          zip(self._keys or [None] * len(new_keys), new_keys, strict=True)]
            self._values = [self._grow(old, new, capacity) for old, new in
                            zip(self._values or [None] * len(new_values), new_values, strict=True)]
        for stage, (k, v) in enumerate(zip(new_keys, new_values, strict=True)):
            self._keys[stage][:, self.length : needed] = k
            self._values[stage][:, self.length : needed] = v
        self.length = needed

    def _grow(self, old: torch.Tensor | None, like: torch.Tensor, capacity: int) -> torch.Tensor:
        buffer = like.new_empty(like.shape[0], capacity, like.shape[2])
        if old is not None:
            buffer[:, : self.length] = old[:, : self.length]
        return buffer

    def reset(self) -> None:
        self.length = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._keys + self._values)
