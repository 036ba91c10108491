"""Which heads folder a speculative_config's "model" names.

Tried in this order (README, "Naming the heads"):
1. a local folder (an existing path wins over every name, as in vLLM);
2. `amphista-heads`: the heads shipped inside this package that fit the served target,
   matched on hidden size, vocabulary and the target's identity recorded in the heads'
   config (its embedding fingerprint, or its name where the target's weights cannot be
   read), never on a folder name;
3. a Hugging Face repo id (`owner/name`), through the Hub cache like vLLM's own drafters:
   a pinned `revision` is honoured and HF_HUB_OFFLINE=1 reads only the cache.
Anything else is refused with one line that says what was tried.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from vllm_amphista.model.config import MODEL_TYPE, AmphistaConfig
from vllm_amphista.model.target import TargetWeights
from vllm_amphista.paths import HEADS_DIR

SHIPPED_NAME = "amphista-heads"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HEAD_FILES = ["config.json", "model.safetensors", "*.md"]


class HeadsNotFound(ValueError):
    """No heads folder for the name given; the message says why in one line."""


def shipped_heads() -> list[Path]:
    """Every shipped Amphista heads folder (one per target)."""
    return sorted(config.parent for config in HEADS_DIR.glob("*/amphista/config.json"))


def fits(config: AmphistaConfig, target_dir: str, hidden_size: int, vocab_size: int,
         target: TargetWeights | None) -> bool:
    """Heads made for this target: same shapes, and the same target identity."""
    if (config.hidden_size, config.vocab_size) != (hidden_size, vocab_size):
        return False
    if target is not None and config.target_fingerprint:
        return config.target_fingerprint == target.fingerprint
    return config.target_name == Path(target_dir.rstrip("/")).name


def find_shipped(target_dir: str, hidden_size: int, vocab_size: int,
                 target: TargetWeights | None) -> Path:
    shipped = [(folder, AmphistaConfig.load(folder)) for folder in shipped_heads()]
    for folder, config in shipped:
        if fits(config, target_dir, hidden_size, vocab_size, target):
            return folder
    listing = "; ".join(f"{c.target_name} (hidden_size={c.hidden_size}, "
                        f"vocab_size={c.vocab_size})" for _, c in shipped) or "none"
    raise HeadsNotFound(
        f"amphista: no shipped heads fit target {target_dir} (hidden_size={hidden_size}, "
        f"vocab_size={vocab_size}). '{SHIPPED_NAME}' has heads for: {listing}. Train heads "
        f"for this target with `vllm-amphista train --target {target_dir} --out <folder>` "
        "and pass that folder.")


def download_from_hub(repo_id: str, revision: str | None,
                      patterns: list[str] = HEAD_FILES) -> Path:
    """The heads' snapshot folder in the Hub cache (downloaded unless HF_HUB_OFFLINE)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    pinned = f" at revision {revision}" if revision else ""
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except LocalEntryNotFoundError as e:
        if constants.HF_HUB_OFFLINE:
            raise HeadsNotFound(
                f"amphista: heads {repo_id!r}{pinned} are not in the Hugging Face cache "
                f"({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE=1 forbids downloading: run "
                f"`huggingface-cli download {repo_id}` once with network, or pass a "
                "folder") from e
        raise HeadsNotFound(f"amphista: heads {repo_id!r}{pinned} could not be fetched "
                            f"from the Hugging Face Hub: {e}") from e
    except HfHubHTTPError as e:
        raise HeadsNotFound(f"amphista: heads {repo_id!r}{pinned} could not be fetched "
                            f"from the Hugging Face Hub: {e}") from e


def find_heads(name: str, target_dir: str, hidden_size: int, vocab_size: int,
               target: TargetWeights | None, revision: str | None = None) -> Path:
    """The heads folder `name` stands for (see the module docstring for the order)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if name == SHIPPED_NAME:
        return find_shipped(target_dir, hidden_size, vocab_size, target)
    if HUB_ID.match(name):
        return download_from_hub(name, revision)
    if "/" in name or name.startswith((".", "~")):
        raise HeadsNotFound(f"amphista: heads folder {path} does not exist")
    raise HeadsNotFound(
        f"amphista: heads {name!r} are not a folder, not '{SHIPPED_NAME}' (the shipped "
        "heads) and not a Hugging Face repo id (owner/name)")


def names_amphista_heads(name: str, revision: str | None = None) -> bool:
    """Whether `name` (folder, shipped name or cached/downloadable Hub id) holds Amphista
    heads: what lets a speculative_config without "method" mean Amphista, as vLLM infers
    EAGLE and Medusa from their drafters' config.json."""
    if name == SHIPPED_NAME:
        return True
    config = Path(name).expanduser() / "config.json"
    if not config.is_file() and HUB_ID.match(name) and not Path(name).exists():
        try:
            config = download_from_hub(name, revision, ["config.json"]) / "config.json"
        except HeadsNotFound:
            return False  # not ours to judge: vLLM reports its own error for this model
    try:
        return json.loads(config.read_text()).get("model_type") == MODEL_TYPE
    except (OSError, ValueError):
        return False
