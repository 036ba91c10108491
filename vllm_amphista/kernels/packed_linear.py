"""Linear layers with their weights prepacked (oneDNN, FBGEMM), for drafting on a CPU.

A draft pass multiplies a few rows by ~16M parameters: it is bound by reading weights.
PyTorch's `F.linear` on CPU hands a plain row-major weight to oneDNN (bf16) or BLAS
(fp32) every call; oneDNN's own blocked layout, made once, reads faster. bf16, AMD EPYC
with avx512_bf16, one thread, the SmolLM2 heads, interleaved runs: a draft pass 10.3 ->
6.8 ms at one request, 21.4 -> 17.1 ms at 16. fp32, AMD EPYC with AVX2 only, two
threads: 11.4 -> 8.8 ms at one request, 16.6 -> 13.7 at 4, 28.6 -> 20.3 at 16; the
8192-row vocabulary projection of 4 head rows alone 3.3 -> 0.5 ms. It is what PyTorch's
inductor does for frozen CPU models; here it is done directly, because the draft pass's
shapes change every step. Inference only: packed weights have no gradient.

Where PyTorch has FBGEMM (x86 with AVX2 and up), fp32 weights are stored in fp16 instead,
in FBGEMM's packed format, and multiplied in fp32: half the bytes to read. AMD EPYC with
AVX2 only, 2 threads, the SmolLM2 heads, 25 interleaved passes in one process against a
200-position cache: 8.8 -> 6.3 ms (1 request), 11.8 -> 8.8 (4), 21.8 -> 19.2 (16); the
logits move by ~5e-3, the drafts (argmax) not at all. Drafts are only proposals: the
target verifies every one, so outputs stay the target's.
"""

from __future__ import annotations

import torch
from torch import nn

_OPS = torch.ops.mkldnn


def can_pack(dtype: torch.dtype, device: torch.device) -> bool:
    """fp32 or bf16 on a CPU whose PyTorch has oneDNN and the two packing ops; bf16 also
    needs the instructions oneDNN's bf16 path needs (AVX-512 BW/VL/DQ or AVX-NE-CONVERT:
    on an AVX2-only CPU the reorder raises)."""
    if (dtype not in (torch.float32, torch.bfloat16) or device.type != "cpu"
            or not torch.backends.mkldnn.is_available()
            or not all(hasattr(_OPS, op) for op in ("_reorder_linear_weight",
                                                     "_linear_pointwise",
                                                     "_is_mkldnn_bf16_supported"))):
        return False
    return dtype == torch.float32 or _OPS._is_mkldnn_bf16_supported()


def has_half_weight_gemm() -> bool:
    """Whether this PyTorch has FBGEMM's fp16-weight product for this CPU (AVX2 and up)."""
    return ("fbgemm" in torch.backends.quantized.supported_engines
            and hasattr(torch.ops.quantized, "linear_prepack_fp16"))


class PackedLinear(nn.Module):
    """y = x W^T + b with W in oneDNN's layout (bf16), or FBGEMM's fp16 one for an fp32
    weight where that exists (else oneDNN's fp32); x may have any leading dimensions."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        weight, bias = weight.detach(), None if bias is None else bias.detach()
        # fp32: FBGEMM's packed fp16 copy, a TorchScript object (so not a buffer).
        self.half_weight = (torch.ops.quantized.linear_prepack_fp16(weight, bias)
                            if weight.dtype == torch.float32 and has_half_weight_gemm()
                            else None)
        # What one product reads from memory (benchmarks/draft_pass.py).
        self.weight_bytes = weight.numel() * (2 if self.half_weight is not None
                                              else weight.element_size())
        self.register_buffer("packed_weight", None if self.half_weight is not None
                             else _OPS._reorder_linear_weight(weight))
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if self.half_weight is not None:
            y = torch.ops.quantized.linear_dynamic_fp16(rows, self.half_weight)
        else:
            y = _OPS._linear_pointwise(rows, self.packed_weight, self.bias, "none", [], "")
        return y.reshape(*x.shape[:-1], self.out_features)


def pack_linears(module: nn.Module) -> int:
    """Replace every nn.Linear inside `module` by its PackedLinear; how many were."""
    packed = 0
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, PackedLinear(child.weight, child.bias))
            packed += 1
        else:
            packed += pack_linears(child)
    return packed
