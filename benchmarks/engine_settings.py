"""Engine settings on this CPU: threads, preloaded libraries and the target compiled or
eager, vanilla and Amphista.

    python -m benchmarks.engine_settings [--settings ...] [--step-cost off|auto|FILE]
                                         [--dtype D] [--out results/engine_settings.json]

vLLM's CPU engine drops Torch to 1 thread for serving unless OMP_NUM_THREADS is set, and
warns when neither tcmalloc nor Intel OpenMP is preloaded. Each setting runs in a fresh
Python (LD_PRELOAD must be in place before the process starts) with an in-process
engine, as `LLM(...)` users run one (served engines: `vllm-amphista bench` with the
setting in its environment): greedy decoding of MT-Bench questions, one request at a
time and 16 at once, plain and with the shipped heads, tokens/s. JSON + table.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from vllm_amphista.engine import EAGER_ENV
from vllm_amphista.eval.report import (
    machine_line,
    parse_unless_child,
    run_child,
    write_report,
)
from vllm_amphista.machine import DTYPE_NAMES, TARGET_DTYPE, compute_dtype, intel_openmp
from vllm_amphista.model.target import export_smollm2
from vllm_amphista.paths import SHIPPED_HEADS
from vllm_amphista.prompts import first_turns

IOMP = intel_openmp()  # None where the engine wheel installed none
SETTINGS = {
    "defaults": {},  # threads: the machine line says how many
    "OMP_NUM_THREADS=2": {"OMP_NUM_THREADS": "2"},
    "libiomp5 preloaded": {"LD_PRELOAD": str(IOMP)},
    "OMP_NUM_THREADS=2 + libiomp5": {"OMP_NUM_THREADS": "2", "LD_PRELOAD": str(IOMP)},
    # vLLM compiles the target by default; the project's engines did not until it was
    # measured here (docs/decisions.md, "The target is compiled").
    "target eager": {EAGER_ENV: "1"},
    "libiomp5 + target eager": {"LD_PRELOAD": str(IOMP), EAGER_ENV: "1"},
}


def run_one(target: str, heads: str | None, prompts: list[str], max_tokens: int,
            step_cost: str, dtype: str) -> dict:
    """In the child: tokens/s at concurrency 1 and 16."""
    from vllm import SamplingParams

    from vllm_amphista.engine import start_llm

    spec = {"method": "amphista", "model": heads, "step_cost": step_cost} if heads else None
    llm = start_llm(target, speculative_config=spec, dtype=dtype)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    chats = [[{"role": "user", "content": p}] for p in prompts]
    llm.chat(chats[:1], params, use_tqdm=False)  # warm-up
    result = {}
    for concurrency in (1, 16):
        started, tokens = time.perf_counter(), 0
        for first in range(0, len(chats), concurrency):
            outs = llm.chat(chats[first: first + concurrency], params, use_tqdm=False)
            tokens += sum(len(o.outputs[0].token_ids) for o in outs)
        result[f"c{concurrency}"] = tokens / (time.perf_counter() - started)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("runs/engine_settings.json"))
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--step-cost", nargs="+", default=["off"],
                        help="Amphista's draft-length setting(s): off, auto or a file")
    parser.add_argument("--dtype", default=TARGET_DTYPE, choices=list(DTYPE_NAMES),
                        help="the target's dtype")
    args = parse_unless_child(parser, argv, run_one)
    if args is None:  # a child, whose job ran
        return 0
    target = str(export_smollm2())
    prompts = first_turns(limit=args.num_prompts)
    rows = []
    methods = [(None, "off")] + [(str(SHIPPED_HEADS / "amphista"), s) for s in args.step_cost]
    for name in args.settings:
        env = SETTINGS[name]
        if "LD_PRELOAD" in env and IOMP is None:
            continue
        for heads, step_cost in methods:
            child_env = {k: v for k, v in os.environ.items()
                         if k not in ("TRITON_INTERPRET", "OMP_NUM_THREADS", "LD_PRELOAD")}
            result = run_child("benchmarks.engine_settings", {
                "target": target, "heads": heads, "prompts": prompts,
                "max_tokens": args.max_tokens, "step_cost": step_cost, "dtype": args.dtype},
                {**child_env, **env})
            if result is None:
                return 1
            rows.append({"setting": name, "env": env,
                         "method": f"amphista (step cost {step_cost})" if heads else "vanilla",
                         **result})
            print(rows[-1], flush=True)
    write_report(args.out, {"prompts": len(prompts), "max_tokens": args.max_tokens,
                            "dtype": args.dtype, "rows": rows})
    print(machine_line(target=args.dtype, draft=compute_dtype()))
    print("| setting | method | tokens/s c=1 | tokens/s c=16 |\n| --- | --- | ---: | ---: |")
    for r in rows:
        print(f"| {r['setting']} | {r['method']} | {r['c1']:.1f} | {r['c16']:.1f} |")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
