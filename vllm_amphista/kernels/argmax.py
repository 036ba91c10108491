"""argmax over the draft vocabulary, fast on a CPU.

PyTorch's CPU argmax (and max with indices) over a last dimension of a few thousand
floats runs element by element, while amax is vectorised: 4 requests x 4 heads x 8192
fp32 logits, one thread, AMD EPYC with avx512_bf16: argmax 134 us, amax 12 us. So the
vocabulary is cut into blocks: amax per block, argmax over the blocks' maxima, argmax
inside the winning block (56 us; 81 against 441 at 16 requests). The first maximum wins,
as in torch.argmax.
"""

from __future__ import annotations

import torch

BLOCK = 256


def last_dim_argmax(x: torch.Tensor) -> torch.Tensor:
    """x [..., V] -> [...] int64, the index of the (first) maximum along the last dim."""
    vocab = x.shape[-1]
    if x.device.type != "cpu" or vocab % BLOCK or not x.numel():
        return x.argmax(-1)
    rows = x.reshape(-1, vocab)
    blocks = rows.view(len(rows), vocab // BLOCK, BLOCK)
    best = blocks.amax(-1).argmax(-1)
    within = blocks[torch.arange(len(rows), device=x.device), best].argmax(-1)
    return (best * BLOCK + within).view(x.shape[:-1])
