"""Mean accepted length of heads inside vLLM on a prompt file (default MT-Bench).

    python -m benchmarks.vllm_acceptance --heads amphista-heads vllm_amphista/heads/.../medusa

One engine per heads folder (and draft-sampling mode), temperature 0 unless
--temperature says otherwise, K drafts per step; one request at a time
(as the paper's harness) or, with --batch, all questions in one call (faster; the same
greedy tokens, so the same drafts up to float rounding in the batched target pass).
Reports tau = 1 + accepted / drafts (tokens per target forward) and the acceptance
rate at each draft position, as JSON and a table.
"""

from __future__ import annotations

import argparse

from vllm_amphista.engine import start_llm
from vllm_amphista.eval.report import machine_line, write_report
from vllm_amphista.eval.tau import acceptance_per_position, tau
from vllm_amphista.machine import TARGET_DTYPE, compute_dtype
from vllm_amphista.model.target import smollm2_dir
from vllm_amphista.prompts import first_turns


def spec_decode_counts(llm) -> tuple[int, list[int]]:
    """An LLM's (started with disable_log_stats=False) drafting steps so far, and its
    accepted drafts per position."""
    metrics = {m.name: getattr(m, "values", None) or getattr(m, "value", 0)
               for m in llm.get_metrics() if m.name.startswith("vllm:spec_decode")}
    return (int(metrics.get("vllm:spec_decode_num_drafts", 0)),
            list(metrics.get("vllm:spec_decode_num_accepted_tokens_per_pos") or []))


def drafting_llm(target: str, heads: str, draft_sampling: str = "sample"):
    """An engine drafting all K tokens every step ("step_cost": "off"): tau of the heads,
    not of the engine's choice of draft lengths on this machine."""
    return start_llm(target, disable_log_stats=False,
                     speculative_config={"method": "amphista", "model": heads,
                                         "draft_sampling": draft_sampling, "step_cost": "off"})


def acceptance(llm) -> dict:
    """drafts, tau and acceptance per draft position of everything `llm` generated."""
    drafts, per_position = spec_decode_counts(llm)
    return {"drafts": drafts, "tau": tau(sum(per_position), drafts),
            "acceptance_per_position": acceptance_per_position(per_position, drafts)}


def measure(target: str, heads: str, questions: list[str], max_tokens: int,
            batch: bool = False, temperature: float = 0.0,
            draft_sampling: str = "sample") -> dict:
    from vllm import SamplingParams  # heavy: only where an engine starts

    llm = drafting_llm(target, heads, draft_sampling)
    params = SamplingParams(temperature=temperature, max_tokens=max_tokens)
    conversations = [[{"role": "user", "content": q}] for q in questions]
    for group in [conversations] if batch else [[c] for c in conversations]:
        llm.chat(group, params, use_tqdm=False)
    return {"heads": heads, "temperature": temperature, "draft_sampling": draft_sampling,
            **acceptance(llm)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default=str(smollm2_dir()))
    parser.add_argument("--heads", nargs="+", required=True)
    parser.add_argument("--prompts", help="FastChat question.jsonl (default: MT-Bench)")
    parser.add_argument("--num-prompts", type=int, default=80)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--batch", action="store_true", help="all questions in one call")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--draft-sampling", nargs="+", default=["sample"],
                        choices=["sample", "argmax"],
                        help="how sampled requests draft (one engine per mode)")
    parser.add_argument("--out", default="runs/vllm_acceptance.json")
    args = parser.parse_args(argv)
    questions = first_turns(args.prompts, limit=args.num_prompts)
    rows = [measure(args.target, h, questions, args.max_tokens, args.batch, args.temperature,
                    mode) for h in args.heads for mode in args.draft_sampling]
    write_report(args.out, {"prompts": len(questions), "max_tokens": args.max_tokens,
                            "batched": args.batch, "temperature": args.temperature,
                            "target_dtype": TARGET_DTYPE,
                            "draft_dtype": str(compute_dtype()).removeprefix("torch."),
                            "rows": rows})
    print(machine_line(target=TARGET_DTYPE, draft=compute_dtype()))
    print("| heads | temperature | drafts | tau | acceptance per position |\n"
          "| --- | ---: | --- | ---: | --- |")
    for r in rows:
        print(f"| {r['heads']} | {r['temperature']} | {r['draft_sampling']} | {r['tau']:.2f} | "
              + " ".join(f"{a:.3f}" for a in r["acceptance_per_position"]) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
