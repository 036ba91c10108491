"""The heads checkpoint: config.json + model.safetensors, validated on load.

Only draft weights are stored; the target's embedding and lm_head are attached
from the target at load time, after checking the heads were made for it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vllm_amphista.model.config import AmphistaConfig
from vllm_amphista.model.draft_model import AmphistaDraftModel
from vllm_amphista.model.target import TargetWeights

WEIGHTS_FILE = "model.safetensors"
METRICS_FILE = "metrics.json"  # written beside the heads by `vllm-amphista train`


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


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e


def held_out_top1(folder: str | Path, num_heads: int) -> list[float] | None:
    """Each head's top-1 accuracy on the held-out conversations at the end of training
    (metrics.json), or None where the folder has no such record for `num_heads` heads
    (converted heads, heads trained elsewhere): it is a summary, not part of the model."""
    try:
        top1 = json.loads((Path(folder) / METRICS_FILE).read_text())["history"][-1]["eval"]["top1"]
        top1 = [float(a) for a in top1]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None
    return top1 if len(top1) == num_heads and all(0.0 <= a <= 1.0 for a in top1) else None
