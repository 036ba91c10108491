"""The `vllm.general_plugins` hook.

vLLM calls `register()` in every process it starts (front end, engine core,
workers, the model-inspection subprocess), possibly more than once: it must be
idempotent, so it only records names and installs patches. Patching the model runner
imports vLLM's runner module, about 2 s once in a process that would not otherwise load
it (the API front end); every patch is applied here, in one place and order.
"""

from __future__ import annotations

from vllm_amphista.model.config import ARCHITECTURE
from vllm_amphista.serving.patches import (
    patch_cpu_expand_kernel,
    patch_cpu_generator_rewind,
    patch_draftless_steps_plain,
    patch_drafts_with_sampled_tokens,
    patch_empty_draft_constraints,
    patch_engine_args,
    patch_greedy_verification_argmax,
    patch_model_runner,
    patch_recovered_token_sampling,
    patch_rejection_sampling_without_logprobs,
    patch_verified_top_p,
)

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        # Lazy "module:Class" string: nothing is imported until vLLM resolves the name.
        ModelRegistry.register_model(ARCHITECTURE,
                                     "vllm_amphista.model.draft_model:AmphistaDraftModel")
    patch_engine_args()
    patch_model_runner()  # routes the runner's hidden states to our drafters
    patch_drafts_with_sampled_tokens()  # speed only: one round trip a step less
    patch_draftless_steps_plain()  # speed only: a paused step is a vanilla one
    # Every speculative method on the CPU build needs these, not only ours.
    patch_cpu_expand_kernel()
    patch_empty_draft_constraints()
    patch_recovered_token_sampling()  # speed only, these four: the others are correctness
    patch_rejection_sampling_without_logprobs()
    patch_greedy_verification_argmax()
    patch_verified_top_p()
    # Every seeded request on the CPU build needs this one, speculating or not.
    patch_cpu_generator_rewind()
    _registered = True
