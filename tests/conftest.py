"""Shared fixtures: a tiny random Llama target (built in seconds) and small draft models."""

from __future__ import annotations

import os

# Triton kernels run on CPU through Triton's interpreter in tests. It must be on before
# anything imports triton (triton.language's own helpers are built at import time).
# Engine subprocesses drop it again (tests/engine_helpers.py).
os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path

import pytest
import torch

from vllm_amphista.engine import EAGER_ENV
from vllm_amphista.kernels.packed_linear import can_pack, quantize_rows
from vllm_amphista.model.config import AmphistaConfig
from vllm_amphista.model.draft_model import AmphistaDraftModel
from vllm_amphista.model.target import TargetWeights, build_tiny_target

# Our commands' engines (the demo, the bench's servers, recording) run the target eagerly
# here: compiling it takes 15-60 s a start. The compiled default has its own test
# (test_engine_amphista.py, test_a_compiled_target_is_lossless).
os.environ.setdefault(EAGER_ENV, "1")

# `make test` runs two pytest workers (pytest -n 2), one per core. vLLM's "auto" thread
# binding puts every engine on core 0, so each worker's engines get a core of their own,
# and its in-process torch one thread. That binding reaches only the worker processes
# vLLM spawns: an engine in the test's own process (VLLM_ENABLE_V1_MULTIPROCESSING=0)
# keeps OpenMP's default, one thread per core, and two such engines spinning in OpenMP
# barriers on two cores ran 3-7x slower each than alone. So every subprocess a test
# starts runs one OpenMP thread.
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # "gw0", "gw1", ...
if XDIST_WORKER:
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND",
                          str(int(XDIST_WORKER.removeprefix("gw")) % (os.cpu_count() or 1)))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)

# Prepacked bf16 weights exist only where oneDNN computes bf16 (not on AVX2-only CPUs,
# where test_proposer checks that drafting goes on without them).
needs_bf16_packing = pytest.mark.skipif(
    not can_pack(torch.bfloat16, torch.device("cpu")),
    reason="this CPU lacks the instructions oneDNN's bf16 weight packing needs")


@pytest.fixture(scope="session")
def tiny_target_dir(tmp_path_factory) -> Path:
    return build_tiny_target(tmp_path_factory.mktemp("targets") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_target(tiny_target_dir) -> TargetWeights:
    return TargetWeights.from_folder(tiny_target_dir)


def draft_model(target: TargetWeights, *, randomised: bool = False, seed: int = 0,
                **overrides) -> AmphistaDraftModel:
    """The tests' one draft-model factory, shaped for `target` (4 attention heads, 2 KV
    heads unless overridden). Fresh: the initialisation training starts from (every head
    predicts the target's own next token). randomised=True: every weight random, so that
    every path through the architecture visibly matters."""
    torch.manual_seed(seed)
    fields = dict(hidden_size=target.hidden_size, vocab_size=target.vocab_size,
                  num_attention_heads=4, num_key_value_heads=2, target_name=target.name,
                  target_fingerprint=target.fingerprint)
    fields.update(overrides)
    model = AmphistaDraftModel(AmphistaConfig(**fields))
    if randomised:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.uniform_(0.5, 1.5)
                else:
                    p.normal_(0.0, 0.3 if p.dim() > 1 else 0.1)
    model.attach_target(target)
    return model.eval() if randomised else model


def read_as_int8(weight: torch.Tensor) -> torch.Tensor:
    """The weight a product reading int8 weights multiplies by: each row's int8 copy
    times its scale, in the weight's dtype."""
    rows, scale = quantize_rows(weight)
    return (rows.float() * scale.float()[:, None]).to(weight.dtype)


def pytest_configure(config) -> None:
    # Quiet, deterministic CPU runs; under xdist each worker keeps its one thread (above).
    if not XDIST_WORKER:
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


# How heavy a test is, for ordering: end-to-end checks, then tests that start engines.
def _weight(item: pytest.Item) -> int:
    return 0 if item.get_closest_marker("slow") else 1 if item.get_closest_marker(
        "engine") else 2


def pytest_collection_modifyitems(config, items: list[pytest.Item]) -> None:
    """Under xdist, heaviest first in every worker's share. `--dist worksteal` hands each
    of n workers a contiguous 1/n of this list and lets an idle one steal the end of
    another's queue, so dealing the tests out round-robin, heaviest first, starts every
    worker on its share of the long ones and leaves short ones to steal at the end."""
    workers = getattr(config, "workerinput", {}).get("workercount", 0)
    if workers < 2:
        return
    ranked = sorted(items, key=_weight)  # stable: file order within a weight
    items[:] = [item for w in range(workers) for item in ranked[w::workers]]
