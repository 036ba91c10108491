"""Cutting the verified rows to top-k / top-p: vLLM's full sort against our leading cut.

    python -m benchmarks.verified_top_p --out results/verified_top_p.json

A speculative step cuts K+1 rows per sampled request (the rejection sampler's target
probabilities) where a plain step cuts one. The rows here are SmolLM2's real next-token
logits over MT-Bench prompts at temperature 0.7 and 1.0; per batch of rows and cut:
milliseconds of vLLM's `apply_top_k_top_p_pytorch` and of `top_k_top_p.cut_logits`
(one torch thread, as vLLM serves on this CPU), the share of rows our cut had to sort
whole, and the rows whose kept tokens differ (expected 0). Prints a table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch

from vllm_amphista.eval.report import machine_line, markdown_table, write_report
from vllm_amphista.model.target import export_smollm2
from vllm_amphista.prompts import first_turns
from vllm_amphista.serving.top_k_top_p import CANDIDATES, cut_logits, leading_cut

CUTS = {"top-p 0.9": (None, 0.9), "top-p 0.95": (None, 0.95),
        "top-k 50, top-p 0.9": (50, 0.9)}


def real_logits(num_prompts: int) -> torch.Tensor:
    """Next-token logits [positions, V] of SmolLM2 over MT-Bench chat prompts."""
    target = export_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(target)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    rows = []
    with torch.no_grad():
        for question in first_turns(limit=num_prompts):
            ids = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                                add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)
            rows.append(model(**ids).logits[0])
    return torch.cat(rows)


def _median_ms(cut, logits: torch.Tensor, k, p, repeats: int) -> float:
    """Median milliseconds of cut(logits, k, p) on a fresh copy (both cut in place)."""
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        copy = logits.clone()
        start = time.perf_counter()
        cut(copy, k, p)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times[1:])


def measure(logits: torch.Tensor, batch_rows: list[int], repeats: int) -> list[dict]:
    results = []
    generator = torch.Generator().manual_seed(0)
    for temperature in (0.7, 1.0):
        for cut, (top_k, top_p) in CUTS.items():
            for n in batch_rows:
                batch = logits[torch.randperm(len(logits), generator=generator)[:n]]
                batch = batch / temperature
                k = None if top_k is None else torch.full((n,), top_k)
                p = torch.full((n,), top_p)
                vllm_ms = _median_ms(apply_top_k_top_p_pytorch, batch, k, p, repeats)
                ours_ms = _median_ms(cut_logits, batch, k, p, repeats)
                theirs = torch.isfinite(apply_top_k_top_p_pytorch(batch.clone(), k, p))
                ours = torch.isfinite(cut_logits(batch.clone(), k, p))
                sorted_whole = sum(leading_cut(row[None], None if k is None else k[:1],
                                               p[:1])[0].shape[-1] > CANDIDATES
                                   for row in batch)
                results.append({
                    "temperature": temperature, "cut": cut, "rows": n,
                    "vllm_ms": round(vllm_ms, 3), "ours_ms": round(ours_ms, 3),
                    "speedup": round(vllm_ms / ours_ms, 1),
                    "rows_sorted_whole": sorted_whole,
                    "rows_differing": int((ours != theirs).any(-1).sum())})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/verified_top_p.json")
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--rows", type=int, nargs="+", default=[5, 20, 80])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    logits = real_logits(args.num_prompts)
    torch.set_num_threads(1)
    results = measure(logits, args.rows, args.repeats)
    write_report(args.out, {"logit_rows": len(logits), "vocabulary": logits.shape[-1],
                            "torch_threads": 1, "results": results})
    print(machine_line(target="float32"))
    print(f"{len(logits)} rows of SmolLM2 logits over MT-Bench prompts; 1 torch thread\n")
    columns = ["T", "cut", "rows", "vLLM ms", "ours ms", "speedup", "sorted whole",
               "rows differing"]
    print(markdown_table(columns, [[r["temperature"], r["cut"], r["rows"], r["vllm_ms"],
                                    r["ours_ms"], f"{r['speedup']}x", r["rows_sorted_whole"],
                                    r["rows_differing"]] for r in results]))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
