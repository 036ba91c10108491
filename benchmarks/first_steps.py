"""What a drafting engine's first step at a new shape costs, with and without the warm-up.

    python -m benchmarks.first_steps [--dtype bfloat16] [--k 3] [--num-prompts 16]

Runs the prompts 1, 4, 8 and 16 at a time in an in-process engine that drafts every step
(`step_cost` off, `--k` drafts), once with the proposer's warm-up of its products
(serving/warm_up.py) and once without (one fresh Python each: vLLM's CPU build cannot
start two engines in one process). For every target step shape (tokens, requests) and
every draft-pass shape (rows, slots, logits or not) met at least MIN_CALLS times, the
first call's time minus the median of the later ones: the one-off cost the warm-up is
there to take away. It also gives the warm-up's own time, and that of running it again
right after: what the first pass spent making oneDNN's primitives is the difference.
JSON + table.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from pathlib import Path

from vllm_amphista.engine import start_llm
from vllm_amphista.eval.report import (
    machine_line,
    markdown_table,
    parse_unless_child,
    run_child,
    write_report,
)
from vllm_amphista.machine import DTYPE_NAMES, TARGET_DTYPE, compute_dtype
from vllm_amphista.model.target import export_smollm2
from vllm_amphista.paths import SHIPPED_HEADS
from vllm_amphista.prompts import first_turns

CONCURRENCIES = (1, 4, 8, 16)
MIN_CALLS = 3  # calls of a shape for its first one to be compared with the rest


def first_call_extra(times: dict[object, list[float]]) -> list[float]:
    """Per shape met MIN_CALLS times or more: its first call's ms over its later ones'
    median."""
    return [ms[0] - statistics.median(ms[1:]) for ms in times.values() if len(ms) >= MIN_CALLS]


def run_one(target: str, heads: str, k: int, prompts: list[str], max_tokens: int,
            dtype: str, warm: bool) -> dict:
    """Runs in its own process (see main)."""
    from vllm import SamplingParams  # heavy: only where an engine starts

    import vllm_amphista.serving.proposer as proposer

    warm_up_s = []
    warm_products = proposer.warm_products

    def timed_warm_up(*args):
        # Twice where on: the second pass finds every primitive made, so the difference
        # is what making them cost, free of the engine's step-to-step noise.
        warmed = {}
        for _ in range(2 if warm else 1):
            started = time.perf_counter()
            if warm:
                warmed = warm_products(*args)
            warm_up_s.append(time.perf_counter() - started)
        return warmed

    proposer.warm_products = timed_warm_up
    llm = start_llm(target, speculative_config={
        "method": "amphista", "model": heads, "step_cost": "off",
        "num_speculative_tokens": k}, dtype=dtype)
    runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner
    forward_ms, pass_ms = defaultdict(list), defaultdict(list)
    forward, extend = runner.model.forward, runner.drafter.model.extend

    def timed_forward(*args, **kwargs):
        # Token count and requests: the same count over other requests is another step.
        shape = (kwargs["input_ids"].shape[0], runner.input_batch.num_reqs)
        started = time.perf_counter()
        out = forward(*args, **kwargs)
        forward_ms[shape].append(1e3 * (time.perf_counter() - started))
        return out

    def timed_extend(cache, hidden_states, next_token_ids, counts, logits=True):
        started = time.perf_counter()
        out = extend(cache, hidden_states, next_token_ids, counts, logits)
        shape = (hidden_states.shape[0], int((counts > 0).sum()), logits)
        pass_ms[shape].append(1e3 * (time.perf_counter() - started))
        return out

    runner.model.forward, runner.drafter.model.extend = timed_forward, timed_extend
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    for concurrency in CONCURRENCIES:
        llm.chat([[{"role": "user", "content": p}] for p in prompts[:concurrency]], params,
                 use_tqdm=False)
    rows = {}
    for name, times in (("target forward", forward_ms), ("draft pass", pass_ms)):
        extra = first_call_extra(times)
        rows[name] = {"shapes": len(times), "compared": len(extra),
                      "mean_extra_ms": statistics.mean(extra) if extra else None,
                      "median_extra_ms": statistics.median(extra) if extra else None}
    return {"warm_up": warm, "warm_up_s": warm_up_s[0], "warm_up_again_s": warm_up_s[-1],
            "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", default=str(SHIPPED_HEADS / "amphista"))
    parser.add_argument("--num-prompts", type=int, default=max(CONCURRENCIES))
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--k", type=int, default=3, help="drafts per step")
    parser.add_argument("--dtype", default=TARGET_DTYPE, choices=list(DTYPE_NAMES))
    parser.add_argument("--out", type=Path, default=Path("runs/first_steps.json"))
    args = parse_unless_child(parser, argv, run_one)
    if args is None:  # a child, whose job ran
        return 0

    target = str(export_smollm2())
    prompts = first_turns(limit=args.num_prompts)
    results = []
    for warm in (False, True):
        result = run_child("benchmarks.first_steps", {
            "target": target, "heads": args.heads, "k": args.k, "prompts": prompts,
            "max_tokens": args.max_tokens, "dtype": args.dtype, "warm": warm})
        if result is None:
            return 1
        results.append(result)
    write_report(args.out, {"target_dtype": args.dtype, "k": args.k, "prompts": len(prompts),
                            "max_tokens": args.max_tokens, "concurrencies": CONCURRENCIES,
                            "results": results})
    print(machine_line(target=args.dtype, draft=compute_dtype()))

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    print(markdown_table(
        ["warm-up", "warm-up s (again)", "products", "shapes met (compared)",
         "first call over later ones, ms: mean", "median"],
        [["on" if r["warm_up"] else "off",
          f"{r['warm_up_s']:.2f} ({r['warm_up_again_s']:.2f})", name,
          f"{row['shapes']} ({row['compared']})", cell(row["mean_extra_ms"]),
          cell(row["median_extra_ms"])]
         for r in results for name, row in r["rows"].items()]))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
