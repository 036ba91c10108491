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

A bf16 product of a few rows (`INT8_ROWS`) reads an int8 copy of its weight instead (one
scale per output row; PyTorch's `_weight_int8pack_mm`): half the bytes, where a served
draft pass reads every weight from memory. The int8 product converts every weight for
every row, so beyond a few rows the bf16 one is faster and is kept for them (the
vocabulary projection after a 64 MB read: one row 0.74 -> 0.46 ms, four 0.61 either way,
16 0.88 -> 1.63). The shipped heads' pass, two heads drafted, AMD EPYC of family 25
(avx512_bf16, no AMX), 2 threads, interleaved passes after a 64 MB write: 2.97 -> 2.34 ms
at one request, 2.89 -> 2.62 at two, 2.89 -> 2.81 at four. Their tau in the reference
decoder (bf16 target, 24 MT-Bench questions, 128 tokens): 1.6486 -> 1.6483 drafting two
heads, 1.7821 -> 1.7800 drafting four (docs/results.md).
"""

from __future__ import annotations

import torch
from torch import nn

from vllm_amphista.machine import CpuInfo, cpu_info

_OPS = torch.ops.mkldnn
# The most rows a bf16 product reads int8 weights for (where `int8_rows` allows): at four
# rows the vocabulary projection costs the same either way, above it the bf16 one wins.
INT8_ROWS = 4
# PyTorch's int8 product (2.13, AVX-512) reads the inner dimension in blocks of 16 and
# has no tail: with 40 inputs it returned wrong values or crashed the process.
INT8_BLOCK = 16


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


def int8_rows(dtype: torch.dtype, device: torch.device, cpu: CpuInfo | None = None) -> int:
    """The most rows a product in `dtype` reads int8 weights for: INT8_ROWS for bf16 on a
    CPU computing it in AVX-512 BF16 (measured on a family-25 EPYC), 0 elsewhere: AMX's
    bf16 products are faster and unmeasured against it, an AVX2 CPU drafts in fp32 from
    fp16 weights."""
    if (dtype != torch.bfloat16 or device.type != "cpu"
            or not hasattr(torch.ops.aten, "_weight_int8pack_mm")):
        return 0
    return INT8_ROWS if (cpu or cpu_info()).bf16_kind == "native-bf16" else 0


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> int8 [N, K] and one scale a row [N] in weight's dtype, symmetric:
    row n reads int8[n] * scale[n], each entry within about half a scale of weight's."""
    scale = (weight.float().abs().amax(1) / 127).clamp(min=1e-30).to(weight.dtype)
    rows = torch.round(weight.float() / scale.float()[:, None]).clamp(-127, 127)
    return rows.to(torch.int8), scale


class PackedLinear(nn.Module):
    """y = x W^T + b with W in oneDNN's layout (bf16), or FBGEMM's fp16 one for an fp32
    weight where that exists (else oneDNN's fp32), or as int8 for a few bf16 rows where
    that pays (`int8_rows`); x may have any leading dimensions."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        weight, bias = weight.detach(), None if bias is None else bias.detach()
        # fp32: FBGEMM's packed fp16 copy, a TorchScript object (so not a buffer).
        self.half_weight = (torch.ops.quantized.linear_prepack_fp16(weight, bias)
                            if weight.dtype == torch.float32 and has_half_weight_gemm()
                            else None)
        self._packed_bytes = weight.numel() * (2 if self.half_weight is not None
                                               else weight.element_size())
        self.register_buffer("packed_weight", None if self.half_weight is not None
                             else _OPS._reorder_linear_weight(weight))
        self.register_buffer("bias", bias)
        # Products of up to int8_rows rows read these instead (0: never).
        self.int8_rows = (int8_rows(weight.dtype, weight.device)
                          if self.in_features % INT8_BLOCK == 0 else 0)
        int8_weight, int8_scale = quantize_rows(weight) if self.int8_rows else (None, None)
        self.register_buffer("int8_weight", int8_weight)
        self.register_buffer("int8_scale", int8_scale)

    def reads_int8(self, rows: int) -> bool:
        return self.int8_weight is not None and rows <= self.int8_rows

    def bytes_read(self, rows: int) -> int:
        """What one product of `rows` rows reads of its weight (benchmarks/draft_pass.py)."""
        if self.reads_int8(rows):
            return self.int8_weight.nbytes + self.int8_scale.nbytes
        return self._packed_bytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if self.reads_int8(rows.shape[0]):
            y = torch.ops.aten._weight_int8pack_mm(rows.contiguous(), self.int8_weight,
                                                   self.int8_scale)
            if self.bias is not None:
                y = y.add_(self.bias)
        elif self.half_weight is not None:
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
