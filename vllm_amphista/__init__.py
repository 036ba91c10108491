"""Amphista speculative decoding (arXiv 2406.13170) as a vLLM plugin."""

from vllm_amphista.config import AmphistaConfig
from vllm_amphista.model import AmphistaDraftModel
from vllm_amphista.target import TargetWeights

__all__ = ["AmphistaConfig", "AmphistaDraftModel", "TargetWeights"]
__version__ = "0.1.0"
