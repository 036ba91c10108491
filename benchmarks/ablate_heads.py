"""Measured ablations for the heads: what moves Amphista's lead over Medusa.

    python -m benchmarks.ablate_heads [--variants ...] [--evaluate vllm_amphista/heads/...]

Every variant trains on the same cached distillation set (the same ShareGPT prompts,
greedy answers and held-out split; recorded first if missing) for the same number of
epochs, and reports held-out per-head top-1, chain_tau (1 + the mean number of leading
heads right, training.evaluate) and walk_tau (the same along the positions a
temperature-0 speculative loop drafts from: what vLLM's counters measure). The
`sampled-*` variants also train on answers sampled at --sampled-temperature for the
same prompts, the `sharegpt-*` ones on ShareGPT's own replies to them read by the target
(both recorded too), never for a held-out prompt. Variants already in --out
(same data and budget) are kept, so an interrupted queue resumes. `--evaluate` scores
finished heads folders on the same held-out set. JSON + table.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from vllm_amphista.eval.report import machine_line, write_report
from vllm_amphista.machine import compute_dtype
from vllm_amphista.model.checkpoint import load_checkpoint
from vllm_amphista.model.target import TargetWeights, export_smollm2
from vllm_amphista.training.data import (
    Conversation,
    record_dataset,
    sharegpt_plan,
    split,
    with_sharegpt_replies,
)
from vllm_amphista.training.heads import draft_model_for
from vllm_amphista.training.loop import train
from vllm_amphista.training.objective import evaluate
from vllm_amphista.training.settings import TrainSettings


@dataclass(frozen=True)
class Variant:
    medusa: bool = False
    settings: dict = field(default_factory=dict)  # TrainSettings changes
    config: dict = field(default_factory=dict)  # AmphistaConfig changes
    train_fraction: float = 1.0  # the first part of the (shuffled) training split
    # Other answers to the same prompts, "sampled" (at --sampled-temperature) or
    # "sharegpt" (ShareGPT's replies): mix="half" trains on them for a random half of the
    # training prompts instead of the greedy ones (the same budget), "added" on them for
    # every training prompt besides the greedy ones (up to twice the data).
    answers: str = "greedy"
    mix: str = "none"


VARIANTS: dict[str, Variant] = {
    "amphista": Variant(),
    "medusa": Variant(medusa=True),
    "amphista-batch2": Variant(settings={"batch_conversations": 2}),
    "medusa-batch2": Variant(medusa=True, settings={"batch_conversations": 2}),
    "amphista-batch2-half-data": Variant(settings={"batch_conversations": 2},
                                         train_fraction=0.5),
    "medusa-batch2-half-data": Variant(medusa=True, settings={"batch_conversations": 2},
                                       train_fraction=0.5),
    "amphista-batch2-no-aeb": Variant(settings={"batch_conversations": 2},
                                      config={"use_aeb": False}),
    "amphista-batch2-no-sal": Variant(settings={"batch_conversations": 2},
                                      config={"num_stages": 0}),
    "amphista-batch2-lm1": Variant(settings={"batch_conversations": 2, "lm_weight": 1.0}),
    # Training choices, each against "amphista" at the same --batch and --epochs; its
    # second seed (initialisation and batch order) shows how far chance alone moves it.
    "amphista-seed1": Variant(settings={"seed": 1}),
    "amphista-lr3e-4": Variant(settings={"learning_rate": 3e-4}),
    "amphista-lr3e-3": Variant(settings={"learning_rate": 3e-3}),
    "amphista-2-epochs": Variant(settings={"epochs": 2}),
    "amphista-4-epochs": Variant(settings={"epochs": 4}),
    "amphista-lm0": Variant(settings={"lm_weight": 0.0}),
    "amphista-lm1": Variant(settings={"lm_weight": 1.0}),
    "amphista-decay1": Variant(settings={"head_decay": 1.0}),
    "amphista-decay0.6": Variant(settings={"head_decay": 0.6}),
    "amphista-sampled-half": Variant(answers="sampled", mix="half"),
    "amphista-sampled-added": Variant(answers="sampled", mix="added"),
    "amphista-sharegpt-half": Variant(answers="sharegpt", mix="half"),
    "amphista-sharegpt-added": Variant(answers="sharegpt", mix="added"),
}


def prompt_key(conversation: Conversation) -> tuple[int, ...]:
    return tuple(conversation.tokens[: conversation.prompt_len].tolist())


def training_set(variant: Variant, greedy: list[Conversation], other: list[Conversation],
                 seed: int) -> list[Conversation]:
    """The variant's training conversations: the greedy training split, with the other
    answers (only to its own prompts, so no held-out prompt leaks in) as variant.mix
    says."""
    subset = greedy[: round(len(greedy) * variant.train_fraction)]
    if variant.mix == "none":
        return subset
    twins = {prompt_key(c): c for c in other}
    if variant.mix == "added":
        return subset + [twins[key] for key in map(prompt_key, subset) if key in twins]
    swapped = set(random.Random(seed).sample(range(len(subset)), len(subset) // 2))
    return [twins.get(prompt_key(c), c) if i in swapped else c for i, c in enumerate(subset)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=Path, help="default: SmolLM2-135M-Instruct")
    parser.add_argument("--variants", nargs="*", default=["amphista", "medusa"],
                        choices=sorted(VARIANTS))
    parser.add_argument("--evaluate", nargs="*", default=[], help="finished heads folders")
    parser.add_argument("--num-prompts", type=int, default=600,
                        help="600: the architecture ablations in docs/results.md")
    parser.add_argument("--max-tokens", type=int, default=192,
                        help="answer length (192: the architecture ablations)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch", type=int, default=TrainSettings.batch_conversations,
                        help="conversations per step")
    parser.add_argument("--sampled-temperature", type=float, default=0.7)
    parser.add_argument("--draft-vocab", type=int, default=8192)
    parser.add_argument("--out", type=Path, default=Path("runs/ablate_heads.json"))
    args = parser.parse_args(argv)

    target_dir = args.target or export_smollm2()
    target = TargetWeights.from_folder(target_dir)
    def plan(temperature: float = 0.0):
        return sharegpt_plan(target_dir, args.num_prompts, args.max_tokens,
                             temperature=temperature, dtype=compute_dtype())

    base = TrainSettings(epochs=args.epochs, batch_conversations=args.batch)
    train_set, eval_set = split(record_dataset(plan()), base.eval_fraction, base.seed)
    other_plans = {"sampled": lambda: plan(args.sampled_temperature),
                   "sharegpt": lambda: with_sharegpt_replies(plan())}
    other = {answers: record_dataset(make()) for answers, make in other_plans.items()
             if any(VARIANTS[name].answers == answers for name in args.variants)}
    lm_head = target.lm_head.float()
    header = {"target": str(target_dir), "num_prompts": args.num_prompts,
              "max_tokens": args.max_tokens, "epochs": args.epochs, "batch": args.batch,
              "sampled_temperature": args.sampled_temperature,
              "training_dtype": str(compute_dtype()).removeprefix("torch."),
              "train_conversations": len(train_set), "eval_conversations": len(eval_set)}
    rows: list[dict] = []
    if args.out.is_file():  # resume: keep what an earlier run of this queue measured
        earlier = json.loads(args.out.read_text())
        if all(earlier.get(key) == value for key, value in header.items()):
            rows = [r for r in earlier["rows"] if r["name"] in args.variants]

    def write(rows: list[dict]) -> None:
        write_report(args.out, {**header, "rows": rows})

    for folder in args.evaluate:
        model = load_checkpoint(folder, target=target)
        rows.append({"name": f"{folder} (as shipped)", **evaluate(
            model, eval_set, lm_head, base.batch_conversations, base.max_positions)})
    for name in args.variants:
        if any(r["name"] == name for r in rows):
            continue
        variant = VARIANTS[name]
        settings = replace(base, **variant.settings)
        subset = training_set(variant, train_set, other.get(variant.answers, []),
                              settings.seed)
        model = draft_model_for(target_dir, target, subset, medusa=variant.medusa,
                                draft_vocab=args.draft_vocab, seed=settings.seed,
                                overrides=variant.config)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as work:
            record = train(model, lm_head, subset, eval_set, settings, Path(work))
        rows.append({"name": name, "train_s": time.perf_counter() - started,
                     "train_conversations": len(subset), **asdict(variant),
                     "parameters": sum(p.numel() for p in model.parameters()),
                     "tokens_per_second": record["tokens_per_second"],
                     "per_epoch": [h["eval"]["walk_tau"] for h in record["history"]],
                     **record["history"][-1]["eval"]})
        print(f"{name}: chain_tau {rows[-1]['chain_tau']:.3f} "
              f"walk_tau {rows[-1]['walk_tau']:.3f}", flush=True)
        write(rows)  # after every variant: a long queue keeps what it measured
    write(rows)
    print(machine_line(training=compute_dtype()))
    print("| variant | chain tau | walk tau | top-1 per head | train s |\n"
          "| --- | ---: | ---: | --- | ---: |")
    for r in rows:
        print(f"| {r['name']} | {r['chain_tau']:.3f} | {r.get('walk_tau', float('nan')):.3f} | "
              + " ".join(f"{a:.3f}" for a in r["top1"])
              + f" | {r.get('train_s', 0):.0f} |")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
