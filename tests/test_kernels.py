"""Triton kernels against their PyTorch references, on CPU under TRITON_INTERPRET=1
(set by tests/conftest.py before anything imports triton); the prepacked CPU linear
against F.linear."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from benchmarks.bench_kernels import main
from tests.conftest import needs_bf16_packing, read_as_int8
from vllm_amphista.kernels import packed_linear
from vllm_amphista.kernels.argmax import BLOCK, last_dim_argmax
from vllm_amphista.kernels.cache_attention import cache_attention, grouped_products_attention
from vllm_amphista.kernels.head_attention import head_attention_reference
from vllm_amphista.kernels.packed_linear import INT8_ROWS, PackedLinear, can_pack, quantize_rows
from vllm_amphista.kernels.rms_norm import rms_norm, uses_fused_kernel
from vllm_amphista.kernels.tree_attention import tree_attention_reference
from vllm_amphista.machine import CpuInfo
from vllm_amphista.reference.tree import build_tree, chain_tree

TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3),
             torch.bfloat16: (2e-2, 2e-2)}


@pytest.fixture(scope="module")
def kernels():
    assert os.environ.get("TRITON_INTERPRET") == "1", "tests/conftest.py sets it on CPU"
    from vllm_amphista.kernels.triton_head_attention import triton_head_attention
    from vllm_amphista.kernels.triton_tree_attention import triton_tree_attention

    return triton_head_attention, triton_tree_attention


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n, heads, k, head_dim", [
    (1, 1, 1, 16), (3, 4, 4, 64), (37, 3, 5, 24), (200, 8, 7, 72), (5, 2, 16, 128),
    (9, 9, 3, 64), (2, 1, 13, 256),
])
def test_head_attention_matches_reference(kernels, dtype, n, heads, k, head_dim):
    g = torch.Generator().manual_seed(n * 1000 + k)
    q, key, v = (torch.randn(n, heads, k, head_dim, generator=g).to(dtype) for _ in range(3))
    got = kernels[0](q, key, v)
    assert got.dtype == dtype and got.shape == q.shape
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(got, head_attention_reference(q, key, v), rtol=rtol, atol=atol)


def test_head_attention_accepts_strided_inputs(kernels):
    """The AEB passes q, k, v as views of one packed projection."""
    qkv = torch.randn(6, 5, 3, 4, 32).permute(2, 0, 3, 1, 4)  # [3, N, H, K, hd] view
    q, key, v = qkv.unbind(0)
    torch.testing.assert_close(kernels[0](q, key, v), head_attention_reference(q, key, v),
                               rtol=1e-5, atol=1e-5)


def test_head_attention_rejects_oversized_inputs(kernels):
    with pytest.raises(ValueError, match="K=17"):
        kernels[0](*(torch.zeros(1, 1, 17, 16) for _ in range(3)))


MEDUSA_LIKE = [(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 0, 1), (0, 1, 0),
               (2, 0), (0, 0, 0, 0)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("paths, prefix, q_heads, kv_heads, head_dim", [
    (MEDUSA_LIKE, 0, 4, 4, 64),
    (MEDUSA_LIKE, 7, 6, 2, 40),
    (MEDUSA_LIKE, 130, 9, 3, 64),
    (chain_tree(4), 65, 2, 1, 24),
    ([(i,) for i in range(10)] + [(i, j) for i in range(5) for j in range(4)], 33, 8, 2, 48),
])
def test_tree_attention_matches_reference(kernels, dtype, paths, prefix, q_heads, kv_heads,
                                          head_dim):
    tree = build_tree(paths, top_k=10)
    g = torch.Generator().manual_seed(prefix + len(paths))
    t = tree.num_nodes
    q = torch.randn(2, q_heads, t, head_dim, generator=g).to(dtype)
    kp, vp = (torch.randn(2, kv_heads, prefix, head_dim, generator=g).to(dtype) for _ in "kv")
    kt, vt = (torch.randn(2, kv_heads, t, head_dim, generator=g).to(dtype) for _ in "kv")
    got = kernels[1](q, kp, vp, kt, vt, tree.mask)
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(got, tree_attention_reference(q, kp, vp, kt, vt, tree.mask),
                               rtol=rtol, atol=atol)


def test_tree_attention_sees_only_ancestors():
    """Changing a node's key/value changes its descendants' outputs only."""
    tree = build_tree(MEDUSA_LIKE, top_k=3)
    t = tree.num_nodes
    q, kt, vt = (torch.randn(1, 2, t, 16) for _ in range(3))
    kp, vp = (torch.randn(1, 2, 5, 16) for _ in range(2))
    base = tree_attention_reference(q, kp, vp, kt, vt, tree.mask)
    changed_node = tree.paths.index((0, 0)) + 1
    vt2 = vt.clone()
    vt2[:, :, changed_node] += 10
    moved = (tree_attention_reference(q, kp, vp, kt, vt2, tree.mask) - base).abs().amax((0, 1, 3))
    descendants = {i + 1 for i, p in enumerate(tree.paths) if p[:2] == (0, 0)}
    assert {i for i in range(t) if moved[i] > 1e-6} == descendants


def test_build_tree_buffers():
    tree = build_tree([(0,), (1,), (0, 0), (0, 1), (0, 0, 0)], top_k=2)
    assert tree.paths == [(0,), (1,), (0, 0), (0, 1), (0, 0, 0)]
    assert tree.depths.tolist() == [0, 1, 1, 2, 2, 3]
    assert tree.candidate_index.tolist() == [0, 1, 2, 3, 4, 5]
    assert tree.retrieve.tolist() == [[0, 2, -1, -1], [0, 1, 4, -1], [0, 1, 3, 5]]
    assert tree.mask[5].tolist() == [True, True, False, True, False, True]
    assert chain_tree(3) == [(0,), (0, 0), (0, 0, 0)]


@pytest.mark.parametrize("paths, message", [
    ([(0,), (0,)], "unique"),
    ([(0, 0)], "no parent"),
    ([(3,)], "candidates in 0..2"),
])
def test_build_tree_rejects_bad_paths(paths, message):
    with pytest.raises(ValueError, match=message):
        build_tree(paths, top_k=3)


def test_gpu_benchmark_script_smoke(tmp_path):
    """benchmarks/bench_kernels.py checks and times on CUDA; --smoke runs it here."""
    import json

    out = tmp_path / "kernels.json"
    assert main(["--smoke", "--repeats", "1", "--dtype", "float32", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert {r["kernel"] for r in report["rows"]} == {"head_attention", "tree_attention"}
    assert all(r["ok"] for r in report["rows"])


@pytest.mark.parametrize("dtype, half_weights", [
    (torch.float32, True), (torch.float32, False),
    pytest.param(torch.bfloat16, False, marks=needs_bf16_packing)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("leading", [(1,), (4,), (3, 5), (2, 1, 7)])
def test_packed_linear_is_f_linear(dtype, half_weights, bias, leading, monkeypatch):
    """fp32 weights are read in fp16 where FBGEMM has that product (then the result is
    x times the fp16-rounded weight, in fp32), else packed as they are."""
    assert can_pack(dtype, torch.device("cpu"))
    assert not can_pack(torch.float16, torch.device("cpu"))
    monkeypatch.setattr(packed_linear, "int8_rows", lambda dtype, device: 0)
    if half_weights:
        assert packed_linear.has_half_weight_gemm()  # x86 with AVX2: every CI machine
    else:
        monkeypatch.setattr(packed_linear, "has_half_weight_gemm", lambda: False)
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 40, generator=g).to(dtype)
    b = torch.randn(96, generator=g).to(dtype) if bias else None
    x = torch.randn(*leading, 40, generator=g).to(dtype)
    linear = PackedLinear(weight, b)
    assert (linear.half_weight is not None) == half_weights
    got = linear(x)
    assert got.shape == (*leading, 96) and got.dtype == dtype
    read = weight.half().float() if half_weights else weight
    torch.testing.assert_close(got, torch.nn.functional.linear(x, read, b))


def test_rows_quantize_to_int8_within_half_a_scale():
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(64, 48, generator=g) * torch.logspace(-3, 2, 64)[:, None]
              ).to(torch.bfloat16)
    weight[5] = 0  # an empty row keeps a usable scale
    rows, scale = quantize_rows(weight)
    assert rows.dtype == torch.int8 and scale.dtype == torch.bfloat16
    assert rows.abs().amax(1)[:5].eq(127).all() and not rows[5].any()
    error = (rows.float() * scale.float()[:, None] - weight.float()).abs()
    assert (error <= 0.5 * scale.float()[:, None] * 1.01).all()


@needs_bf16_packing
@pytest.mark.parametrize("bias", [True, False])
def test_a_few_rows_read_int8_weights_and_more_rows_bf16_ones(bias, monkeypatch):
    """Up to `int8_rows` rows are x times the int8 weight (dequantized), more rows x
    times the bf16 weight. One weight in each row is 100 times the others, so the int8
    steps are coarse and the two products far apart."""
    monkeypatch.setattr(packed_linear, "int8_rows", lambda dtype, device: 4)
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 48, generator=g)
    weight[:, 7] = 100.0
    weight = weight.to(torch.bfloat16)
    b = torch.randn(96, generator=g).to(torch.bfloat16) if bias else None
    linear = PackedLinear(weight, b)
    # PyTorch's int8 product needs whole blocks of 16 inputs: other weights stay bf16.
    assert PackedLinear(weight[:, :40], b).int8_rows == 0
    read_int8 = read_as_int8(weight)
    assert (read_int8 - weight).abs().max() > 0.1
    for leading, read in [((1,), read_int8), ((2, 2), read_int8), ((5,), weight),
                          ((3, 2), weight)]:
        x = torch.randn(*leading, 48, generator=g).to(torch.bfloat16)
        x[..., 7] = 0  # the large column adds nothing: what is left shows the steps
        got = linear(x)
        assert got.shape == (*leading, 96) and got.dtype == torch.bfloat16
        torch.testing.assert_close(got, F.linear(x, read, b), rtol=2e-2, atol=2e-2)
        assert linear.bytes_read(x.numel() // 48) == (
            96 * 48 + 96 * 2 if read is read_int8 else 96 * 48 * 2)


def test_int8_weights_only_where_measured_to_pay():
    """bf16 on a CPU with AVX-512 BF16 and no AMX; never fp32, AMX or emulated bf16."""
    cpu = torch.device("cpu")

    def machine(*flags):
        return CpuInfo("a CPU", frozenset(("avx2", *flags)))

    assert packed_linear.int8_rows(torch.bfloat16, cpu, machine("avx512_bf16")) == INT8_ROWS
    assert packed_linear.int8_rows(torch.float32, cpu, machine("avx512_bf16")) == 0
    assert packed_linear.int8_rows(torch.bfloat16, cpu,
                                   machine("avx512_bf16", "amx_bf16")) == 0
    assert packed_linear.int8_rows(torch.bfloat16, cpu, machine()) == 0


@pytest.mark.parametrize("shape", [(1, 4, 8192), (3, 2, 8 * BLOCK), (5, 1000)])
def test_last_dim_argmax_is_torch_argmax_ties_included(shape):
    """Blocked where the vocabulary splits into blocks, plain argmax elsewhere; either way
    torch.argmax's answer, the first maximum among ties (across and inside blocks)."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    x[0, ..., [7, BLOCK + 3, 2 * BLOCK + 1]] = 100.0  # first of three, in three blocks
    x[-1, ..., [2 * BLOCK + 5, 2 * BLOCK + 9]] = 50.0  # first of two, in one block
    assert torch.equal(last_dim_argmax(x), x.argmax(-1))


@pytest.mark.parametrize("requests, rows, cached", [(1, 1, 9), (4, 3, 201), (16, 2, 40)])
def test_cache_attention_is_pytorch_attention(requests, rows, cached):
    """The SAL cache's attention as grouped products equals PyTorch's kernel, for query
    heads sharing key heads and a mask that hides each row's later keys."""
    q = torch.randn(requests, 9, rows, 64)
    keys, values = torch.randn(2, requests, 3, cached, 64).unbind()
    past = torch.randint(0, cached - rows + 1, (requests,))
    positions = past[:, None] + torch.arange(rows)
    mask = (torch.arange(cached) <= positions[..., None])[:, None]
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, keys, values, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(grouped_products_attention(q, keys, values, mask), expected)
    torch.testing.assert_close(cache_attention(q, keys, values, mask), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 576), (2, 3, 576), (5, 64)])
def test_rms_norm_kernel_is_the_pytorch_formula(dtype, shape):
    """vLLM's fused kernel (loaded by importing its op library) computes what the
    PyTorch path does: bf16 bit for bit (one rounding, after the weight), fp32 up to the
    order of the sums; with a gradient to track, the PyTorch path runs."""
    import vllm._custom_ops  # noqa: F401  (what every engine process has loaded)

    torch.manual_seed(0)
    x = (torch.randn(*shape) * 3).to(dtype)
    weight = (torch.randn(shape[-1]) * 0.5 + 1).to(dtype).requires_grad_()
    x32 = x.float()
    expected = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)
                * weight.detach().float()).to(dtype)
    with torch.no_grad():
        assert uses_fused_kernel(x, weight)
        fused = rms_norm(x, weight, 1e-5)
    if dtype == torch.bfloat16:
        assert torch.equal(fused, expected)
    else:
        torch.testing.assert_close(fused, expected, rtol=1e-6, atol=1e-6)
    assert not uses_fused_kernel(x, weight)
    tracked = rms_norm(x, weight, 1e-5)
    assert tracked.requires_grad
    torch.testing.assert_close(tracked.detach(), expected, rtol=1e-6, atol=1e-6)
