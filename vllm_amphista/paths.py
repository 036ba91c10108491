"""Where the project keeps what it builds (rebuildable by its own commands) and ships."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_DIR = Path(os.environ.get("VLLM_AMPHISTA_CACHE", Path.home() / ".cache" / "vllm-amphista"))
MODELS_DIR = CACHE_DIR / "models"  # exported targets
DATA_DIR = CACHE_DIR / "data"  # distillation sets
SHIPPED_HEADS = Path(__file__).resolve().parent.parent / "heads" / "SmolLM2-135M-Instruct"
