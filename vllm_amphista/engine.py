"""The in-process vLLM engine our own commands start (demo, data, acceptance, profiling),
set up in one place."""

from __future__ import annotations

import os
import sys

from vllm_amphista.machine import SERVED_MALLOC, TARGET_DTYPE, intel_openmp, served_worker_binding

# On CPU, vLLM reserves almost all memory for KV cache unless told otherwise (GiB).
DEFAULT_KV_CACHE_GIB = "2"
MAX_MODEL_LEN = 2048
# After its last step an engine core keeps polling its queue for 1 s (sched_yield in a
# loop, a whole core): a measurement that starts right after another engine's ends shares
# the CPU with that spin, so timings of engines taking turns wait this long first.
ENGINE_SETTLE_S = 1.5
# Set to 1, our commands' engines run the target eagerly (vLLM's `enforce_eager`), which
# start in ~5 s where compiling takes 15-60 s: the tests set it. Speed is measured
# compiled, as vLLM serves by default (docs/decisions.md, "The target is compiled").
EAGER_ENV = "VLLM_AMPHISTA_ENFORCE_EAGER"
# Served settings a process reads only as it starts (the dynamic loader, glibc's malloc).
PROCESS_START_SETTINGS = ("LD_PRELOAD", *SERVED_MALLOC)


def set_engine_environment(in_process: bool = True) -> None:
    """Environment every engine of ours starts under; a value the user set wins (an empty
    LD_PRELOAD keeps GNU OpenMP; either MALLOC_ setting keeps glibc's own for the other).
    PROCESS_START_SETTINGS reach only processes started after they are set: `vllm serve`
    started from here, not engines forked from this process (`fork_engines_as_served`)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", DEFAULT_KV_CACHE_GIB)
    # vLLM 0.32 compiles the target on a CPU (inductor) and caches the result, but its
    # default cache (torch's AOT functions) fails to load there ("'function' object has
    # no attribute 'finalize_loading'") and every start compiled again (~45-60 s on a
    # 2-core EPYC); the older cache loads, and a second start takes ~15 s.
    os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
    if in_process:  # the engine core in this process, where tests and profilers reach it
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        return
    if binding := served_worker_binding():  # a worker process vLLM binds
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", binding)
    if library := intel_openmp():
        os.environ.setdefault("LD_PRELOAD", str(library))
    if not any(name in os.environ for name in SERVED_MALLOC):
        os.environ.update(SERVED_MALLOC)


def eager_engines() -> bool:
    """Whether our engines run the target eagerly (EAGER_ENV)."""
    return os.environ.get(EAGER_ENV) == "1"


def fork_engines_as_served(module: str) -> None:
    """For a command (`python -m module ...`) that forks served engines from its own
    process (`start_llm(as_served=True)`): set the served environment, and where that
    changed any of PROCESS_START_SETTINGS, run the command again under it. Once: the new
    process starts with them set."""
    started_with = [os.environ.get(name) for name in PROCESS_START_SETTINGS]
    set_engine_environment(in_process=False)
    if started_with != [os.environ.get(name) for name in PROCESS_START_SETTINGS]:
        os.execv(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]])


def start_llm(target, *, speculative_config: dict | None = None, dtype: str = TARGET_DTYPE,
              as_served: bool = False, **engine_args):
    """vLLM's LLM over `target` (a folder), seeded, our context length, the target
    compiled as vLLM does by default unless `eager_engines()` or engine_args say not.

    In-process (the default) the engine computes with OpenMP's default threads, one per
    core. as_served=True runs the engine core and its worker in processes of their own, as
    `vllm serve` does, where vLLM binds the worker's threads (vLLM leaves a core to the
    front end; on 2 cores we bind the worker to both, `served_worker_binding`): what
    timings meant for serving must use. A VLLM_ENABLE_V1_MULTIPROCESSING the user set
    wins either way (the tests set 0: one process instead of three starts sooner)."""
    set_engine_environment(in_process=not as_served)
    if as_served:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    from vllm import LLM  # heavy: only where an engine starts

    settings = {"max_model_len": MAX_MODEL_LEN, "seed": 0, "enforce_eager": eager_engines(),
                **engine_args}
    return LLM(model=str(target), dtype=dtype, speculative_config=speculative_config,
               **settings)
