"""Held-out tau next to vLLM's tau, on the same held-out conversations.

    python -m benchmarks.heldout_vs_vllm --heads vllm_amphista/heads/SmolLM2-135M-Instruct/*

The conversations are those `vllm-amphista train --num-prompts N` held out (the same
recorded set, split, seed and fraction). For each heads folder: the held-out chain_tau and
walk_tau (training.evaluate) over the first --max-tokens of each answer, and vLLM's tau
when the target answers the same prompts (their token ids, temperature 0, --max-tokens,
all K drafts every step). walk_tau is meant to predict vLLM's number: this checks it.
JSON + table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vllm_amphista.eval.acceptance import acceptance, drafting_llm
from vllm_amphista.eval.report import machine_line, write_report
from vllm_amphista.machine import TARGET_DTYPE, compute_dtype
from vllm_amphista.model.checkpoint import load_checkpoint
from vllm_amphista.model.target import TargetWeights, export_smollm2
from vllm_amphista.training.data import Conversation, record_dataset, sharegpt_plan, split
from vllm_amphista.training.objective import evaluate
from vllm_amphista.training.settings import TrainSettings


def answer_prefix(conversation: Conversation, max_tokens: int) -> Conversation:
    """The prompt and the first max_tokens answer tokens (what vLLM generates)."""
    end = conversation.prompt_len + max_tokens
    return Conversation(conversation.tokens[:end], conversation.hidden[:end - 1],
                        conversation.prompt_len)


def vllm_tau(target_dir: Path, heads: str, prompts: list[list[int]], max_tokens: int) -> dict:
    from vllm import SamplingParams  # heavy: only where an engine starts

    llm = drafting_llm(str(target_dir), heads)
    llm.generate([{"prompt_token_ids": ids} for ids in prompts],
                 SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=False)
    return {f"vllm_{name}": value for name, value in acceptance(llm).items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=Path, help="default: SmolLM2-135M-Instruct")
    parser.add_argument("--heads", nargs="+", required=True)
    parser.add_argument("--num-prompts", type=int, default=3072,
                        help="the recorded set the heads trained on (shipped: 3072)")
    parser.add_argument("--conversations", type=int, default=80, help="held-out ones used")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("runs/heldout_vs_vllm.json"))
    args = parser.parse_args(argv)

    target_dir = args.target or export_smollm2()
    target = TargetWeights.from_folder(target_dir)
    settings = TrainSettings()
    # The set `train` records by default (its --dtype auto, 256-token answers).
    plan = sharegpt_plan(target_dir, args.num_prompts, 256, dtype=compute_dtype())
    _, held_out = split(record_dataset(plan), settings.eval_fraction, settings.seed)
    held_out = [answer_prefix(c, args.max_tokens) for c in held_out[: args.conversations]]
    rows = []
    for heads in args.heads:
        model = load_checkpoint(heads, target=target)
        heldout = evaluate(model, held_out, target.lm_head.float(),
                           settings.batch_conversations, settings.max_positions)
        prompts = [c.tokens[: c.prompt_len].tolist() for c in held_out]
        rows.append({"heads": heads, "heldout_chain_tau": heldout["chain_tau"],
                     "heldout_walk_tau": heldout["walk_tau"],
                     **vllm_tau(target_dir, heads, prompts, args.max_tokens)})
    write_report(args.out, {"target": str(target_dir), "num_prompts": args.num_prompts,
                            "conversations": len(held_out), "max_tokens": args.max_tokens,
                            "target_dtype": TARGET_DTYPE,
                            "draft_dtype": str(compute_dtype()).removeprefix("torch."),
                            "rows": rows})
    print(machine_line(target=TARGET_DTYPE, draft=compute_dtype()))
    print("| heads | held-out chain tau | held-out walk tau | vLLM tau | vLLM acceptance |\n"
          "| --- | ---: | ---: | ---: | --- |")
    for r in rows:
        print(f"| {r['heads']} | {r['heldout_chain_tau']:.3f} | {r['heldout_walk_tau']:.3f} | "
              f"{r['vllm_tau']:.3f} | "
              + " ".join(f"{a:.3f}" for a in r["vllm_acceptance_per_position"]) + " |")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
