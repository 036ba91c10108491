"""What a training run is given: its settings, and the error for bad input."""

from __future__ import annotations

from dataclasses import dataclass

STATE_FILE = "training_state.pt"  # resumable state inside the output folder


@dataclass
class TrainSettings:
    # 4: held out, 1 -> 2 -> 4 epochs took walk tau 1.343 -> 1.439 -> 1.511 (1024
    # conversations, batch 4; results/tune_heads-1024.json): more than 2.5x the data
    # gave at one epoch on the learning curve.
    epochs: int = 4
    learning_rate: float = 1e-3
    batch_conversations: int = 8
    max_positions: int = 512  # conversations are cut to this many tokens
    lm_weight: float = 0.1
    head_decay: float = 0.8
    seed: int = 0
    eval_fraction: float = 0.1
    checkpoint_every: int = 50  # optimizer steps between resumable checkpoints
    # auto: bf16 autocast where the machine computes bf16 natively (machine.py), else fp32.
    compute_dtype: str = "auto"


class TrainingInputError(ValueError):
    """Bad input to `vllm-amphista train`; nothing was written or removed."""
