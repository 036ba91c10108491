"""What vLLM's speculative path costs when it carries no drafts, next to vanilla, as served.

    python -m benchmarks.spec_path_cost [--dtype bfloat16] [--out results/spec_path_cost.json]

Two engines run as `vllm serve` runs them (engine core and worker in processes of their
own): plain vLLM, and vLLM with a speculative drafter that proposes a fixed number of
throw-away drafts (the `vllm-amphista calibrate` drafter). Greedy steps at a few batch
sizes, the engines and draft counts taking turns in every round, ms per step (median).
With 0 drafts the speculative engine does what a paused Amphista proposer leaves it to
do, so its excess over vanilla is the floor under Amphista's speed wherever drafting does
not pay. JSON + table.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from vllm_amphista.engine import ENGINE_SETTLE_S, fork_engines_as_served, start_llm
from vllm_amphista.eval.calibrate import (
    CALIBRATION_WORKER_PATH,
    FIXED_DRAFTER_PATH,
    generate_ms,
)
from vllm_amphista.eval.report import machine_line, markdown_table, write_report
from vllm_amphista.machine import describe
from vllm_amphista.model.target import export_smollm2

TOKENS = 32  # per request and run


def step_ms(llm, requests: int) -> float:
    elapsed = generate_ms(llm, requests, TOKENS)
    time.sleep(ENGINE_SETTLE_S)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--drafts", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("results/spec_path_cost.json"))
    args = parser.parse_args()
    fork_engines_as_served(__spec__.name)
    target = export_smollm2()
    largest = max(args.batch_sizes)
    vanilla = start_llm(target, dtype=args.dtype, max_num_seqs=largest, as_served=True)
    spec = start_llm(target, dtype=args.dtype, max_num_seqs=largest, as_served=True,
                     worker_extension_cls=CALIBRATION_WORKER_PATH,
                     speculative_config={"method": "custom_class", "model": FIXED_DRAFTER_PATH,
                                         "num_speculative_tokens": max(1, *args.drafts)})
    step_ms(vanilla, 2), step_ms(spec, 2)  # warm-up
    times: dict[tuple[int, str], list[float]] = {}
    for _ in range(args.rounds):
        for requests in args.batch_sizes:
            times.setdefault((requests, "vanilla"), []).append(step_ms(vanilla, requests))
            for drafts in args.drafts:
                spec.collective_rpc("set_drafts", args=(drafts,))
                times.setdefault((requests, f"{drafts} drafts"), []).append(
                    step_ms(spec, requests))
    served = {**describe(), "torch_threads": spec.collective_rpc("torch_threads")[0]}
    rows = [{"requests": requests, "engine": engine, "ms": statistics.median(ms),
             "runs_ms": ms} for (requests, engine), ms in times.items()]
    write_report(args.out, {"target_dtype": args.dtype, "tokens_per_request": TOKENS,
                            "rounds": args.rounds, "rows": rows}, served)
    plain = {r["requests"]: r["ms"] for r in rows if r["engine"] == "vanilla"}
    print(machine_line(served, target=args.dtype) + "\n")
    print(markdown_table(
        ["requests", "engine", "ms per step (median)", "vs vanilla"],
        [[r["requests"], r["engine"] if r["engine"] == "vanilla" else
          f"speculative, {r['engine']}", f"{r['ms']:.1f}", f"{r['ms'] / plain[r['requests']]:.2f}x"]
         for r in rows]))


if __name__ == "__main__":
    main()
