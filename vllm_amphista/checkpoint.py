"""The heads checkpoint: config.json + model.safetensors, validated on load (DESIGN.md §2).

Only draft weights are stored; the target's embedding and lm_head are attached
from the target at load time, after checking the heads were made for it.
Also imports Medusa-1 heads (vLLM 0.32's and FasterDecoding's layouts) and exports
Medusa-mode heads to vLLM 0.32's own `MedusaModel` layout, the benchmarks' baseline.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vllm_amphista.config import AmphistaConfig
from vllm_amphista.model import AmphistaDraftModel
from vllm_amphista.target import TargetWeights

WEIGHTS_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A heads folder that cannot be used; the message names the folder and the problem."""


def save_checkpoint(model: AmphistaDraftModel, folder: str | Path) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save(folder)
    tensors = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder}: {WEIGHTS_FILE} is missing")
    return read_weights_file(path)


def check_target(config: AmphistaConfig, target: TargetWeights, folder: Path) -> None:
    if config.hidden_size != target.hidden_size:
        raise CheckpointError(
            f"{folder}: heads have hidden_size={config.hidden_size}, target "
            f"{target.name!r} has hidden_size={target.hidden_size}")
    if config.vocab_size != target.vocab_size:
        raise CheckpointError(
            f"{folder}: heads have vocab_size={config.vocab_size}, target "
            f"{target.name!r} has vocab_size={target.vocab_size}")
    if config.target_fingerprint and config.target_fingerprint != target.fingerprint:
        raise CheckpointError(
            f"{folder}: heads were trained for target {config.target_name!r} "
            f"(fingerprint {config.target_fingerprint}), not for {target.name!r} "
            f"(fingerprint {target.fingerprint})")


def load_checkpoint(folder: str | Path, target: TargetWeights | None = None,
                    dtype: torch.dtype = torch.float32) -> AmphistaDraftModel:
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"heads folder {folder} does not exist")
    try:
        config = AmphistaConfig.load(folder)
    except (FileNotFoundError, ValueError, TypeError) as e:
        raise CheckpointError(f"{folder}: {e}") from e
    if target is not None:
        check_target(config, target, folder)
    weights = read_weights(folder)
    model = AmphistaDraftModel(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing:
        raise CheckpointError(f"{folder}: missing tensors {missing[:5]} (of {len(missing)})")
    if unexpected:
        raise CheckpointError(
            f"{folder}: unexpected tensors {unexpected[:5]} (of {len(unexpected)})")
    for name, tensor in weights.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(
                f"{folder}: tensor {name} has shape {list(tensor.shape)}, "
                f"the config needs {list(expected[name].shape)}")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"{folder}: tensor {name} has non-finite values")
    d2t = weights.get("draft_to_target")
    if d2t is not None and (int(d2t.min()) < 0 or int(d2t.max()) >= config.vocab_size):
        raise CheckpointError(f"{folder}: draft_to_target has ids outside the vocabulary")
    model.load_state_dict(weights)
    model.to(dtype)
    if target is not None:
        model.attach_target(target)
    return model.eval()


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


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e
