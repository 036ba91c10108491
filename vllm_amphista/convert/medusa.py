"""Medusa-1 heads in and out: imports vLLM 0.32's and FasterDecoding's layouts as
Medusa-mode draft models, and exports Medusa-mode heads to vLLM 0.32's own `MedusaModel`
layout (the benchmarks' vllm-medusa baseline)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from vllm_amphista.model.checkpoint import (
    WEIGHTS_FILE,
    CheckpointError,
    load_checkpoint,
    read_weights_file,
)
from vllm_amphista.model.config import AmphistaConfig
from vllm_amphista.model.draft_model import AmphistaDraftModel
from vllm_amphista.model.target import TargetWeights


def import_medusa(folder: str | Path, target: TargetWeights) -> AmphistaDraftModel:
    """Medusa-1 heads (vLLM 0.32 `MedusaModel` or FasterDecoding) as an AmphistaDraftModel
    in Medusa mode; the result computes the same logits as the original heads."""
    folder = Path(folder)
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{folder}: config.json is missing")
    cfg = json.loads(cfg_file.read_text())
    files = sorted(folder.glob("*.safetensors"))
    if files:
        weights = {k: v for f in files for k, v in read_weights_file(f).items()}
    elif (folder / "medusa_lm_head.pt").is_file():
        weights = torch.load(folder / "medusa_lm_head.pt", map_location="cpu", weights_only=True)
    else:
        raise CheckpointError(f"{folder}: no *.safetensors or medusa_lm_head.pt weights")

    if cfg.get("model_type") == "medusa":  # vLLM 0.32 layout
        num_heads, num_layers = cfg["num_heads"], cfg["num_hidden_layers"]
        block = "blocks.{h}.layers.{l}.{p}"
        head = None if cfg.get("original_lm_head") else "lm_heads.{h}.weight"
    else:  # FasterDecoding: {h}.{l}.linear.*, lm head is {h}.{num_layers}.weight
        num_heads, num_layers = cfg["medusa_num_heads"], cfg["medusa_num_layers"]
        block = "{h}.{l}.linear.{p}"
        head = f"{{h}}.{num_layers}.weight"

    config = AmphistaConfig.medusa(
        hidden_size=target.hidden_size, vocab_size=target.vocab_size, num_heads=num_heads,
        num_head_layers=num_layers, own_lm_heads=head is not None,
        target_name=target.name, target_fingerprint=target.fingerprint)
    model = AmphistaDraftModel(config)
    state = model.state_dict()
    for h in range(num_heads):
        for layer in range(num_layers):
            for part in ("weight", "bias"):
                src = block.format(h=h, l=layer, p=part)
                dst = f"heads.{h}.{layer}.linear.{part}"
                if src in weights:
                    state[dst] = weights[src]
                elif part == "weight":
                    raise CheckpointError(f"{folder}: Medusa tensor {src} is missing")
                else:
                    state[dst] = torch.zeros_like(state[dst])  # vLLM's blocks have no bias
        if head is not None:
            state[f"lm_heads.{h}"] = weights[head.format(h=h)]
    model.load_state_dict(state)
    model.attach_target(target)
    return model.eval()


def export_vllm_medusa(heads: str | Path, out: str | Path, target: TargetWeights) -> Path:
    """Write Medusa-mode heads as a vLLM 0.32 `MedusaModel` folder (config.json +
    model.safetensors) that `speculative_config={"method": "medusa", ...}` serves.

    Our residual blocks have a bias (`medusa_fc_bias`) and share the target's lm_head
    (`original_lm_head`, stored in full). A draft vocabulary is not carried over: vLLM
    0.32's Medusa loads a `token_map` but then fails its own all-weights-loaded check, so
    the exported heads rank the full vocabulary. Their drafts can differ from ours only
    where a token outside the draft vocabulary outscores every token inside it.
    """
    heads, out = Path(heads), Path(out)
    model = load_checkpoint(heads, target=target)
    cfg = model.config
    if not cfg.is_medusa:
        raise CheckpointError(f"{heads}: only Medusa-mode heads (no SAL, AEB or token "
                              "fusion) can be served by vLLM's Medusa")
    if cfg.own_lm_heads and cfg.draft_vocab_size:
        raise CheckpointError(f"{heads}: one lm_head per head with a draft vocabulary has "
                              "no vLLM Medusa equivalent")
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out} exists and is not empty; choose a new folder")
    tensors: dict[str, torch.Tensor] = {}
    for h in range(cfg.num_heads):
        for layer in range(cfg.num_head_layers):
            for part in ("weight", "bias"):
                tensors[f"blocks.{h}.layers.{layer}.{part}"] = getattr(
                    model.heads[h][layer].linear, part)
        if cfg.own_lm_heads:
            tensors[f"lm_heads.{h}.weight"] = model.lm_heads[h]
    if not cfg.own_lm_heads:
        tensors["lm_heads.0.weight"] = target.lm_head
    vllm_config = {
        "model_type": "medusa", "architectures": ["MedusaModel"],
        "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size,
        "num_heads": cfg.num_heads, "num_hidden_layers": cfg.num_head_layers,
        "medusa_fc_bias": True, "original_lm_head": not cfg.own_lm_heads,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(vllm_config, indent=2) + "\n")
    save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()},
              str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    return out
