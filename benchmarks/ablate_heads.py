"""Measured ablations for the heads: what moves Amphista's lead over Medusa.

    python -m benchmarks.ablate_heads [--variants ...] [--evaluate vllm_amphista/heads/...]

Every variant trains on the same cached distillation set as the shipped heads (the same
ShareGPT prompts, answers and held-out split; built by `vllm-amphista train` if missing)
for the same number of epochs, and reports held-out per-head top-1 and chain_tau, the
tokens per target step a K-token chain gets at temperature 0 (training.evaluate), which
is what vLLM's spec-decode counters measure. `--evaluate` scores finished heads folders
on the same held-out set, to tie chain_tau to the vLLM numbers. JSON + table.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from vllm_amphista.eval.report import machine_line, write_report
from vllm_amphista.machine import compute_dtype
from vllm_amphista.model.checkpoint import load_checkpoint
from vllm_amphista.model.target import TargetWeights, export_smollm2
from vllm_amphista.training.data import record_dataset, sharegpt_plan, split
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
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=Path, help="default: SmolLM2-135M-Instruct")
    parser.add_argument("--variants", nargs="*", default=["amphista", "medusa"],
                        choices=sorted(VARIANTS))
    parser.add_argument("--evaluate", nargs="*", default=[], help="finished heads folders")
    parser.add_argument("--num-prompts", type=int, default=600, help="as the shipped heads")
    parser.add_argument("--max-tokens", type=int, default=192, help="as the shipped heads")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--draft-vocab", type=int, default=8192)
    parser.add_argument("--out", type=Path, default=Path("runs/ablate_heads.json"))
    args = parser.parse_args(argv)

    target_dir = args.target or export_smollm2()
    target = TargetWeights.from_folder(target_dir)
    conversations = record_dataset(sharegpt_plan(target_dir, args.num_prompts,
                                                 args.max_tokens, dtype=compute_dtype()))
    base = TrainSettings(epochs=args.epochs)
    train_set, eval_set = split(conversations, base.eval_fraction, base.seed)
    lm_head = target.lm_head.float()
    rows: list[dict] = []

    def write(rows: list[dict]) -> None:
        write_report(args.out, {
            "target": str(target_dir), "epochs": args.epochs,
            "training_dtype": str(compute_dtype()).removeprefix("torch."),
            "train_conversations": len(train_set),
            "eval_conversations": len(eval_set), "rows": rows})

    for folder in args.evaluate:
        model = load_checkpoint(folder, target=target)
        rows.append({"name": f"{folder} (as shipped)", **evaluate(
            model, eval_set, lm_head, base.batch_conversations, base.max_positions)})
    for name in args.variants:
        variant = VARIANTS[name]
        settings = replace(base, **variant.settings)
        subset = train_set[: round(len(train_set) * variant.train_fraction)]
        model = draft_model_for(target_dir, target, subset, medusa=variant.medusa,
                                draft_vocab=args.draft_vocab, seed=settings.seed,
                                overrides=variant.config)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as work:
            record = train(model, lm_head, subset, eval_set, settings, Path(work))
        rows.append({"name": name, "train_s": time.perf_counter() - started,
                     "train_conversations": len(subset), **asdict(variant),
                     "parameters": sum(p.numel() for p in model.parameters()),
                     **record["history"][-1]["eval"]})
        print(f"{name}: chain_tau {rows[-1]['chain_tau']:.3f}", flush=True)
        write(rows)  # after every variant: a long queue keeps what it measured
    write(rows)
    print(machine_line(training=compute_dtype()))
    print("| variant | chain tau | top-1 per head | train s |\n| --- | ---: | --- | ---: |")
    for r in rows:
        print(f"| {r['name']} | {r['chain_tau']:.3f} | "
              + " ".join(f"{a:.3f}" for a in r["top1"])
              + f" | {r.get('train_s', 0):.0f} |")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
