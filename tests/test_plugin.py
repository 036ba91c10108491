"""The plugin as vLLM sees it: entry points, the hook, and the `vllm` command wrapper."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

from vllm_amphista import vllm_patches

VENV_BIN = Path(sys.executable).parent


def test_entry_points_are_declared():
    plugins = {ep.name: ep.value for ep in importlib.metadata.entry_points(
        group="vllm.general_plugins")}
    assert plugins.get("amphista") == "vllm_amphista.plugin:register"
    scripts = [(ep.name, ep.value) for ep in importlib.metadata.entry_points(
        group="console_scripts")]
    assert ("vllm-amphista", "vllm_amphista.cli:main") in scripts
    assert ("vllm", "vllm_amphista.vllm_command:main") in scripts
    # The engine declares a `vllm` script too: ours must be the one on disk.
    assert "vllm_amphista.vllm_command" in (VENV_BIN / "vllm").read_text()


def test_hook_registers_model_and_is_idempotent():
    code = (
        "from vllm.plugins import load_general_plugins\n"
        "from vllm import ModelRegistry\n"
        "from vllm_amphista import plugin\n"
        "load_general_plugins(); plugin.register(); plugin._registered = False; "
        "plugin.register()\n"
        "print('AmphistaDraftModel' in ModelRegistry.get_supported_archs())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, check=True)
    assert out.stdout.strip().splitlines()[-1] == "True", out.stderr[-2000:]


def test_engine_version_names_the_cpu_build():
    """vllm.platforms picks the CPU platform only if the version string contains 'cpu'."""
    version = vllm_patches.engine_version()
    assert version.startswith(vllm_patches.PINNED_VLLM_VERSION)
    try:
        importlib.metadata.distribution("vllm")
    except importlib.metadata.PackageNotFoundError:
        assert version.endswith("+cpu")


def test_vllm_command_runs():
    out = subprocess.run([str(VENV_BIN / "vllm"), "--version"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == vllm_patches.engine_version()


def test_vllm_amphista_command_help():
    out = subprocess.run([str(VENV_BIN / "vllm-amphista"), "--help"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "export-target" in out.stdout
