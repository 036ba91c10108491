"""Properties of the draft model itself, on a tiny random target."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from benchmarks.draft_pass import flush_mb, measure
from tests.conftest import draft_model, needs_bf16_packing, read_as_int8
from vllm_amphista.kernels import packed_linear
from vllm_amphista.kernels.packed_linear import PackedLinear, has_half_weight_gemm
from vllm_amphista.machine import CpuInfo, compute_dtype
from vllm_amphista.model import layers
from vllm_amphista.model.config import AmphistaConfig
from vllm_amphista.model.draft_model import AmphistaDraftModel
from vllm_amphista.model.layers import attention_dtype
from vllm_amphista.model.sal_cache import SALCache

# Every Amphista switch off: Medusa-1 heads.
MEDUSA_SWITCHES = dict(use_aeb=False, num_stages=0, use_token_fusion=False)


def _inputs(target, b: int = 2, t: int = 9, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, target.hidden_size, generator=g)
    tokens = torch.randint(0, target.vocab_size, (b, t), generator=g)
    return hidden, tokens


def test_forward_shape_and_head_stages(tiny_target):
    model = draft_model(tiny_target, num_heads=5, num_stages=2, randomised=True)
    hidden, tokens = _inputs(tiny_target)
    assert model(hidden, tokens).shape == (2, 9, 5, tiny_target.vocab_size)
    assert [model.config.stage_of_head(k) for k in range(5)] == [0, 0, 0, 1, 1]
    assert [AmphistaConfig(64, 512).stage_of_head(k) for k in range(4)] == [0, 0, 1, 1]


def test_aeb_lets_every_head_see_every_other(tiny_target):
    """With the AEB, perturbing head K's block changes head 1's logits; without it, not.
    Through the public forward only: the perturbation is a bias on the last head's block."""
    for use_aeb in (True, False):
        model = draft_model(tiny_target, use_aeb=use_aeb, num_stages=2, num_heads=4,
                            randomised=True)
        hidden, tokens = _inputs(tiny_target)
        with torch.no_grad():
            base = model(hidden, tokens)
            model.heads[-1][0].linear.bias.add_(3.0)
            changed = model(hidden, tokens)
        head1_diff = (changed[..., 0, :] - base[..., 0, :]).abs().max().item()
        head4_diff = (changed[..., -1, :] - base[..., -1, :]).abs().max().item()
        assert head4_diff > 1e-3
        if use_aeb:
            assert head1_diff > 1e-3
        else:
            assert head1_diff == 0.0


def test_sal_is_causal(tiny_target):
    model = draft_model(tiny_target, randomised=True)
    hidden, tokens = _inputs(tiny_target, b=1, t=10)
    base = model(hidden, tokens)
    hidden2, tokens2 = hidden.clone(), tokens.clone()
    hidden2[:, 6:] += torch.randn_like(hidden2[:, 6:])
    tokens2[:, 6:] = (tokens2[:, 6:] + 1) % tiny_target.vocab_size
    other = model(hidden2, tokens2)
    torch.testing.assert_close(other[:, :6], base[:, :6])
    assert (other[:, 6:] - base[:, 6:]).abs().max() > 1e-3


def test_token_fusion_reads_the_sampled_token(tiny_target):
    model = draft_model(tiny_target, num_stages=0, use_aeb=False, randomised=True)
    hidden, tokens = _inputs(tiny_target, b=1, t=4)
    other_tokens = (tokens + 7) % tiny_target.vocab_size
    assert (model(hidden, tokens) - model(hidden, other_tokens)).abs().max() > 1e-3
    plain = draft_model(tiny_target, num_stages=0, use_aeb=False, use_token_fusion=False,
                        randomised=True)
    torch.testing.assert_close(plain(hidden, tokens), plain(hidden, other_tokens), rtol=0, atol=0)


@pytest.mark.parametrize("overrides", [
    {},
    {"num_stages": 1, "num_heads": 3},
    {"use_aeb": False},
    {"num_stages": 0},
    {"num_heads": 6, "num_stages": 3, "num_aeb_layers": 2},
    {"draft_vocab_size": 100},
])
def test_incremental_matches_full_forward(tiny_target, overrides):
    """Feeding positions in uneven chunks through the SAL cache (batched, with padding)
    gives the same last-position logits as the teacher-forced forward. Sequences join
    and skip steps, as requests do in a serving batch; a step without logits (the
    proposer's tracking) leaves the cache as one with them does."""
    model = draft_model(tiny_target, **overrides, randomised=True)
    seqs = [_inputs(tiny_target, b=1, t=t, seed=t) for t in (11, 7, 13, 5)]
    # Rows consumed per step per sequence; 0 = not in that step's batch.
    chunks = [[4, 1, 3, 3], [1, 2, 1, 3], [0, 6, 5, 2], [0, 0, 0, 5]]
    cache = SALCache(model.config, slots=1, capacity=4)  # grows during the test
    done = [0] * len(seqs)
    for step in range(4):
        counts = [chunks[i][step] for i in range(len(seqs))]
        hs = torch.cat([h[0, d: d + n] for (h, _), d, n in zip(seqs, done, counts, strict=True)])
        xs = torch.cat([x[0, d: d + n] for (_, x), d, n in zip(seqs, done, counts, strict=True)])
        tracking = step == 1
        got = model.extend(cache, hs, xs, counts, logits=not tracking)
        assert (got is None) == tracking
        for i, n in enumerate(counts):
            done[i] += n
            if n == 0 or tracking:
                continue
            hidden, tokens = seqs[i]
            want = model(hidden[:, : done[i]], tokens[:, : done[i]])[0, -1]
            torch.testing.assert_close(got[i], want, rtol=1e-4, atol=1e-4)
        if model.config.num_stages:
            assert cache.lengths[: len(seqs)].tolist() == done


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
@pytest.mark.parametrize("heads", [1, 2, 3])
def test_drafting_leading_heads_is_the_model_cut_to_them(tiny_target, heads, packed):
    """draft_leading_heads(k): forward and extend give what a model of only those k heads
    (the SAL stages they read, their blocks, the AEB over k positions) gives, with the
    same weights; the cache holds only those stages. K=4 over 2 stages: heads 0,0,1,1."""
    whole = draft_model(tiny_target, num_heads=4, num_stages=2, draft_vocab_size=100,
                        randomised=True)
    stages = whole.config.stage_of_head(heads - 1) + 1
    cut = draft_model(tiny_target, num_heads=heads, num_stages=stages, draft_vocab_size=100)
    weights = {name: value for name, value in whole.state_dict().items()
               if not name.startswith(("heads.", "stages."))
               or int(name.split(".")[1]) < (heads if name.startswith("heads.") else stages)}
    weights["aeb.position_embedding"] = weights["aeb.position_embedding"][:heads]
    cut.load_state_dict(weights)
    cut.eval()
    whole.draft_leading_heads(heads)
    hidden, tokens = _inputs(tiny_target, b=1, t=12)
    torch.testing.assert_close(whole(hidden, tokens), cut(hidden, tokens))
    if packed:
        assert whole.pack_for_drafting() and cut.pack_for_drafting()
    caches = [model.new_cache() for model in (whole, cut)]
    assert caches[0].keys.shape[0] == stages
    for rows in (slice(0, 7), slice(7, 8), slice(8, 12)):
        got, want = (model.extend(cache, hidden[0, rows], tokens[0, rows],
                                  [rows.stop - rows.start])
                     for model, cache in zip((whole, cut), caches, strict=True))
        assert got.shape == (1, heads, 100)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_extend_without_new_rows_is_refused(tiny_target):
    model = draft_model(tiny_target)
    with pytest.raises(ValueError, match="at least one new row"):
        model.extend(model.new_cache(), torch.zeros(0, tiny_target.hidden_size),
                     torch.zeros(0, dtype=torch.long), [0, 0])


AMX = CpuInfo("Intel Xeon", frozenset({"avx512_bf16", "amx_bf16"}))
AVX512_BF16 = CpuInfo("AMD EPYC", frozenset({"avx512_bf16"}))
AVX2 = CpuInfo("AMD EPYC", frozenset({"avx2"}))


@pytest.mark.parametrize("cpu, dtype, device, want", [
    (AVX512_BF16, torch.bfloat16, "cpu", torch.float32),
    (AVX2, torch.bfloat16, "cpu", torch.float32),
    (AMX, torch.bfloat16, "cpu", torch.bfloat16),
    (AMX, torch.float32, "cpu", torch.float32),
    (AVX2, torch.float32, "cpu", torch.float32),
    (AVX2, torch.bfloat16, "cuda", torch.bfloat16),
])
def test_drafting_attends_in_bf16_only_where_that_is_fast(cpu, dtype, device, want):
    assert attention_dtype(dtype, device, cpu) == want


def test_bf16_drafting_on_a_cpu_without_amx_keeps_its_cache_in_fp32_with_the_same_logits(
        tiny_target, monkeypatch):
    """A bf16 draft model on a CPU without AMX attends in fp32 (`attention_dtype`), so its
    cache is fp32: the same logits, to the bit, as a bf16 cache cast at every pass, chunk
    after chunk (the keys and values are rounded to bf16 either way)."""
    monkeypatch.setattr(layers, "cpu_info", lambda: AVX512_BF16)
    model = draft_model(tiny_target, randomised=True).to(torch.bfloat16)
    fp32_cache = model.new_cache()
    assert fp32_cache.keys.dtype == fp32_cache.values.dtype == torch.float32
    bf16_cache = SALCache(model.config, torch.bfloat16)
    hidden, tokens = _inputs(tiny_target, b=1, t=12)
    hidden = hidden[0].to(torch.bfloat16)
    for rows in (slice(0, 7), slice(7, 8), slice(8, 12)):
        want, got = (model.extend(cache, hidden[rows], tokens[0, rows],
                                  [rows.stop - rows.start]) for cache in (bf16_cache, fp32_cache))
        assert torch.equal(got, want)
    torch.testing.assert_close(fp32_cache.keys.bfloat16().float(), fp32_cache.keys,
                               rtol=0, atol=0)


def test_bf16_drafting_with_amx_attends_in_bf16_as_the_forward_does(tiny_target, monkeypatch):
    """With AMX the cache and the attention against it stay bf16, as the teacher-forced
    forward's attention is: chunk after chunk, the last position's logits match it."""
    monkeypatch.setattr(layers, "cpu_info", lambda: AMX)
    model = draft_model(tiny_target, randomised=True).to(torch.bfloat16)
    cache = model.new_cache()
    assert cache.keys.dtype == cache.values.dtype == torch.bfloat16
    hidden, tokens = _inputs(tiny_target, b=1, t=12)
    hidden = hidden.to(torch.bfloat16)
    for rows in (slice(0, 7), slice(7, 8), slice(8, 12)):
        got = model.extend(cache, hidden[0, rows], tokens[0, rows], [rows.stop - rows.start])
        want = model(hidden[:, : rows.stop], tokens[:, : rows.stop])[0, -1]
        torch.testing.assert_close(got[0].float(), want.float(), rtol=0.02, atol=0.02)


def test_sal_cache_growth_keeps_contents_and_moves_swap(tiny_target):
    model = draft_model(tiny_target, randomised=True)
    cache = SALCache(model.config, slots=2, capacity=4)
    cache.keys.normal_()
    cache.lengths[:] = [3, 4]
    before = cache.keys.clone()
    cache.reserve(3, 9)
    assert (cache.slots, cache.capacity) == (4, 9)  # slots doubled, capacity as asked
    torch.testing.assert_close(cache.keys[:, :2, :, :4], before)
    assert cache.keys[:, 2:].abs().sum() == 0 and cache.lengths.tolist() == [3, 4, 0, 0]
    cache.move([0, 1], [1, 0])  # vLLM swapped two requests
    torch.testing.assert_close(cache.keys[:, 0, :, :4], before[:, 1])
    torch.testing.assert_close(cache.values[:, 1, :, :4], torch.zeros_like(before[:, 0]))
    assert cache.lengths.tolist() == [4, 3, 0, 0]


def test_drafts_map_draft_vocabulary_to_target_ids(tiny_target):
    model = draft_model(tiny_target, draft_vocab_size=50, randomised=True)
    with torch.no_grad():
        model.draft_to_target.copy_(torch.arange(50) * 7 % tiny_target.vocab_size)
    model.attach_target(tiny_target)  # lm_head rows follow the new map
    hidden, tokens = _inputs(tiny_target, b=1, t=5)
    drafted = model.extend(model.new_cache(), hidden[0], tokens[0], [5]).argmax(-1)
    draft = model.to_target_ids(drafted)
    logits = model(hidden, tokens)[0, -1]
    assert draft.shape == (1, model.config.num_heads)
    torch.testing.assert_close(draft[0], model.draft_to_target[logits.argmax(-1)])
    assert set(draft.flatten().tolist()) <= set(model.draft_to_target.tolist())


def test_medusa_mode_is_medusa_1(tiny_target):
    """All switches off: logits are lm_head(h + SiLU(W h + b)) per head, nothing else."""
    model = draft_model(tiny_target, randomised=True, **MEDUSA_SWITCHES)
    assert model.config.is_medusa and model.final_norm is None
    hidden, tokens = _inputs(tiny_target)
    want = torch.stack([
        (hidden + F.silu(hidden @ head[0].linear.weight.T + head[0].linear.bias))
        @ tiny_target.lm_head.T
        for head in model.heads], dim=-2)
    torch.testing.assert_close(model(hidden, tokens), want, rtol=1e-5, atol=1e-5)


def test_fresh_model_is_identity_at_the_heads(tiny_target):
    """Zero-initialised residual branches: a fresh Medusa-mode model predicts the target's
    own next token at every head (lm_head(h))."""
    cfg = AmphistaConfig.medusa(tiny_target.hidden_size, tiny_target.vocab_size)
    model = AmphistaDraftModel(cfg, tiny_target)
    hidden, tokens = _inputs(tiny_target, b=1, t=3)
    logits = model(hidden, tokens)
    torch.testing.assert_close(logits[..., 2, :], hidden @ tiny_target.lm_head.T)


@pytest.mark.parametrize("bad, message", [
    ({"num_heads": 0}, "num_heads"),
    ({"num_heads": 17}, "num_heads"),
    ({"num_stages": 5}, "num_stages"),
    ({"num_attention_heads": 5}, "divisible"),
    ({"num_key_value_heads": 3}, "multiple"),
    ({"draft_vocab_size": 10_000}, "draft_vocab_size"),
    ({"own_lm_heads": True}, "own_lm_heads"),
])
def test_impossible_configs_are_named(bad, message):
    with pytest.raises(ValueError, match=message):
        AmphistaConfig(hidden_size=64, vocab_size=512, **bad)


@pytest.mark.parametrize("dtype, tolerance", [
    (torch.float32, 1e-5), pytest.param(torch.bfloat16, 0.02, marks=needs_bf16_packing)])
@pytest.mark.parametrize("switches", [{}, MEDUSA_SWITCHES], ids=["amphista", "medusa-mode"])
def test_prepacked_weights_draft_as_the_plain_model(tiny_target, switches, dtype, tolerance,
                                                   monkeypatch):
    """pack_for_drafting (on a CPU) swaps every weight matrix, the vocabulary projection
    included, for a packed layout: the same logits, chunk after chunk, as the plain model
    with the weights as the packed one reads them (fp32 ones in fp16 where FBGEMM has that
    product; int8 ones for a few rows: the next test). Medusa-mode heads keep no parameter
    once packed: the cache still takes the dtype of the packed model's attention."""
    monkeypatch.setattr(packed_linear, "int8_rows", lambda dtype, device: 0)
    plain = draft_model(tiny_target, randomised=True, draft_vocab_size=100,
                        **switches).to(dtype)
    packed = copy.deepcopy(plain)
    assert packed.pack_for_drafting()
    if dtype == torch.float32 and has_half_weight_gemm():
        with torch.no_grad():
            for linear in (m for m in plain.modules() if isinstance(m, torch.nn.Linear)):
                linear.weight.copy_(linear.weight.half())
        plain.lm_head_weight = plain.lm_head_weight.half().float()
    assert not any(isinstance(m, torch.nn.Linear) for m in packed.modules())
    assert packed.new_cache().keys.dtype == attention_dtype(dtype, "cpu")
    hidden, tokens = _inputs(tiny_target, b=1, t=12)
    hidden = hidden[0].to(dtype)
    caches = {model: model.new_cache() for model in (plain, packed)}
    for rows in (slice(0, 7), slice(7, 8), slice(8, 12)):
        want, got = (model.extend(caches[model], hidden[rows], tokens[0, rows],
                                  [rows.stop - rows.start]) for model in (plain, packed))
        torch.testing.assert_close(got.float(), want.float(), rtol=tolerance, atol=tolerance)


@needs_bf16_packing
def test_int8_weights_draft_as_the_plain_model_with_them(tiny_target, monkeypatch):
    """Where a product of a few rows reads int8 weights, a packed bf16 model drafts one
    row at a time as the plain model whose every weight matrix, the vocabulary
    projection's rows included, is its int8 copy (per-row scales)."""
    monkeypatch.setattr(packed_linear, "int8_rows", lambda dtype, device: 4)
    plain = draft_model(tiny_target, randomised=True, draft_vocab_size=100).to(torch.bfloat16)
    packed = copy.deepcopy(plain)
    assert packed.pack_for_drafting() and packed.config.num_heads <= 4  # rows of the AEB

    with torch.no_grad():  # a row's scale is the same in q/k/v or gate/up fused
        for linear in (m for m in plain.modules() if isinstance(m, torch.nn.Linear)):
            linear.weight.copy_(read_as_int8(linear.weight))
    plain.lm_head_weight = read_as_int8(plain.lm_head_weight)
    hidden, tokens = _inputs(tiny_target, b=1, t=6)
    hidden = hidden[0].to(torch.bfloat16)
    caches = {model: model.new_cache() for model in (plain, packed)}
    for row in range(6):
        want, got = (model.extend(caches[model], hidden[row:row + 1], tokens[0, row:row + 1],
                                  [1]) for model in (plain, packed))
        torch.testing.assert_close(got.float(), want.float(), rtol=0.03, atol=0.03)


def test_draft_pass_benchmark_flushes_twice_the_largest_cache(tmp_path):
    for index, size in enumerate(["48K", "2048K", "491520K", "1M"]):
        (tmp_path / f"index{index}").mkdir()
        (tmp_path / f"index{index}" / "size").write_text(size + "\n")
    assert flush_mb(tmp_path) == 960
    assert flush_mb(tmp_path / "nothing here") == 64


def test_draft_pass_benchmark_times_every_product(tiny_target):
    """benchmarks/draft_pass: every packed product is timed once per pass, and the bytes
    it reads are its weight's (2 per parameter in bf16 or FBGEMM's fp16, 4 in oneDNN fp32,
    1 and a scale per row in int8)."""
    model = draft_model(tiny_target, randomised=True, draft_vocab_size=100).to(compute_dtype())
    dims = {name: m.weight.shape for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear)}
    assert model.pack_for_drafting()
    row = measure(model, requests=2, cached=8, passes=2, flush=1)
    products = {p["product"]: p for p in row["per_product"]}
    assert set(products) == {name for name, m in model.named_modules()
                             if isinstance(m, PackedLinear)}
    d = tiny_target.hidden_size
    per_parameter = 2 if compute_dtype() == torch.bfloat16 or has_half_weight_gemm() else 4

    def mb(product, shape):  # int8 weights: a byte each and a bf16 scale per row
        n, k = shape
        return (n * k + 2 * n if products[product]["int8"] else n * k * per_parameter) / 1e6

    assert products["fusion"]["mb"] == pytest.approx(mb("fusion", dims["fusion"]))
    assert products["packed_lm_head"]["mb"] == pytest.approx(mb("packed_lm_head", (100, d)))
    assert products["fusion"]["rows"] == 2
    assert row["whole_ms"] > 0 and row["without_products_ms"] > 0
    assert row["products_ms"] == pytest.approx(sum(p["ms"] for p in products.values()))


def test_draft_pass_benchmark_of_the_leading_heads_times_the_products_they_run(tiny_target):
    """`--drafted-heads`: the pass of the leading heads reads the first SAL stage, not the
    second, and the benchmark lists the products that pass runs, no others."""
    model = draft_model(tiny_target, randomised=True, num_heads=4, num_stages=2)
    model = model.to(compute_dtype())
    assert model.pack_for_drafting()
    model.draft_leading_heads(2)
    products = {p["product"] for p in measure(model, requests=1, cached=8, passes=2,
                                               flush=1)["per_product"]}
    assert any(name.startswith("stages.0.") for name in products)
    assert not any(name.startswith("stages.1.") for name in products)
    assert {"fusion", "packed_lm_head"} <= products
