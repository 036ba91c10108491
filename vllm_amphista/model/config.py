"""AmphistaConfig: every hyper-parameter of the draft model."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

MODEL_TYPE = "amphista"
ARCHITECTURE = "AmphistaDraftModel"


@dataclass
class AmphistaConfig:
    # The frozen target this draft model belongs to.
    hidden_size: int
    vocab_size: int
    target_name: str = ""
    target_fingerprint: str = ""

    num_heads: int = 4  # K: tokens drafted per step
    num_stages: int = 2  # S: staged adaptation layers (0 = heads read the fused input)
    num_aeb_layers: int = 1  # N_aeb: bi-directional encoder layers over the K heads
    num_head_layers: int = 1  # residual blocks per head (Medusa checkpoints may have more)
    use_aeb: bool = True
    use_token_fusion: bool = True
    num_attention_heads: int = 8  # for both SAL and AEB attention
    num_key_value_heads: int = 8  # SAL only (AEB attention has no cache to shrink)
    intermediate_size: int = 0  # SwiGLU width; 0 = 2 * hidden_size
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    # Draft vocabulary: the N most frequent target tokens (0 = the full vocabulary).
    draft_vocab_size: int = 0
    # Imported Medusa checkpoints may carry one lm_head per head instead of sharing the target's.
    own_lm_heads: bool = False
    model_type: str = field(default=MODEL_TYPE)
    architectures: list[str] = field(default_factory=lambda: [ARCHITECTURE])

    def __post_init__(self) -> None:
        self.validate()

    @property
    def ffn_size(self) -> int:
        return self.intermediate_size or 2 * self.hidden_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def is_medusa(self) -> bool:
        """All Amphista additions off: the model computes exactly Medusa-1."""
        return not self.use_aeb and self.num_stages == 0 and not self.use_token_fusion

    @property
    def uses_final_norm(self) -> bool:
        # Medusa-1 feeds its residual blocks straight into lm_head; everything else
        # ends in an RMSNorm like any pre-norm stack.
        return not self.is_medusa

    @property
    def logits_size(self) -> int:
        return self.draft_vocab_size or self.vocab_size

    def stage_of_head(self, head: int) -> int:
        """Heads are split into `num_stages` contiguous groups (K=4, S=2: 0,0,1,1)."""
        return head * self.num_stages // self.num_heads

    def validate(self) -> None:
        problems = []
        if self.model_type != MODEL_TYPE:
            problems.append(f"model_type is {self.model_type!r}, expected {MODEL_TYPE!r}")
        if self.hidden_size <= 0 or self.vocab_size <= 0:
            problems.append("hidden_size and vocab_size must be positive")
        if not 1 <= self.num_heads <= 16:
            problems.append(f"num_heads={self.num_heads} must be in 1..16")
        if not 0 <= self.num_stages <= self.num_heads:
            problems.append(f"num_stages={self.num_stages} must be in 0..num_heads")
        if self.num_head_layers < 1:
            problems.append(f"num_head_layers={self.num_head_layers} must be >= 1")
        if self.use_aeb and self.num_aeb_layers < 1:
            problems.append("use_aeb needs num_aeb_layers >= 1")
        if self.hidden_size % max(self.num_attention_heads, 1):
            problems.append(
                f"hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        elif self.head_dim % 2:
            problems.append(f"head_dim={self.head_dim} must be even for RoPE")
        if self.num_key_value_heads < 1 or self.num_attention_heads % self.num_key_value_heads:
            problems.append("num_attention_heads must be a multiple of num_key_value_heads")
        if not 0 <= self.draft_vocab_size <= self.vocab_size:
            problems.append(f"draft_vocab_size={self.draft_vocab_size} must be in 0..vocab_size")
        if self.own_lm_heads and not self.is_medusa:
            problems.append("own_lm_heads is only for imported Medusa-1 checkpoints")
        if problems:
            raise ValueError("invalid Amphista config: " + "; ".join(problems))

    @classmethod
    def medusa(cls, hidden_size: int, vocab_size: int, **kwargs) -> AmphistaConfig:
        """The Medusa-1 baseline: same class, every Amphista addition switched off."""
        kwargs.update(use_aeb=False, num_stages=0, use_token_fusion=False)
        return cls(hidden_size=hidden_size, vocab_size=vocab_size, **kwargs)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> AmphistaConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"invalid Amphista config: unknown fields {unknown}")
        return cls(**data)

    def save(self, folder: Path) -> None:
        (Path(folder) / "config.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path) -> AmphistaConfig:
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: not an Amphista heads folder")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
        if data.get("model_type") != MODEL_TYPE:
            raise ValueError(
                f"{path}: model_type is {data.get('model_type')!r}, expected {MODEL_TYPE!r}"
            )
        return cls.from_dict(data)
