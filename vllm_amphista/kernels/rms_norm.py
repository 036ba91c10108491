"""RMSNorm, with vLLM's fused CPU kernel where the draft model runs without gradients.

Written as PyTorch operations a norm is ~8 calls (cast, square, mean, add, rsqrt, two
products, cast back): ~20 us a norm at one or two rows of 576, bf16 (AMD EPYC of family
25), where vLLM's own kernel (`torch.ops._C.rms_norm`, the one vLLM's CPU build runs its
models' norms with) takes ~4. A two-head draft pass has five norms; with the kernel it
took 0.10-0.17 ms less at 1 to 16 requests, weights read from memory (docs/results.md,
"The draft pass's norms in one kernel"). Both paths round once, after the weight: the
kernel's bf16 output equals `(x32 * rsqrt(mean(x32^2) + eps) * w32).to(bf16)` bit for
bit (fp32 differs by the order of its sums, ~1e-6).
"""

from __future__ import annotations

import sys

import torch


def fused_kernel_loaded() -> bool:
    """vLLM's CPU kernels are registered: vLLM has loaded its op library in this process,
    as every engine does. Not imported here: a process without vLLM (training, the
    reference decoder) keeps PyTorch's operations, with the same rounding."""
    return "vllm._custom_ops" in sys.modules and hasattr(torch.ops._C, "rms_norm")


def uses_fused_kernel(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The fused kernel: CPU tensors of one dtype, no gradient to track."""
    return (x.device.type == "cpu" and x.dtype == weight.dtype
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and fused_kernel_loaded())


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., d] scaled to unit root mean square over d (in fp32), times weight [d]."""
    if uses_fused_kernel(x, weight):
        x = x.contiguous()
        out = torch.empty_like(x)
        torch.ops._C.rms_norm(out, x, weight, eps)
        return out
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
            * weight.float()).to(x.dtype)
