"""`vllm-amphista eval-tree`: chain vs tree speculation in the reference decoder.

For each heads folder: measure per-head, per-rank acceptance on calibration prompts
(ShareGPT, not the evaluation set), build the best trees of the requested sizes from
those rates, then decode every evaluation prompt plainly, with the chain of K and with
each tree, checking the tokens are identical and recording mean accepted length (tau)
and wall-clock tokens/s. Writes JSON and prints a markdown table. Needs only torch,
transformers (and triton for the tree kernel on CUDA).
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from vllm_amphista.eval.report import machine_line, write_report
from vllm_amphista.eval.tau import tau
from vllm_amphista.prompts import first_turns
from vllm_amphista.reference.decoder import ReferenceDecoder, best_tree, chain
from vllm_amphista.reference.tree import build_tree
from vllm_amphista.training.data import sharegpt_prompts


@torch.no_grad()
def measure_acceptance(decoder: ReferenceDecoder, prompts: list[list[int]], max_tokens: int,
                       top_k: int, eos: int | None) -> list[list[float]]:
    """rates[k][i]: how often head k's i-th candidate is the target's greedy token."""
    heads = decoder.draft.config.num_heads
    hits = torch.zeros(heads, top_k)
    total = torch.zeros(heads)
    for prompt in prompts:
        answer = decoder.plain(prompt, max_tokens, eos).tokens
        sequence = torch.tensor(prompt + answer, device=decoder.device)
        out = decoder.target(sequence[None], output_hidden_states=True)
        hidden = out.hidden_states[-1]
        logits = decoder.draft(hidden[:, :-1], sequence[None, 1:])[0]  # [T-1, K, V']
        ranked = decoder.draft.to_target_ids(logits.topk(top_k, -1).indices)
        for k in range(heads):
            # Position t predicts x_{t+2+k}; score answer tokens only.
            for t in range(len(prompt) - 1, len(sequence) - 2 - k):
                match = (ranked[t, k] == sequence[t + 2 + k]).nonzero()
                total[k] += 1
                if len(match):
                    hits[k, int(match[0])] += 1
    return (hits / total.clamp(min=1)[:, None]).tolist()


def run(args: argparse.Namespace) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.target)
    eos = tokenizer.eos_token_id

    def encode(texts):
        return [tokenizer.apply_chat_template([{"role": "user", "content": t}],
                                              add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"] for t in texts]

    prompts = encode(first_turns(args.prompts, limit=args.num_prompts))
    calibration = encode(sharegpt_prompts(args.calibration_prompts, seed=1))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    rows, plain_runs = [], None
    for heads in args.heads:
        decoder = ReferenceDecoder(args.target, heads, dtype=dtype, device=device)
        if plain_runs is None:  # plain decoding is the same for every heads folder
            decoder.plain(prompts[0], 8, eos)  # warm-up
            plain_runs = [decoder.plain(p, args.max_tokens, eos) for p in prompts]
            plain_s = sum(r.seconds for r in plain_runs)
            plain_tokens = sum(len(r.tokens) for r in plain_runs)
            rows.append({"heads": "-", "mode": "plain", "nodes": 0, "tau": 1.0,
                         "tokens_per_s": plain_tokens / plain_s, "speedup": 1.0,
                         "lossless": True})
        rates = measure_acceptance(decoder, calibration, args.max_tokens, args.top_k, eos)
        k = decoder.draft.config.num_heads
        modes = [("chain", chain(k))] + [
            (f"tree-{n}", build_tree(best_tree(rates, n), top_k=args.top_k))
            for n in args.tree_sizes]
        for mode, tree in modes:
            runs = [decoder.speculative(p, args.max_tokens, tree, eos) for p in prompts]
            seconds = sum(r.seconds for r in runs)
            steps = [a for r in runs for a in r.accepted_per_step]
            rows.append({
                "heads": str(heads), "mode": mode, "nodes": tree.num_nodes - 1,
                "tau": tau(sum(steps) - len(steps), len(steps)),
                "tokens_per_s": sum(len(r.tokens) for r in runs) / seconds,
                "speedup": plain_s / seconds,
                "lossless": all(r.tokens == p.tokens for r, p in zip(runs, plain_runs,
                                                                     strict=True))})
        for row in rows[-len(modes):]:
            row["acceptance_by_rank"] = rates
    return {"target": str(args.target), "prompts": len(prompts), "max_tokens": args.max_tokens,
            "device": torch.cuda.get_device_name() if device == "cuda"
            else platform.processor() or platform.machine(),
            "dtype": args.dtype, "torch": torch.__version__, "rows": rows}


def table(report: dict) -> str:
    lines = ["| heads | mode | nodes | tau | tokens/s | speedup | lossless |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for r in report["rows"]:
        lines.append(f"| {Path(r['heads']).name or '-'} | {r['mode']} | {r['nodes']} | "
                     f"{r['tau']:.2f} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f}x | "
                     f"{'yes' if r['lossless'] else 'NO'} |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", required=True)
    parser.add_argument("--heads", nargs="+", required=True, help="one or more heads folders")
    parser.add_argument("--prompts", help="FastChat question.jsonl (default: MT-Bench)")
    parser.add_argument("--num-prompts", type=int, default=80)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--tree-sizes", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--calibration-prompts", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--out", default="runs/eval_tree.json")


def main(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    report = run(args)
    report["wall_s"] = time.perf_counter() - started
    write_report(args.out, report)
    print(machine_line(dtype=args.dtype))
    print(table(report))
    print(f"wrote {args.out}")
    return 0 if all(r["lossless"] for r in report["rows"]) else 1
