"""`speculative_config={"method": "amphista", ...}` into what vLLM 0.32 understands.

"model" names the heads: a folder, `amphista-heads` or a Hub repo id (heads_source.py),
with "revision" pinning a Hub id.

vLLM builds our proposer through its `custom_class` method; the proposer's own settings
travel to the workers in `vllm_config.additional_config[ADDITIONAL_CONFIG_KEY]`:
{"heads": dir, "disable_by_batch_size": int | None, "draft_sampling": "sample" | "argmax",
 "draft_dtype": "auto" | "float32" | "bfloat16",
 "step_cost": "auto" | "off" | a `vllm-amphista calibrate` file (draft_length.py),
 "choose_heads": bool: num_speculative_tokens was not given, so the proposer drafts the
 leading heads that pay on this machine (`heads_that_pay`), at most all of them}.
"""

from __future__ import annotations

from pathlib import Path

from vllm_amphista.machine import DTYPE_NAMES
from vllm_amphista.model.checkpoint import CheckpointError, load_checkpoint
from vllm_amphista.model.target import TargetWeights
from vllm_amphista.serving.draft_sampling import DRAFT_SAMPLING_MODES, DraftSampling
from vllm_amphista.serving.heads_source import HeadsNotFound, find_heads

ADDITIONAL_CONFIG_KEY = "amphista"
# How sampled requests draft (draft_sampling.py); chosen by measurement (docs/results.md, T=0.7).
DEFAULT_DRAFT_SAMPLING: DraftSampling = "sample"
PROPOSER_CLASS_PATH = "vllm_amphista.serving.proposer.AmphistaProposer"


class AmphistaSetupError(ValueError):
    """A speculative_config for Amphista that cannot start; one line naming the problem."""


# speculative_config keys that are ours, not vLLM's.
OUR_KEYS = ("method", "model", "revision", "disable_by_batch_size", "draft_sampling",
            "draft_dtype", "step_cost")


def resolve_speculative_config(spec: dict, target_dir: str, target_hidden_size: int,
                               target_vocab_size: int) -> tuple[dict, dict]:
    """Validate {"method": "amphista", "model": <heads>, ...} against the target and turn
    it into vLLM's custom_class form. Returns (vLLM speculative_config dict, the
    proposer's settings for additional_config). Our own keys: disable_by_batch_size,
    draft_sampling, draft_dtype."""
    name = spec.get("model")
    if not name:
        raise AmphistaSetupError(
            "amphista: speculative_config needs 'model': a heads folder, 'amphista-heads' or "
            "a Hugging Face repo id")
    target = None
    if Path(target_dir).is_dir():
        target = TargetWeights.from_folder(target_dir)
    try:
        heads = find_heads(str(name), target_dir, target_hidden_size, target_vocab_size,
                           target, spec.get("revision"))
    except HeadsNotFound as e:
        raise AmphistaSetupError(str(e)) from e
    try:
        model = load_checkpoint(heads, target=target)
    except CheckpointError as e:
        raise AmphistaSetupError(f"amphista: {e}") from e
    cfg = model.config
    if (cfg.hidden_size, cfg.vocab_size) != (target_hidden_size, target_vocab_size):
        raise AmphistaSetupError(
            f"amphista: heads {heads} have hidden_size={cfg.hidden_size}, "
            f"vocab_size={cfg.vocab_size}; target {target_dir} has "
            f"hidden_size={target_hidden_size}, vocab_size={target_vocab_size}")
    k = spec.get("num_speculative_tokens")
    choose_heads = k is None
    if choose_heads:
        k = cfg.num_heads
    if not 1 <= int(k) <= cfg.num_heads:
        raise AmphistaSetupError(
            f"amphista: num_speculative_tokens={k} but {heads} has {cfg.num_heads} heads "
            f"(allowed 1..{cfg.num_heads})")
    pause = spec.get("disable_by_batch_size")
    if pause is not None and (isinstance(pause, bool) or not isinstance(pause, int)
                              or pause < 1):
        raise AmphistaSetupError(
            f"amphista: disable_by_batch_size={pause!r} must be a positive integer")
    draft_sampling = spec.get("draft_sampling", DEFAULT_DRAFT_SAMPLING)
    if draft_sampling not in DRAFT_SAMPLING_MODES:
        raise AmphistaSetupError(
            f"amphista: draft_sampling={draft_sampling!r} must be one of "
            f"{', '.join(DRAFT_SAMPLING_MODES)}")
    step_cost = spec.get("step_cost", "auto")
    if step_cost not in ("auto", "off") and not Path(str(step_cost)).is_file():
        raise AmphistaSetupError(
            f"amphista: step_cost={step_cost!r} must be auto, off or a file written by "
            "`vllm-amphista calibrate`")
    draft_dtype = spec.get("draft_dtype", "auto")
    if draft_dtype != "auto" and draft_dtype not in DTYPE_NAMES:
        raise AmphistaSetupError(
            f"amphista: draft_dtype={draft_dtype!r} must be auto, {' or '.join(DTYPE_NAMES)}")
    translated = {key: value for key, value in spec.items() if key not in OUR_KEYS}
    translated.update(method="custom_class", model=PROPOSER_CLASS_PATH,
                      num_speculative_tokens=int(k))
    return translated, {"heads": str(heads.resolve()), "disable_by_batch_size": pause,
                        "draft_sampling": draft_sampling, "draft_dtype": draft_dtype,
                        "step_cost": step_cost, "choose_heads": choose_heads}
