"""`vllm-amphista calibrate`: measure this engine's step cost for the draft-length choice.

Runs the target in vLLM as `vllm serve` runs it (engine core and worker in processes of
their own, the worker's threads bound by vLLM) with a drafter that proposes a fixed number
of throw-away drafts (so every step verifies exactly that many tokens per request), for a
few batch sizes and draft counts, and times the draft pass of the heads at the same batch
sizes inside that worker, with its threads. The fitted `StepCost` is written where the
proposer looks for it: one file per CPU, target, target dtype, thread count and OpenMP,
for a compiled target (vLLM's default) or an eager one (VLLM_AMPHISTA_ENFORCE_EAGER=1), under
~/.cache/vllm-amphista/step_cost/, or with --ship into the heads folder (the calibration
that travels with the heads).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch

from vllm_amphista.engine import start_llm
from vllm_amphista.machine import describe, openmp_runtime
from vllm_amphista.model.checkpoint import load_checkpoint
from vllm_amphista.model.draft_model import AmphistaDraftModel
from vllm_amphista.model.target import TargetWeights
from vllm_amphista.serving.draft_length import (
    StepCost,
    compiled_target,
    shipped_step_cost_path,
    step_cost_path,
)
from vllm_amphista.serving.step import Proposal, StepDrafter, StepRows

FIXED_DRAFTER_PATH = f"{__name__}.FixedDrafter"
CALIBRATION_WORKER_PATH = f"{__name__}.CalibrationWorker"


class FixedDrafter(StepDrafter):
    """Proposes `drafts` copies of token 0 for every request that sampled."""

    drafts = 0  # set between runs by CalibrationWorker.set_drafts

    def __init__(self, vllm_config) -> None:
        pass

    def propose_from_step(self, step: StepRows) -> Proposal:
        return Proposal([[0] * FixedDrafter.drafts if s else [] for s in step.sampled_token_ids])


class CalibrationWorker:
    """Mixed into vLLM's worker (engine arg worker_extension_cls); its methods are called
    by name through LLM.collective_rpc, which runs them in the worker process, with the
    threads vLLM bound there."""

    def set_drafts(self, drafts: int) -> None:
        type(self.model_runner.drafter).drafts = drafts

    def torch_threads(self) -> int:
        return torch.get_num_threads()

    def openmp_runtime(self) -> str:
        return openmp_runtime()

    def measure_draft_pass(self, target_dir: str, heads: str, dtype: str,
                           batch_sizes: list[int]) -> list[dict]:
        # Plain values only: vLLM's RPC serialises no Path or torch.dtype.
        return measure_draft_pass(Path(target_dir), Path(heads), getattr(torch, dtype),
                                  batch_sizes, each_head_count=True)


def generate_ms(llm, requests: int, tokens: int = 32) -> float:
    """ms per engine step for `requests` prompts decoding `tokens` greedy tokens at once."""
    from vllm import SamplingParams  # heavy: only where an engine starts

    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    prompts = [f"Tell me about topic number {i}." for i in range(requests)]
    started = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    return 1e3 * (time.perf_counter() - started) / tokens


def measure_steps(llm, batch_sizes: list[int], draft_counts: list[int],
                  tokens: int = 32, repeats: int = 5) -> list[dict]:
    """Median engine step time (ms) per (batch size, drafts per request). The draft counts
    take turns within each repeat, so a drift in the machine's speed (a neighbour, the
    clock) moves them alike instead of tilting the fitted per-token cost: measured one
    after the other, one token per request once came out slower than three."""
    generate_ms(llm, 2, tokens)  # warm-up
    rows = []
    for requests in batch_sizes:
        times: dict[int, list[float]] = {drafts: [] for drafts in draft_counts}
        for _ in range(repeats):
            for drafts in draft_counts:
                llm.collective_rpc("set_drafts", args=(drafts,))
                times[drafts].append(generate_ms(llm, requests, tokens))
        rows += [{"requests": requests, "tokens": requests * (1 + drafts),
                  "ms": statistics.median(times[drafts])} for drafts in draft_counts]
    return rows


def measure_draft_pass(target_dir: Path, heads: Path, dtype: torch.dtype,
                       batch_sizes: list[int], each_head_count: bool = False,
                       context: int = 200, repeats: int = 20) -> list[dict]:
    """Median draft-pass time (ms) for a decode step of `requests` requests, each with
    `context` cached positions, the model set up as the proposer sets it up: of all heads
    ({"requests", "ms"} per batch size), or with each_head_count of the first 1..K heads
    drafted (`draft_leading_heads`; {"requests", "heads", "ms"})."""
    model = load_checkpoint(heads, target=TargetWeights.from_folder(target_dir), dtype=dtype)
    model.pack_for_drafting()
    if not each_head_count:
        return _draft_pass_ms(model, dtype, batch_sizes, context, repeats)
    rows = []
    for count in range(1, model.config.num_heads + 1):
        model.draft_leading_heads(count)
        rows += [{**row, "heads": count}
                 for row in _draft_pass_ms(model, dtype, batch_sizes, context, repeats)]
    return rows


def _draft_pass_ms(model: AmphistaDraftModel, dtype: torch.dtype, batch_sizes: list[int],
                   context: int, repeats: int) -> list[dict]:
    d = model.config.hidden_size
    rows = []
    for requests in batch_sizes:
        cache = model.new_cache()
        model.extend(cache, torch.randn(requests * context, d).to(dtype),
                     torch.zeros(requests * context, dtype=torch.long),
                     np.full(requests, context))
        hidden, tokens = torch.randn(requests, d).to(dtype), torch.zeros(requests, dtype=torch.long)
        times = []
        for _ in range(repeats + 2):
            started = time.perf_counter()
            model.extend(cache, hidden, tokens, np.ones(requests, np.int64))
            times.append(1e3 * (time.perf_counter() - started))
            cache.lengths[:requests] -= 1  # the same context every time
        rows.append({"requests": requests, "ms": statistics.median(times[2:])})
    return rows


def calibrate(target_dir: Path, heads: Path, target_dtype: str, draft_dtype: torch.dtype,
              batch_sizes: list[int], draft_counts: list[int],
              ship: bool = False) -> tuple[StepCost, Path]:
    """Measure, fit and save for this machine; ship=True saves into the heads folder
    instead, as the calibration machines without their own start from."""
    dtype_name = str(draft_dtype).removeprefix("torch.")
    llm = start_llm(target_dir, dtype=target_dtype, max_num_seqs=max(batch_sizes),
                    as_served=True, worker_extension_cls=CALIBRATION_WORKER_PATH,
                    speculative_config={"method": "custom_class", "model": FIXED_DRAFTER_PATH,
                                        "num_speculative_tokens": max(draft_counts)})
    compiled = compiled_target(llm.llm_engine.vllm_config)
    steps = measure_steps(llm, batch_sizes, draft_counts)
    drafts = llm.collective_rpc("measure_draft_pass",
                                args=(str(target_dir), str(heads), dtype_name,
                                      batch_sizes))[0]
    threads = llm.collective_rpc("torch_threads")[0]
    openmp = llm.collective_rpc("openmp_runtime")[0]
    del llm
    all_heads = max(row["heads"] for row in drafts)
    cost = StepCost.fit(steps, [row for row in drafts if row["heads"] == all_heads])
    shares = {count: [row["ms"] / cost.draft_ms(row["requests"]) for row in drafts
                      if row["heads"] == count]
              for count in range(1, all_heads + 1)}
    path = (shipped_step_cost_path(heads, target_dtype, compiled=compiled) if ship
            else step_cost_path(target_dir, target_dtype, threads, openmp, compiled))
    cost.save(path, machine={**describe(), "torch_threads": threads, "openmp": openmp},
              target=Path(target_dir).name, compiled=compiled,
              target_dtype=target_dtype, draft_dtype=dtype_name,
              draft_share_by_heads=shares, steps=steps, drafts=drafts)
    return cost, path
