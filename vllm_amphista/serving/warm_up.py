"""Warming the matrix products a drafting engine runs, once, when the proposer loads.

oneDNN builds a matmul primitive the first time a weight is multiplied by a new number of
rows, and vLLM's CPU linears (`cpu_linear`, set at load by
vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm, vLLM 0.32.0) and the
draft model's packed ones (kernels/packed_linear.py) pay for it in that step. A plain
engine meets one token count per batch size; a drafting one up to 1 + K of them, so it
pays far more often: in a bench's short runs, and in the step clock's first readings of
drafting steps (serving/draft_length.py), which then price drafting dearer than it is.
So each distinct weight shape runs over every count of `warm_token_counts`, once, at
load. In-process, bf16, AMD EPYC of family 25 (`python -m benchmarks.first_steps`): the
primitives of SmolLM2's 12 shapes cost ~8 ms a token count, and a draft pass of a new
shape took +2.2 ms over its later ones without the warm-up, -0.5 ms with it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from time import perf_counter

import torch
from torch import nn

from vllm_amphista.kernels.packed_linear import PackedLinear

logger = logging.getLogger("vllm.amphista")

# Decoding requests whose drafting steps are warmed: the largest batch size the step
# costs are measured at; above it the step cost has paused drafting on every machine
# measured, and a plain step there runs vanilla's token counts.
WARMED_REQUESTS = 16


def warm_token_counts(max_drafts: int, max_num_seqs: int, max_num_batched_tokens: int
                      ) -> range:
    """Token counts a decode step verifying up to `max_drafts` drafts a request can run
    at up to WARMED_REQUESTS requests (all within the scheduler's limits)."""
    requests = min(WARMED_REQUESTS, max_num_seqs)
    return range(1, min(requests * (1 + max_drafts), max_num_batched_tokens) + 1)


def _vllm_cpu_linears(model: nn.Module) -> dict[tuple, Callable[[torch.Tensor], object]]:
    """One product per distinct (out, in, bias) among vLLM's CPU linears in `model`
    (the weights' primitives are cached per shape, whichever layer made them)."""
    products = {}
    for layer in model.modules():
        if not hasattr(layer, "cpu_linear"):
            continue
        if hasattr(layer, "input_size_per_partition"):  # LinearBase: its weight was freed
            out_features, in_features = (layer.output_size_per_partition,
                                         layer.input_size_per_partition)
        else:  # the vocabulary embedding, used as lm_head
            out_features, in_features = layer.weight.shape
        bias = getattr(layer, "bias", None)
        products.setdefault(
            (out_features, in_features, bias is not None),
            lambda x, layer=layer, bias=bias: layer.cpu_linear(x, layer.weight, bias))
    return products


def _packed_linears(model: nn.Module) -> dict[tuple, Callable[[torch.Tensor], object]]:
    return {(m.out_features, m.in_features, m.bias is not None): m
            for m in model.modules() if isinstance(m, PackedLinear)}


@torch.inference_mode()
def warm_products(target: nn.Module, draft: nn.Module, token_counts: Iterable[int],
                  target_dtype: torch.dtype, draft_dtype: torch.dtype) -> dict[str, int]:
    """Run every distinct weight shape of the target's vLLM CPU linears and the draft
    model's packed linears over zero rows of each count; how many shapes each had."""
    started = perf_counter()
    counts = list(token_counts)
    products = {"target": (_vllm_cpu_linears(target), target_dtype),
                "draft": (_packed_linears(draft), draft_dtype)}
    for shapes, dtype in products.values():
        for (_, in_features, _), product in shapes.items():
            for count in counts:
                product(torch.zeros(count, in_features, dtype=dtype))
    warmed = {name: len(shapes) for name, (shapes, _) in products.items()}
    if not warmed["target"]:
        logger.warning("amphista: the target has no vLLM CPU linears (`cpu_linear`) to "
                       "warm: a drafting step at a new token count pays for its primitives")
    logger.info("amphista: warmed %d target and %d draft weight shapes over %d token counts "
                "in %.1f s", warmed["target"], warmed["draft"], len(counts),
                perf_counter() - started)
    return warmed
