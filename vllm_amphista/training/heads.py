"""`vllm-amphista train`, the whole job: data, a fresh draft model shaped for the target,
training (here or on Ray), held-out evaluation, export, metrics, plot and model card."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import torch

from vllm_amphista.machine import describe, resolve_dtype
from vllm_amphista.model.checkpoint import (
    METRICS_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from vllm_amphista.model.config import AmphistaConfig
from vllm_amphista.model.draft_model import AmphistaDraftModel
from vllm_amphista.model.target import TargetWeights
from vllm_amphista.training.data import (
    SHAREGPT_TURNS,
    Conversation,
    RecordingPlan,
    record_dataset,
    split,
)
from vllm_amphista.training.loop import train
from vllm_amphista.training.report import (
    data_runs,
    plot_accuracy,
    training_record,
    write_metrics,
    write_model_card,
)
from vllm_amphista.training.settings import STATE_FILE, TrainingInputError, TrainSettings


def build_token_map(conversations: list[Conversation], size: int) -> torch.Tensor:
    """The `size` most frequent tokens (sorted ids): the draft vocabulary. Topped up with
    the lowest unseen ids when the data holds fewer distinct tokens."""
    counts = Counter()
    for c in conversations:
        counts.update(c.tokens.tolist())
    ids = {token for token, _ in counts.most_common(size)}
    filler = (i for i in range(size + len(ids)) if i not in ids)
    while len(ids) < size:
        ids.add(next(filler))
    return torch.tensor(sorted(ids), dtype=torch.long)


def check_inputs(target_dir: Path, out_dir: Path) -> None:
    config = target_dir / "config.json"
    if not config.is_file():
        raise TrainingInputError(f"target {target_dir} has no config.json")
    architectures = json.loads(config.read_text()).get("architectures") or []
    if not any(a.endswith("ForCausalLM") for a in architectures):
        raise TrainingInputError(f"target {target_dir} is not a causal LM "
                                 f"(architectures: {architectures})")
    if out_dir.exists():
        ours = {STATE_FILE, "config.json", WEIGHTS_FILE, METRICS_FILE,
                "accuracy.png", "MODEL_CARD.md"}
        others = sorted(p.name for p in out_dir.iterdir() if p.name not in ours)
        if not out_dir.is_dir() or others:
            raise TrainingInputError(f"output folder {out_dir} exists with other content "
                                     f"({others[:3]}): choose an empty or new folder")
        if (out_dir / "config.json").is_file() and not (out_dir / STATE_FILE).is_file():
            raise TrainingInputError(f"output folder {out_dir} already holds finished heads: "
                                     "choose a new folder")


def draft_model_for(target_dir: Path, target, train_set: list[Conversation], *, medusa: bool,
                    draft_vocab: int, seed: int, overrides: dict | None = None
                    ) -> AmphistaDraftModel:
    """A fresh draft model shaped for the target (attention heads and norm epsilon from
    its config), with a draft vocabulary of the training set's most frequent tokens."""
    target_config = json.loads((target_dir / "config.json").read_text())
    fields = dict(hidden_size=target.hidden_size, vocab_size=target.vocab_size,
                  target_name=target.name, target_fingerprint=target.fingerprint,
                  num_attention_heads=target_config.get("num_attention_heads", 8),
                  num_key_value_heads=target_config.get("num_key_value_heads", 8),
                  rms_norm_eps=target_config.get("rms_norm_eps", 1e-5),
                  draft_vocab_size=min(draft_vocab, target.vocab_size) if draft_vocab else 0,
                  **(overrides or {}))
    config = AmphistaConfig.medusa(**fields) if medusa else AmphistaConfig(**fields)
    torch.manual_seed(seed)
    model = AmphistaDraftModel(config)
    if config.draft_vocab_size:
        model.draft_to_target.copy_(build_token_map(train_set, config.draft_vocab_size))
    model.attach_target(target)
    return model


def split_record(settings: TrainSettings, train_set: list[Conversation],
                 eval_set: list[Conversation]) -> list:
    """What names a run's held-out split: seed, held-out fraction, training and held-out
    conversations."""
    return [settings.seed, settings.eval_fraction, len(train_set), len(eval_set)]


def continued_model(init_dir: Path, target: TargetWeights, *, medusa: bool,
                    settings: TrainSettings, train_set: list[Conversation],
                    eval_set: list[Conversation], prompts: str, prompt_range: list[int]
                    ) -> tuple[AmphistaDraftModel, list[dict]]:
    """The heads `train --init-from` continues (fp32, their config and draft vocabulary)
    and the runs they have had ({"epochs", "prompts", "prompt_range", "answers", "split"}
    each, oldest first: `data_runs`), so that no held-out conversation becomes training
    data. They must be this target's, of this mode, and the last run that may have seen
    any of this run's prompts (`_may_share_prompts`) must have had exactly these prompts
    (`prompts`, `prompt_range`) and this run's split (seed, held-out fraction and sizes).
    Where no earlier run can have seen them, the heads continue only if every run so far
    was on ShareGPT (a file's prompts may be any of them); other cases cannot be
    checked."""
    try:
        model = load_checkpoint(init_dir, target)
    except CheckpointError as e:
        raise TrainingInputError(f"--init-from: {e}") from e
    if model.config.is_medusa != medusa:
        raise TrainingInputError(
            f"--init-from {init_dir} holds {'Medusa' if model.config.is_medusa else 'Amphista'}"
            f" heads; this run trains {'Medusa' if medusa else 'Amphista'} heads")
    metrics_path = init_dir / METRICS_FILE
    if not metrics_path.is_file():
        raise TrainingInputError(f"--init-from {init_dir} has no metrics.json: its data split "
                                 "cannot be checked")
    earlier = json.loads(metrics_path.read_text())
    runs = data_runs(earlier)
    if "split" not in runs[-1]:  # recorded before runs kept their split: the folder's own
        runs[-1] = {**runs[-1], "split": [earlier["settings"]["seed"],
                                          earlier["settings"]["eval_fraction"],
                                          earlier["train_conversations"],
                                          earlier["eval_conversations"]]}
    ours = split_record(settings, train_set, eval_set)
    sharing = [run for run in runs if _may_share_prompts(run, prompts, prompt_range, ours[0])]
    if not sharing:
        sharegpt = set(SHAREGPT_TURNS.values())
        if prompts in sharegpt and all(run["prompts"] in sharegpt for run in runs):
            return model.train(), runs
        raise TrainingInputError(
            f"--init-from {init_dir} was last trained on {runs[-1]['prompts']}, this run on "
            f"{prompts}: whether this run's held-out prompts were its training data cannot "
            "be checked")
    last = sharing[-1]
    if last.get("split") is None:
        raise TrainingInputError(
            f"--init-from {init_dir} was trained on {prompts} before, and its split of those is "
            "not recorded: whether this run's held-out prompts were its training data cannot "
            "be checked")
    if last["split"] != ours:
        raise TrainingInputError(
            f"--init-from {init_dir} was trained on another split (seed, held-out fraction, "
            f"training and held-out conversations: {last['split']}; this run: {ours}): its "
            "held-out conversations would not stay held out")
    # Runs recorded before ranges all started at the list's first prompt.
    theirs_range = last.get("prompt_range")
    if theirs_range != prompt_range and (theirs_range is not None or prompt_range[0] != 0):
        raise TrainingInputError(
            f"--init-from {init_dir} was trained on {last['prompts']}, prompts "
            f"{_range_text(theirs_range)}; this run's are {_range_text(prompt_range)}: "
            "overlapping, not the same, so its held-out prompts would not stay held out")
    return model.train(), runs


def _may_share_prompts(run: dict, prompts: str, prompt_range: list[int], seed: int) -> bool:
    """Whether an earlier run may have trained on, or held out, a prompt of this run: it
    was on the same list and is not known to be on a disjoint range of it in the same
    order (ShareGPT's lists are shuffled by the seed)."""
    if run["prompts"] != prompts:
        return False
    theirs, split = run.get("prompt_range"), run.get("split")
    if theirs is None or split is None or split[0] != seed:
        return True
    return theirs[0] < prompt_range[1] and prompt_range[0] < theirs[1]


def _range_text(prompt_range: list[int] | None) -> str:
    return ("from the first on (how many not recorded)" if prompt_range is None
            else f"{prompt_range[0]}-{prompt_range[1] - 1}")


def train_heads(target_dir: Path, out_dir: Path, *, plan: RecordingPlan, medusa: bool,
                draft_vocab: int, settings: TrainSettings,
                num_workers: int = 1,
                use_gpu: bool = False, init_dir: Path | None = None) -> dict:
    """The whole job: data (recorded per `plan`, or reused from its shards), training,
    held-out evaluation, export, metrics and plot. num_workers > 1 trains data-parallel
    on Ray Train (training/ray_launcher.py). init_dir: continue these heads
    (`continued_model`) instead of fresh ones."""
    if num_workers < 1:
        raise TrainingInputError(f"--num-workers must be >= 1, got {num_workers}")
    check_inputs(target_dir, out_dir)
    target = TargetWeights.from_folder(target_dir)
    started = time.perf_counter()
    conversations = record_dataset(plan)
    if len(conversations) < 2:
        raise TrainingInputError("need at least 2 conversations (1 to train, 1 held out)")
    data_s = time.perf_counter() - started
    train_set, eval_set = split(conversations, settings.eval_fraction, settings.seed)

    earlier_runs: list[dict] = []
    if init_dir is None:
        model = draft_model_for(target_dir, target, train_set, medusa=medusa,
                                draft_vocab=draft_vocab, seed=settings.seed)
    else:
        model, earlier_runs = continued_model(init_dir, target, medusa=medusa,
                                              settings=settings, train_set=train_set,
                                              eval_set=eval_set, prompts=plan.prompt_source,
                                              prompt_range=plan.prompt_range)
    config = model.config

    out_dir.mkdir(parents=True, exist_ok=True)
    if num_workers > 1:
        # Ray is heavy and only needed here.
        from vllm_amphista.training.ray_launcher import train_on_ray

        train_started = time.perf_counter()
        history = train_on_ray(model, target_dir, plan.shard_paths(), settings, out_dir,
                               num_workers, use_gpu)
        metrics = training_record(settings, history, train_set, eval_set,
                                  time.perf_counter() - train_started)
        metrics["num_workers"] = num_workers
    else:
        metrics = train(model, target.lm_head.float(), train_set, eval_set, settings, out_dir)
    coverage = None
    if model.draft_to_target is not None:
        in_vocab = torch.zeros(target.vocab_size, dtype=torch.bool)
        in_vocab[model.draft_to_target] = True
        answers = torch.cat([c.tokens[c.prompt_len:] for c in eval_set])
        coverage = float(in_vocab[answers].float().mean())
    metrics.update(mode="medusa" if medusa else "amphista", config=config.to_dict(),
                   machine=describe(), compute_dtype=str(resolve_dtype(
                       settings.compute_dtype)).removeprefix("torch."),
                   data_seconds=data_s, total_seconds=time.perf_counter() - started,
                   draft_vocab_coverage_heldout=coverage,
                   earlier_epochs=sum(run["epochs"] for run in earlier_runs),
                   data_runs=[*earlier_runs, {"epochs": settings.epochs,
                                              "prompts": plan.prompt_source,
                                              "prompt_range": plan.prompt_range,
                                              "answers": plan.answers,
                                              "split": split_record(settings, train_set,
                                                                    eval_set)}],
                   parameters=sum(p.numel() for p in model.parameters()))
    save_checkpoint(model.to(torch.bfloat16), out_dir)  # bf16: small enough to ship
    write_metrics(metrics, out_dir / METRICS_FILE)
    plot_accuracy(metrics, out_dir / "accuracy.png",
                  f"{metrics['mode']} heads for {target.name}")
    write_model_card(metrics, out_dir)
    (out_dir / STATE_FILE).unlink()
    return metrics
