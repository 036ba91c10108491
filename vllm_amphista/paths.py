"""Where the project keeps what it builds (rebuildable by its own commands) and ships."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_DIR = Path(os.environ.get("VLLM_AMPHISTA_CACHE", Path.home() / ".cache" / "vllm-amphista"))
MODELS_DIR = CACHE_DIR / "models"  # exported targets
DATA_DIR = CACHE_DIR / "data"  # distillation sets
# Heads shipped inside the package (package data, so a wheel carries them), one folder per
# target holding `amphista/` and the Medusa baseline `medusa/`.
HEADS_DIR = Path(__file__).resolve().parent / "heads"
SHIPPED_HEADS = HEADS_DIR / "SmolLM2-135M-Instruct"
