"""Fails loudly when the installed vLLM no longer has the shape our patches expect."""

from __future__ import annotations

import dataclasses
import inspect
from types import SimpleNamespace

import pytest
import torch
import vllm
from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.gpu_input_batch import InputBatch
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from vllm_amphista.serving import patches as vllm_patches
from vllm_amphista.serving.spec_config import AmphistaSetupError


def test_pinned_vllm_version():
    assert vllm.__version__.split("+")[0] == vllm_patches.PINNED_VLLM_VERSION


def test_runner_shapes_the_patch_relies_on():
    params = tuple(inspect.signature(GPUModelRunner.propose_draft_token_ids).parameters)
    if hasattr(GPUModelRunner.propose_draft_token_ids, "_amphista_original"):
        params = tuple(inspect.signature(
            GPUModelRunner.propose_draft_token_ids._amphista_original).parameters)
    assert params == vllm_patches.PROPOSE_DRAFT_TOKEN_IDS_PARAMS
    assert tuple(inspect.signature(GPUModelRunner._on_request_state_removed).parameters) == (
        "self", "req_id", "req_state")
    # The CPU runner must inherit both methods, not override them.
    for name in ("propose_draft_token_ids", "_on_request_state_removed"):
        assert name not in CPUModelRunner.__dict__
    source = inspect.getsource(GPUModelRunner)
    assert 'self.speculative_config.method == "custom_class"' in source
    assert "self._on_request_state_removed(req_id, req_state)" in source
    batch_source = inspect.getsource(InputBatch.__init__)
    for attribute in ("self.num_computed_tokens_cpu", "self.token_ids_cpu", "self._req_ids"):
        assert attribute in batch_source
    assert "query_start_loc_cpu" in CommonAttentionMetadata.__dataclass_fields__


def test_engine_args_shapes_the_patch_relies_on():
    assert tuple(inspect.signature(EngineArgs.create_speculative_config).parameters) == (
        "self", "target_model_config", "target_parallel_config")
    assert isinstance(inspect.getattr_static(EngineArgs, "from_cli_args"), classmethod)
    assert isinstance(inspect.getattr_static(EngineArgs, "add_cli_args"), staticmethod)
    assert "from_cli_args" not in AsyncEngineArgs.__dict__
    assert "additional_config" in EngineArgs.__dataclass_fields__


def test_patches_are_idempotent_and_add_the_flags():
    vllm_patches.patch_engine_args()
    first = EngineArgs.create_speculative_config
    vllm_patches.patch_engine_args()
    vllm_patches.patch_model_runner()
    vllm_patches.patch_model_runner()
    vllm_patches.patch_draftless_steps_plain()
    vllm_patches.patch_draftless_steps_plain()
    assert EngineArgs.create_speculative_config is first
    for method in (GPUModelRunner.propose_draft_token_ids, GPUModelRunner._prepare_inputs):
        assert not hasattr(method._amphista_original, "_amphista_original")
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    args = parser.parse_args(["--model", "m", "--speculative-model", "/h",
                              "--num-speculative-tokens", "3",
                              "--speculative-disable-by-batch-size", "8"])
    engine_args = AsyncEngineArgs.from_cli_args(args)
    assert engine_args.speculative_config == {"method": "amphista", "model": "/h",
                                              "num_speculative_tokens": 3,
                                              "disable_by_batch_size": 8}
    # The draft-length flags mean nothing without heads: refused, not ignored.
    orphan = parser.parse_args(["--model", "m", "--num-speculative-tokens", "3"])
    with pytest.raises(AmphistaSetupError, match="need --speculative-model"):
        AsyncEngineArgs.from_cli_args(orphan)


def _expand_case(dtype: torch.dtype):
    """Five requests, one with no drafts, values that include replace_from (0)."""
    values = torch.tensor([0.7, 0.0, 3.0, 1.5, 0.0]).to(dtype)
    counts = torch.tensor([4, 0, 2, 3, 1])
    return values, counts, torch.cumsum(counts, 0).to(torch.int32)


def test_engine_cpu_expand_still_loses_its_output():
    """Tripwire: vLLM 0.32's CPU expand writes an int64 copy, never the caller's float32
    tensor. The day this fails, vLLM has fixed it: drop patch_cpu_expand_kernel."""
    from vllm.platforms import current_platform
    from vllm.utils import cpu_triton_utils

    current_platform.import_kernels()
    engine_expand = getattr(cpu_triton_utils._expand_kernel_impl, "_amphista_original",
                            cpu_triton_utils._expand_kernel_impl)
    values, counts, cu = _expand_case(torch.float32)
    output = torch.full((int(counts.sum()),), -7.0)
    engine_expand(output, values, cu, 0, 1)
    assert (output == -7.0).all(), "vLLM's CPU expand now writes its output: drop the patch"


@pytest.mark.parametrize("dtype", [torch.float32, torch.int32, torch.int64])
def test_patched_expand_matches_repeat_interleave(dtype):
    from vllm.platforms import current_platform
    from vllm.plugins import load_general_plugins
    from vllm.v1.sample.rejection_sampler import expand_batch_to_tokens

    # The order vLLM's workers use: plugins first, then the platform's kernel overrides.
    load_general_plugins()
    current_platform.import_kernels()
    current_platform.register_triton_kernel_overrides()
    values, counts, cu = _expand_case(dtype)
    for replace_from, replace_to in ((0, 1), (0, 0)):
        expected = torch.where(values == replace_from, torch.tensor(replace_to, dtype=dtype),
                               values).repeat_interleave(counts)
        for _ in range(3):  # uninitialised memory differs from call to call
            got = expand_batch_to_tokens(values, cu, int(counts.sum()),
                                         replace_from=replace_from, replace_to=replace_to)
            assert got.dtype == dtype and torch.equal(got, expected)


def test_engine_top_k_only_still_fails_on_zero_rows():
    """Tripwire: the CPU top-k path fails on a step with no draft rows. The day this
    fails, vLLM handles it: drop patch_empty_draft_constraints."""
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_only

    with pytest.raises(RuntimeError, match=r"numel\(\) == 0"):
        apply_top_k_only(torch.empty(0, 8), torch.empty(0, dtype=torch.int32))


def test_patched_constraints_pass_zero_rows_through():
    from vllm.plugins import load_general_plugins
    from vllm.v1.sample import rejection_sampler

    load_general_plugins()
    metadata = SimpleNamespace(all_greedy=False, temperature=torch.tensor([0.8, 0.5]),
                               top_k=torch.tensor([5, 3], dtype=torch.int32), top_p=None)
    empty = rejection_sampler.apply_sampling_constraints(
        torch.empty(0, 8), torch.zeros(2, dtype=torch.int32), metadata)
    assert empty.shape == (0, 8)
    # Rows present: still tempered and cut to each request's top-k (2 rows, then 1).
    logits = rejection_sampler.apply_sampling_constraints(
        torch.randn(3, 8), torch.tensor([2, 3], dtype=torch.int32), metadata)
    assert torch.isfinite(logits).sum(-1).tolist() == [5, 5, 3]


def test_engine_rejection_sampler_cuts_through_apply_top_k_top_p():
    """Tripwire: vLLM 0.32 cuts the verified rows by calling the module's
    `apply_top_k_top_p(logits, k, p)`. The day this fails, re-check
    patch_verified_top_p."""
    from vllm.v1.sample import rejection_sampler

    engine = getattr(rejection_sampler.apply_top_k_top_p, "_amphista_original",
                     rejection_sampler.apply_top_k_top_p)
    assert tuple(inspect.signature(engine).parameters) == \
        vllm_patches.APPLY_TOP_K_TOP_P_PARAMS
    constraints = getattr(rejection_sampler.apply_sampling_constraints, "_amphista_original",
                          rejection_sampler.apply_sampling_constraints)
    assert "return apply_top_k_top_p(logits, top_k, top_p)" in inspect.getsource(constraints)


def test_engine_cpu_generators_still_have_no_offset():
    """Tripwire: vLLM rewinds a discarded draw with set_offset, which CPU generators lack.
    The day this fails, both have changed: re-check patch_cpu_generator_rewind."""
    bookkeeping = getattr(GPUModelRunner._bookkeeping_sync, "_amphista_original",
                          GPUModelRunner._bookkeeping_sync)
    assert "gen.set_offset(gen.get_offset() - 4)" in inspect.getsource(bookkeeping)
    assert "discard_request_mask" in inspect.getsource(GPUModelRunner._prepare_inputs)
    with pytest.raises(RuntimeError, match="does not use offset"):
        torch.Generator().get_offset()
    for name in ("_sample", "_bookkeeping_sync"):
        assert name not in CPUModelRunner.__dict__


@pytest.mark.engine
def test_seeded_request_prefilled_in_chunks_lives_and_keeps_its_stream(tiny_target_dir):
    """A seeded request whose prompt is prefilled in 64-token chunks (its token thrown
    away after every chunk but the last) crashed vLLM 0.32's CPU engine. Patched, it
    answers, and exactly as the same request does when the prompt is mostly cached and
    prefilled in one piece: the thrown-away draws leave its random stream untouched."""
    from tests.engine_helpers import run_engine_script

    result = run_engine_script(f"""
from vllm import LLM, SamplingParams
from vllm_amphista.eval.report import print_result
llm = LLM(model={str(tiny_target_dir)!r}, enforce_eager=True, max_model_len=512,
          max_num_batched_tokens=64, enable_prefix_caching=True, dtype="float32")
prompt = " ".join(f"w{{i % 400}}" for i in range(300))
params = SamplingParams(temperature=1.0, seed=7, max_tokens=16)
runs = [llm.generate([prompt], params, use_tqdm=False)[0] for _ in range(2)]
print_result({{"tokens": [list(r.outputs[0].token_ids) for r in runs],
              "cached": [r.num_cached_tokens for r in runs]}})
""")
    first, second = result["tokens"]
    assert result["cached"][0] == 0 and result["cached"][1] >= 300 - 64, result["cached"]
    assert len(first) == 16 and first == second


def test_engine_recovered_tokens_still_draw_noise_for_every_request():
    """Tripwire: vLLM 0.32 draws recovered-token noise, exponentials, for the whole batch
    and hands their reciprocals to its kernel. The day this fails, re-check
    patch_recovered_token_sampling (it may be redundant, or wrong)."""
    from vllm.v1.sample import rejection_sampler

    engine = getattr(rejection_sampler.sample_recovered_tokens, "_amphista_original",
                     rejection_sampler.sample_recovered_tokens)
    assert tuple(inspect.signature(engine).parameters) == \
        vllm_patches.SAMPLE_RECOVERED_TOKENS_PARAMS
    source = inspect.getsource(engine)
    for step in ("(batch_size, vocab_size)", "q.exponential_()", "inv_q = q.reciprocal()",
                 "_sample_recovered_tokens(\n        recovered_token_ids,\n"
                 "        cu_num_draft_tokens,\n        draft_token_ids,\n        draft_probs,\n"
                 "        target_probs,\n        inv_q,\n        max_spec_len=max_spec_len,"):
        assert step in source
    assert "sample_recovered_tokens(" in inspect.getsource(rejection_sampler.rejection_sample)


def _unconstrained_metadata(temperature: torch.Tensor,
                            generators: dict[int, torch.Generator] | None = None):
    """Sampling metadata of a batch with these temperatures (0 = greedy), no top-k, top-p,
    penalties, logprobs or logits processors; `generators`: the seeded requests'."""
    from vllm.v1.sample.logits_processor import LogitsProcessors
    from vllm.v1.sample.metadata import SamplingMetadata

    batch = len(temperature)
    greedy = temperature == 0
    return SamplingMetadata(
        temperature=temperature, all_greedy=bool(greedy.all()),
        all_random=not bool(greedy.any()), top_p=None, top_k=None,
        generators=generators or {}, max_num_logprobs=None, no_penalties=True,
        prompt_token_ids=None, frequency_penalties=torch.zeros(batch),
        presence_penalties=torch.zeros(batch), repetition_penalties=torch.ones(batch),
        output_token_ids=[[1]] * batch, allowed_token_ids_mask=None, bad_words_token_ids={},
        logitsprocs=LogitsProcessors(), spec_token_ids=[[] for _ in range(batch)])


def _recovered_case(seeded: list[int]):
    """Five requests, two without drafts; `seeded` ones get a generator of their own."""
    counts = [2, 0, 3, 0, 1]
    tokens, vocab = sum(counts), 64
    gen = torch.Generator().manual_seed(0)
    draft_probs = torch.rand(tokens, vocab, generator=gen).softmax(-1)
    metadata = _unconstrained_metadata(
        torch.ones(5), {i: torch.Generator().manual_seed(10 + i) for i in seeded})
    return (max(counts), counts, torch.tensor(counts).cumsum(0).to(torch.int32),
            draft_probs.argmax(-1).to(torch.int32), draft_probs,
            torch.rand(tokens, vocab, generator=gen).softmax(-1), metadata, "cpu")


def _drafting_only(case):
    """The same step without the requests that have no drafts."""
    max_len, counts, cu, ids, draft_probs, target_probs, metadata, device = case
    keep = [i for i, n in enumerate(counts) if n]
    generators = {new: metadata.generators[old] for new, old in enumerate(keep)
                  if old in metadata.generators}
    return (max_len, [counts[i] for i in keep], cu[keep], ids, draft_probs, target_probs,
            dataclasses.replace(metadata, generators=generators), device)


def _patched_kernels():
    from vllm.platforms import current_platform
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    current_platform.import_kernels()
    current_platform.register_triton_kernel_overrides()


@pytest.mark.parametrize("seeded", [[], [0, 1, 4], [0, 1, 2, 3, 4]])
def test_recovered_tokens_draw_only_for_drafting_requests(seeded):
    """Patched, a step draws what the same step without its draftless requests draws:
    the same recovered tokens, seeded requests' from their own generators, unseeded
    ones' from the global generator, which the draftless requests no longer advance."""
    from vllm.v1.sample import rejection_sampler

    _patched_kernels()
    patched = rejection_sampler.sample_recovered_tokens
    torch.manual_seed(3)
    expected = patched(*_drafting_only(_recovered_case(seeded)))
    after_expected = torch.rand(4)
    torch.manual_seed(3)
    got = patched(*_recovered_case(seeded))
    assert torch.equal(got, expected)
    assert torch.equal(torch.rand(4), after_expected)  # no noise drawn for anyone else
    if {0, 2, 4} <= set(seeded):  # every drafting request seeded: the global draws
        torch.manual_seed(4)     # change nothing
        assert torch.equal(patched(*_recovered_case(seeded)), got)
    # A step where nobody drafts draws nothing at all.
    state = torch.get_rng_state()
    *_, ids, _, target_probs, metadata, device = _recovered_case(seeded)
    nothing = patched(0, [0] * 5, torch.zeros(5, dtype=torch.int32), ids[:0], None,
                      target_probs[:0], metadata, device)
    assert nothing.shape == (0,) and torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("draft_probs", [True, False])
def test_recovered_tokens_follow_the_residual_distribution(draft_probs):
    """4000 rejected positions (one draft each) of the same target p and draft q: the
    recovered tokens pass a chi-square test against draws from max(p - q, 0) normalised
    (without q: p with the draft token removed), as the rejection sampler's proof needs.
    Tokens with no residual mass never come back."""
    from vllm.v1.sample import rejection_sampler

    from tests.chi_square import two_sample_chi_square

    _patched_kernels()
    p = torch.tensor([0.3, 0.25, 0.2, 0.1, 0.08, 0.05, 0.02, 0.0])
    q = torch.tensor([0.5, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05, 0.0])
    residual = (p - q).clamp_min(0) if draft_probs else p.clone()
    if not draft_probs:
        residual[0] = 0.0  # the draft token, 0, is what was rejected
    rows = 4000
    torch.manual_seed(11)
    got = rejection_sampler.sample_recovered_tokens(
        1, [1] * rows, torch.arange(1, rows + 1, dtype=torch.int32),
        torch.zeros(rows, dtype=torch.int32), q.repeat(rows, 1) if draft_probs else None,
        p.repeat(rows, 1), _unconstrained_metadata(torch.ones(rows)), "cpu").tolist()
    assert not {t for t in got if residual[t] == 0}
    exact = torch.multinomial(residual, rows, replacement=True,
                              generator=torch.Generator().manual_seed(12)).tolist()
    assert two_sample_chi_square(got, exact)[2] > 1e-3


def test_engine_rejection_sampler_still_samples_bonus_tokens_first():
    """Tripwire: vLLM 0.32's rejection sampler samples every request's bonus token with its
    plain sampler before rejecting anything, asking for full logprobs. The day this fails,
    re-check patch_rejection_sampling_without_logprobs."""
    from vllm.v1.sample.rejection_sampler import RejectionSampler

    engine = getattr(RejectionSampler.forward, "_amphista_original", RejectionSampler.forward)
    assert tuple(inspect.signature(engine).parameters) == \
        vllm_patches.REJECTION_SAMPLER_FORWARD_PARAMS
    source = inspect.getsource(engine)
    for step in ("bonus_logits = logits[bonus_logits_indices]", "max_num_logprobs=-1",
                 "predict_bonus_token=True", "bonus_token_ids = bonus_sampler_output"):
        assert step in source


def _sampling_case(kind: str, drafts: list[int], vocab: int = 50):
    """A step's logits (each request's draft rows, then its bonus row), spec-decode
    metadata for `drafts` drafts per request, sampling metadata of one kind, and the
    drafts' q where sampled requests carry drafts."""
    from vllm.v1.sample.logits_processor import LogitsProcessors
    from vllm.v1.sample.metadata import SamplingMetadata
    from vllm.v1.spec_decode.metadata import SpecDecodeMetadata

    batch = len(drafts)
    gen = torch.Generator().manual_seed(1)
    draft_ids = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in drafts]
    logits = torch.randn(sum(drafts) + batch, vocab, generator=gen) * 3
    temperature = torch.full((batch,), 0.8)
    if kind in ("greedy", "mixed", "penalties"):
        temperature[: batch if kind == "greedy" else batch // 2] = 0.0
    penalties = kind == "penalties"
    # Each request's rows end here, its bonus row last.
    ends = torch.cumsum(torch.tensor(drafts) + 1, 0).tolist()
    # Penalised: each request's earlier tokens are its rows' favourites.
    output_ids = [logits[end - n - 1: end].argmax(-1).tolist()
                  for end, n in zip(ends, drafts, strict=True)]
    metadata = SamplingMetadata(
        temperature=temperature, all_greedy=kind == "greedy",
        all_random=kind not in ("greedy", "mixed", "penalties"),
        top_k=torch.full((batch,), 5) if kind == "top_k" else None,
        top_p=torch.full((batch,), 0.7) if kind == "top_p" else None,
        generators={i: torch.Generator().manual_seed(20 + i) for i in range(0, batch, 2)},
        max_num_logprobs=2 if kind == "logprobs" else None, no_penalties=not penalties,
        prompt_token_ids=torch.randint(0, vocab, (batch, 4), generator=gen),
        frequency_penalties=torch.full((batch,), 0.5 if penalties else 0.0),
        presence_penalties=torch.full((batch,), 0.3 if penalties else 0.0),
        repetition_penalties=torch.full((batch,), 1.2 if penalties else 1.0),
        output_token_ids=output_ids, allowed_token_ids_mask=None,
        bad_words_token_ids={}, logitsprocs=LogitsProcessors(), spec_token_ids=draft_ids)
    spec = SpecDecodeMetadata.make_dummy(draft_ids, torch.device("cpu"))
    spec.bonus_logits_indices = torch.tensor(ends, dtype=torch.int32) - 1
    spec.target_logits_indices = torch.tensor(
        [end - 1 - n + j for end, n in zip(ends, drafts, strict=True) for j in range(n)],
        dtype=torch.int32)
    draft_probs = None
    if kind != "greedy" and sum(drafts):
        draft_probs = torch.softmax(torch.randn(sum(drafts), vocab, generator=gen), -1)
    return spec, logits, metadata, draft_probs


@pytest.mark.parametrize("drafts", [[0] * 6, [2, 0, 1, 3, 0, 1]], ids=["draftless", "drafted"])
@pytest.mark.parametrize("kind", ["greedy", "mixed", "random", "top_k", "top_p",
                                  "penalties", "logprobs"])
def test_steps_without_logprobs_sample_as_the_rejection_sampler(kind, drafts, monkeypatch):
    """The same tokens (seeded requests from their own generators, the others from the
    global one, left in the same state) as vLLM's rejection sampler, without its logprob
    copies, and without its rejection pass where no request has drafts; logprobs keep
    vLLM's path."""
    from vllm.platforms import current_platform
    from vllm.plugins import load_general_plugins
    from vllm.v1.sample import rejection_sampler
    from vllm.v1.sample.rejection_sampler import RejectionSampler
    from vllm.v1.sample.sampler import Sampler

    load_general_plugins()
    current_platform.import_kernels()
    current_platform.register_triton_kernel_overrides()
    engine = RejectionSampler.forward._amphista_original
    sampler = RejectionSampler(Sampler())
    spec, logits, metadata, draft_probs = _sampling_case(kind, drafts)
    torch.manual_seed(5)
    expected = engine(sampler, spec, draft_probs, logits.clone(), metadata)
    after_expected = torch.rand(4)
    spec, logits, metadata, draft_probs = _sampling_case(kind, drafts)
    if kind != "logprobs" and not sum(drafts):  # skipped, not run on zero rows
        monkeypatch.setattr(rejection_sampler, "rejection_sample", None)
    torch.manual_seed(5)
    got = sampler(spec, draft_probs, logits, metadata)
    assert got.sampled_token_ids.dtype == expected.sampled_token_ids.dtype == torch.int32
    assert torch.equal(got.sampled_token_ids, expected.sampled_token_ids)
    assert torch.equal(torch.rand(4), after_expected)
    assert (got.logprobs_tensors is None) == (kind != "logprobs")
    if kind == "logprobs":
        for mine, theirs in zip(got.logprobs_tensors, expected.logprobs_tensors, strict=True):
            assert (mine is None and theirs is None) or torch.equal(mine, theirs)


def test_engine_greedy_verification_still_takes_torchs_argmax():
    """Tripwire: vLLM 0.32's rejection_sample takes these parameters, and for greedy
    requests torch's argmax of the verified rows, which vLLM's own greedy kernel then
    rejects with; its plain sampler uses vLLM's CPU argmax. The day this fails, re-check
    patch_greedy_verification_argmax."""
    from vllm.v1.sample import rejection_sampler
    from vllm.v1.sample.sampler import Sampler

    engine = getattr(rejection_sampler.rejection_sample, "_amphista_original",
                     rejection_sampler.rejection_sample)
    assert tuple(inspect.signature(engine).parameters) == vllm_patches.REJECTION_SAMPLE_PARAMS
    source = inspect.getsource(engine)
    for step in ("target_argmax = target_logits.argmax(dim=-1)", "_rejection_greedy_sample(",
                 "if sampling_metadata.all_greedy:\n            return output_token_ids"):
        assert step in source
    assert "torch.ops._C.greedy_argmax(logits)" in inspect.getsource(Sampler.greedy_sample)


def _greedy_verification_case(all_greedy: bool):
    """Verified rows of 4 requests (2, 0, 3 and 1 drafts), bf16-rounded logits with tied
    maxima, drafts that match the target's first maximum, a later tied one, or neither."""
    gen = torch.Generator().manual_seed(7)
    num_draft_tokens = [2, 0, 3, 1]
    rows, vocab = sum(num_draft_tokens), 3000
    logits = (torch.randn(rows, vocab, generator=gen) * 4).to(torch.bfloat16).float()
    top = logits.amax(-1, keepdim=True)
    logits[:, 100:103] = top  # ties: 100 is the first maximum of every row
    draft = torch.tensor([100, 100, 100, 101, 100, 7], dtype=torch.int32)
    metadata = _unconstrained_metadata(
        torch.zeros(4) if all_greedy else torch.tensor([0.0, 0.8, 0.0, 0.8]))
    cu = torch.tensor(num_draft_tokens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    bonus = torch.tensor([[11], [12], [13], [14]], dtype=torch.int64)
    return (draft, num_draft_tokens, 3, cu, None, logits, bonus, metadata)


@pytest.mark.parametrize("all_greedy", [True, False])
def test_greedy_verification_rejects_as_vllms_argmax_would(all_greedy, monkeypatch):
    """An all-greedy batch: the same accepted drafts, target tokens (the first of tied
    maxima) and bonus tokens as vLLM's rejection_sample; a batch with a sampled request
    goes to vLLM's own path."""
    from vllm.v1.sample import rejection_sampler

    _patched_kernels()
    engine = rejection_sampler.rejection_sample._amphista_original
    case = _greedy_verification_case(all_greedy)
    torch.manual_seed(5)
    expected = engine(*case)
    if all_greedy:  # torch's argmax is not taken
        monkeypatch.setattr(torch.Tensor, "argmax", None)
    torch.manual_seed(5)
    got = rejection_sampler.rejection_sample(*case)
    assert got.dtype == expected.dtype == torch.int32
    assert torch.equal(got, expected)
    if all_greedy:  # 0 takes both drafts and its bonus; 2 stops at the tie's 101, 3 at once
        assert got.tolist() == [[100, 100, 11, -1], [12, -1, -1, -1],
                                [100, 100, -1, -1], [100, -1, -1, -1]]


def test_engine_core_still_fetches_drafts_in_a_call_of_their_own():
    """The shapes patch_drafts_with_sampled_tokens relies on: post_step asks the
    executor for the drafts after every step, and the methods it wraps take these
    parameters (the CPU runner inheriting sample_tokens)."""
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.executor.multiproc_executor import MultiprocExecutor
    from vllm.v1.outputs import ModelRunnerOutput

    assert "self.model_executor.take_draft_token_ids()" in inspect.getsource(
        EngineCore.post_step)
    for method, params in ((GPUModelRunner.sample_tokens, ("self", "grammar_output")),
                           (MultiprocExecutor.sample_tokens,
                            ("self", "grammar_output", "non_block")),
                           (MultiprocExecutor.take_draft_token_ids, ("self",))):
        original = getattr(method, "_amphista_original", method)
        assert tuple(inspect.signature(original).parameters) == params, method
    assert "sample_tokens" not in CPUModelRunner.__dict__
    assert "__slots__" not in ModelRunnerOutput.__dict__  # it takes our attribute


def test_drafts_sent_with_the_output_answer_the_executors_next_call_for_them():
    from vllm.v1.executor.multiproc_executor import MultiprocExecutor

    vllm_patches.patch_drafts_with_sampled_tokens()
    calls = []
    replies = {"take_draft_token_ids": "asked"}

    def collective_rpc(method, **options):
        calls.append(method)
        return replies[method]

    executor = SimpleNamespace(collective_rpc=collective_rpc, output_rank=0,
                               kv_output_aggregator=None, ec_output_aggregator=None)
    replies["sample_tokens"] = SimpleNamespace(
        **{vllm_patches.DRAFTS_ATTRIBUTE: "sent"})
    MultiprocExecutor.sample_tokens(executor, None)
    assert MultiprocExecutor.take_draft_token_ids(executor) == "sent"
    assert calls == ["sample_tokens"]
    # Once only; an output without drafts (another drafter, a future) keeps the call.
    assert MultiprocExecutor.take_draft_token_ids(executor) == "asked"
    replies["sample_tokens"] = SimpleNamespace()
    MultiprocExecutor.sample_tokens(executor, None)
    assert MultiprocExecutor.take_draft_token_ids(executor) == "asked"
    assert calls == ["sample_tokens", "take_draft_token_ids", "sample_tokens",
                     "take_draft_token_ids"]


def test_engine_still_builds_spec_metadata_for_every_step():
    """Tripwire for patch_draftless_steps_plain: vLLM's _prepare_inputs still decides the
    speculative path by the config alone, and reads the scheduler's drafts and no other
    speculative state; the CPU runner inherits it. The day the first assertion fails,
    vLLM skips the metadata for draftless steps itself: drop the patch."""
    from vllm.config import ModelConfig

    original = getattr(GPUModelRunner._prepare_inputs, "_amphista_original",
                       GPUModelRunner._prepare_inputs)
    assert tuple(inspect.signature(original).parameters) == vllm_patches.PREPARE_INPUTS_PARAMS
    source = inspect.getsource(original)
    assert "use_spec_decode = self.speculative_config is not None" in source
    assert source.count("self.speculative_config") == 1
    assert "scheduler_output.scheduled_spec_decode_tokens" in source
    assert "_prepare_inputs" not in CPUModelRunner.__dict__
    assert isinstance(inspect.getattr_static(ModelConfig, "has_inner_state"), property)
