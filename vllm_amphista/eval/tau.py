"""tau and per-position acceptance, defined once.

tau is the tokens one target step yields: the drafts it accepted plus its own token, so
tau = 1 + accepted / steps (the paper's mean accepted length). The acceptance at draft
position k is the share of steps whose first k + 1 drafts were all accepted.
"""

from __future__ import annotations

from collections.abc import Sequence


def tau(accepted: float, steps: int) -> float:
    """Tokens per target step over `steps` steps that accepted `accepted` drafts in all."""
    return 1 + accepted / max(1, steps)


def acceptance_per_position(accepted_per_position: Sequence[float], steps: int) -> list[float]:
    return [a / max(1, steps) for a in accepted_per_position]
