"""`vllm-amphista calibrate`: measure this engine's step cost for the draft-length choice.

Runs the target in vLLM with a drafter that proposes a fixed number of throw-away drafts
(so every step verifies exactly that many tokens per request), for a few batch sizes and
draft counts, and times the draft pass of the heads at the same batch sizes. The fitted
`StepCost` is written where the proposer looks for it: one file per CPU, target and
target dtype under ~/.cache/vllm-amphista/step_cost/, or with --ship into the heads
folder (the calibration that travels with the heads).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch

from vllm_amphista.engine import start_llm
from vllm_amphista.machine import describe
from vllm_amphista.model.checkpoint import load_checkpoint
from vllm_amphista.model.target import TargetWeights
from vllm_amphista.serving.draft_length import (
    StepCost,
    shipped_step_cost_path,
    step_cost_path,
)
from vllm_amphista.serving.step import Proposal, StepDrafter, StepRows

FIXED_DRAFTER_PATH = f"{__name__}.FixedDrafter"


class FixedDrafter(StepDrafter):
    """Proposes `drafts` copies of token 0 for every request that sampled."""

    drafts = 0  # set between runs through LLM.collective_rpc

    def __init__(self, vllm_config) -> None:
        pass

    def propose_from_step(self, step: StepRows) -> Proposal:
        return Proposal([[0] * FixedDrafter.drafts if s else [] for s in step.sampled_token_ids])


def _set_drafts(worker, drafts: int) -> None:
    type(worker.model_runner.drafter).drafts = drafts


def measure_steps(target_dir: Path, dtype: str, batch_sizes: list[int],
                  draft_counts: list[int], tokens: int = 32) -> list[dict]:
    """Median engine step time (ms) per (batch size, drafts per request)."""
    from vllm import SamplingParams  # heavy: only where an engine starts

    llm = start_llm(target_dir, dtype=dtype, max_num_seqs=max(batch_sizes),
                    speculative_config={"method": "custom_class", "model": FIXED_DRAFTER_PATH,
                                        "num_speculative_tokens": max(draft_counts)})
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    prompts = [f"Tell me about topic number {i}." for i in range(max(batch_sizes))]
    llm.generate(prompts[:2], params, use_tqdm=False)  # warm-up
    rows = []
    for requests in batch_sizes:
        for drafts in draft_counts:
            llm.collective_rpc(_set_drafts, args=(drafts,))
            times = []
            for _ in range(3):
                started = time.perf_counter()
                llm.generate(prompts[:requests], params, use_tqdm=False)
                times.append(1e3 * (time.perf_counter() - started) / tokens)
            rows.append({"requests": requests, "tokens": requests * (1 + drafts),
                         "ms": statistics.median(times)})
    return rows


def measure_draft_pass(target_dir: Path, heads: Path, dtype: torch.dtype,
                       batch_sizes: list[int], context: int = 200,
                       repeats: int = 20) -> list[dict]:
    """Median draft-pass time (ms) for a decode step of `requests` requests, each with
    `context` cached positions, the model set up as the proposer sets it up."""
    model = load_checkpoint(heads, target=TargetWeights.from_folder(target_dir), dtype=dtype)
    model.pack_for_drafting()
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
    steps = measure_steps(target_dir, target_dtype, batch_sizes, draft_counts)
    drafts = measure_draft_pass(target_dir, heads, draft_dtype, batch_sizes)
    cost = StepCost.fit(steps, drafts)
    path = (shipped_step_cost_path(heads, target_dtype) if ship
            else step_cost_path(target_dir, target_dtype))
    cost.save(path, machine=describe(), target=Path(target_dir).name,
              target_dtype=target_dtype, draft_dtype=str(draft_dtype).removeprefix("torch."),
              steps=steps, drafts=drafts)
    return cost, path
