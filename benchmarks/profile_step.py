"""Where an engine step's time goes, plain vs speculative, inside vLLM.

    python -m benchmarks.profile_step [--heads H] [--num-prompts N] [--max-tokens T]
                                      [--temperature 0.7] [--concurrency 16]
                                      [--dtype bfloat16] [--k 2] [--step-cost off]

Runs the prompts `--concurrency` at a time (one at a time by default, temperature 0) in
an in-process engine (one fresh Python per method: vLLM's CPU build cannot start two
engines in one process) and times, per engine step: the target forward (`model.forward`
of the runner's model), sampling (the runner's `_sample`: vLLM's sampler, or its
rejection sampler under speculation), the draft model (`AmphistaDraftModel.extend`), the
proposer glue around it (the runner patch's row bookkeeping in `propose_from_step`), and
everything else vLLM does in the step (scheduling, output handling). It counts the
drafts proposed, and times each drafting pass on its own (catch-ups over kept rows
apart): a pass's cost, which paused steps would dilute in the per-step figure. A second
table gives the speculative path's small pieces per call (medians): vLLM's input
preparation and sampler bookkeeping, the runner patch's hand-over to the proposer, the
engine core's fetch of the drafts, and the proposer's calls by what it did (paused,
keeping rows for a probe, drafting). The timers are plain wrappers on this engine's
objects, installed by this script only. JSON + tables.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
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


def _timing(function, record: Callable[[float], object]):
    """`function`, each call's seconds handed to `record`."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            record(time.perf_counter() - started)
    return wrapper


def _timed(function, totals: dict[str, float], key: str):
    """`function`, its calls' seconds summed in totals[key], counted in key_calls."""
    def add(seconds: float) -> None:
        totals[key] = totals.get(key, 0.0) + seconds
        totals[key + "_calls"] = totals.get(key + "_calls", 0) + 1
    return _timing(function, add)


def _timed_passes(extend, totals: dict[str, float]):
    """The draft model's passes that draft (logits) apart from its catch-ups over kept
    rows (`logits=False`): a pass's own cost, not diluted by paused steps."""
    timed = {True: _timed(extend, totals, "draft_pass"),
             False: _timed(extend, totals, "catch_up")}

    @functools.wraps(extend)
    def wrapper(*args, **kwargs):
        return timed[kwargs.get("logits", True)](*args, **kwargs)
    return wrapper


def _calls_by_plan(drafter, calls: dict[str, list[float]]) -> None:
    """Time the proposer's calls apart by what its plan made of them: paused (skip),
    keeping rows for a probe (track) or drafting (draft)."""
    plans: list[str] = []
    plan, propose = drafter._plan, drafter.propose_from_step

    @functools.wraps(plan)
    def recording_plan(*args, **kwargs):
        plans.append(plan(*args, **kwargs))
        return plans[-1]

    @functools.wraps(propose)
    def by_plan(step):
        started, seen = time.perf_counter(), len(plans)
        try:
            return propose(step)
        finally:
            chosen = plans[seen] if len(plans) > seen else "none"
            calls[f"proposer {chosen}"].append(time.perf_counter() - started)

    drafter._plan, drafter.propose_from_step = recording_plan, by_plan


def _counting_drafts(propose, totals: dict[str, float]):
    @functools.wraps(propose)
    def wrapper(*args, **kwargs):
        proposal = propose(*args, **kwargs)
        totals["drafts"] = totals.get("drafts", 0) + sum(map(len, proposal.tokens))
        return proposal
    return wrapper


def profile_one(target: str, heads: str | None, k: int | None, prompts: list[str],
                max_tokens: int, temperature: float, concurrency: int, dtype: str,
                step_cost: str = "auto") -> dict:
    """Runs in its own process (see main)."""
    from vllm import SamplingParams  # heavy: only where an engine starts

    spec = {"method": "amphista", "model": heads, "step_cost": step_cost} if heads else None
    if spec and k:
        spec["num_speculative_tokens"] = k
    llm = start_llm(target, speculative_config=spec, dtype=dtype)
    # Sampled answers differ between methods: the same length for all (see eval/bench.py).
    params = SamplingParams(temperature=temperature, max_tokens=max_tokens,
                            ignore_eos=temperature > 0)
    llm.chat([[{"role": "user", "content": prompts[0]}]], params, use_tqdm=False)  # warm-up
    runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner
    totals: dict[str, float] = {}
    runner.model.forward = _timed(runner.model.forward, totals, "target_forward")
    runner._sample = _timed(runner._sample, totals, "sampling")
    drafter = getattr(runner, "drafter", None)
    if drafter is not None:
        drafter.propose_from_step = _timed(_counting_drafts(drafter.propose_from_step, totals),
                                           totals, "proposer")
        drafter.model.extend = _timed_passes(drafter.model.extend, totals)
    # The speculative path's own pieces, per call: vLLM's input preparation and sampler
    # bookkeeping (every engine has them; a speculative one adds draft metadata), the
    # runner patch (its StepRows and the proposer), the engine core's fetch of the drafts
    # after each step, and the proposer by plan.
    calls: dict[str, list[float]] = defaultdict(list)
    core = llm.llm_engine.engine_core.engine_core
    for owner, name in ((runner, "_prepare_inputs"), (runner, "_bookkeeping_sync"),
                        (runner, "propose_draft_token_ids"), (core, "post_step")):
        # Each call kept, for medians: a few slow calls would swamp these in a total.
        setattr(owner, name, _timing(getattr(owner, name), calls[name].append))
    if drafter is not None:
        _calls_by_plan(drafter, calls)
    tokens = 0
    started = time.perf_counter()
    for first in range(0, len(prompts), concurrency):
        conversations = [[{"role": "user", "content": prompt}]
                         for prompt in prompts[first: first + concurrency]]
        out = llm.chat(conversations, params, use_tqdm=False)
        tokens += sum(len(o.outputs[0].token_ids) for o in out)
    total = time.perf_counter() - started
    steps = int(totals["target_forward_calls"])
    draft_model = totals.get("draft_pass", 0.0) + totals.get("catch_up", 0.0)
    passes = int(totals.get("draft_pass_calls", 0))
    per_step = {
        "target_forward_ms": 1e3 * totals["target_forward"] / steps,
        "sampling_ms": 1e3 * totals["sampling"] / steps,
        "draft_model_ms": 1e3 * draft_model / steps,
        "proposer_glue_ms": 1e3 * (totals.get("proposer", 0.0) - draft_model) / steps,
    }
    per_step["rest_of_vllm_ms"] = 1e3 * total / steps - sum(per_step.values())
    return {"method": "amphista" if heads else "vanilla", "heads": heads, "k": k, "tokens": tokens,
            "steps": steps, "seconds": total, "tokens_per_s": tokens / total,
            "tokens_per_step": tokens / steps, "drafts_per_step": totals.get("drafts", 0) / steps,
            "step_ms": 1e3 * total / steps, **per_step,
            "draft_passes_per_step": passes / steps,
            "draft_pass_ms": 1e3 * totals["draft_pass"] / passes if passes else 0.0,
            "calls": {name: {"per_step": len(seconds) / steps,
                             "median_us": 1e6 * statistics.median(seconds)}
                      for name, seconds in calls.items() if seconds}}


def _call_cell(call: dict | None) -> str:
    """"41 us" for a piece every step runs once, "41 us x 0.98" otherwise."""
    if call is None:
        return "-"
    share = "" if abs(call["per_step"] - 1) < 0.005 else f" x {call['per_step']:.2f}"
    return f"{call['median_us']:.0f} us{share}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", help="target folder (default: SmolLM2, exported if missing)")
    parser.add_argument("--heads", nargs="+", default=[str(SHIPPED_HEADS / "amphista")])
    parser.add_argument("--prompts", help="FastChat question.jsonl (default: MT-Bench)")
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--concurrency", type=int, default=1, help="requests per batch")
    parser.add_argument("--dtype", default=TARGET_DTYPE, choices=list(DTYPE_NAMES),
                        help="the target's dtype (the draft model's is the machine's)")
    parser.add_argument("--k", type=int, nargs="+", default=[None],
                        help="drafts per step, one run each (default: the heads that pay)")
    parser.add_argument("--step-cost", default="auto",
                        help="the proposer's step cost: auto, off (draft every step, every "
                        "draft verified) or a calibration file")
    parser.add_argument("--out", type=Path, default=Path("runs/profile_step.json"))
    args = parse_unless_child(parser, argv, profile_one)
    if args is None:  # a child, whose job ran
        return 0

    target = args.target or str(export_smollm2())
    prompts = first_turns(args.prompts, limit=args.num_prompts)
    rows = []
    for heads, k in [(None, None), *((h, k) for h in args.heads for k in args.k)]:
        result = run_child("benchmarks.profile_step", {
            "target": target, "heads": heads, "k": k, "prompts": prompts,
            "max_tokens": args.max_tokens, "temperature": args.temperature,
            "concurrency": args.concurrency, "dtype": args.dtype,
            "step_cost": args.step_cost})
        if result is None:
            return 1
        rows.append(result)
    write_report(args.out, {"target": target, "target_dtype": args.dtype,
                            "draft_dtype": str(compute_dtype()).removeprefix("torch."),
                            "prompts": len(prompts),
                            "max_tokens": args.max_tokens, "temperature": args.temperature,
                            "concurrency": args.concurrency, "step_cost": args.step_cost,
                            "rows": rows})
    print(machine_line(target=args.dtype, draft=compute_dtype()))
    print(f"temperature {args.temperature}, {args.concurrency} request(s) at a time")
    print(markdown_table(
        ["method", "tokens/s", "tokens/step", "drafts/step", "step ms", "target fwd ms",
         "sampling ms", "draft model ms", "proposer glue ms", "rest of vLLM ms",
         "draft passes/step", "ms a draft pass"],
        [[r["method"] if r["heads"] is None
          else Path(r["heads"]).name + (f" K={r['k']}" if r.get("k") else ""),
          f"{r['tokens_per_s']:.1f}", f"{r['tokens_per_step']:.2f}",
          f"{r['drafts_per_step']:.2f}", f"{r['step_ms']:.1f}",
          f"{r['target_forward_ms']:.1f}", f"{r['sampling_ms']:.1f}",
          f"{r['draft_model_ms']:.1f}", f"{r['proposer_glue_ms']:.1f}",
          f"{r['rest_of_vllm_ms']:.1f}", f"{r['draft_passes_per_step']:.2f}",
          f"{r['draft_pass_ms']:.2f}"] for r in rows]))
    print("\nThe speculative path, per call (median us; proposer calls a step):")
    names = sorted({name for r in rows for name in r["calls"]})
    print(markdown_table(
        ["method", *names],
        [[r["method"] if r["heads"] is None else Path(r["heads"]).name,
          *(_call_cell(r["calls"].get(name)) for name in names)] for r in rows]))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
