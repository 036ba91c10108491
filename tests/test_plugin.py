"""The plugin as vLLM sees it: entry points, the hook, and the `vllm` command wrapper."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

from vllm_amphista.model.checkpoint import save_checkpoint
from vllm_amphista.model.target import TargetWeights
from vllm_amphista.serving import patches as vllm_patches

VENV_BIN = Path(sys.executable).parent


def test_entry_points_are_declared():
    plugins = {ep.name: ep.value for ep in importlib.metadata.entry_points(
        group="vllm.general_plugins")}
    assert plugins.get("amphista") == "vllm_amphista.serving.plugin:register"
    scripts = [(ep.name, ep.value) for ep in importlib.metadata.entry_points(
        group="console_scripts")]
    assert ("vllm-amphista", "vllm_amphista.cli:main") in scripts
    assert ("vllm", "vllm_amphista.serving.vllm_command:main") in scripts
    # The engine declares a `vllm` script too: ours must be the one on disk.
    assert "vllm_amphista.serving.vllm_command" in (VENV_BIN / "vllm").read_text()


def test_hook_registers_model_and_is_idempotent():
    code = (
        "from vllm.plugins import load_general_plugins\n"
        "from vllm import ModelRegistry\n"
        "from vllm_amphista.serving import plugin\n"
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


def test_bf16_target_on_an_emulating_cpu_is_warned_once_and_kept(tiny_target_dir, tmp_path):
    """Engine config for Amphista with the CPU's flags faked to AVX2 only: a bf16 target
    gets one warning line naming the fix and stays bf16; an fp32 target gets none."""
    from tests.conftest import draft_model
    save_checkpoint(draft_model(TargetWeights.from_folder(tiny_target_dir), randomised=True),
                    tmp_path / "heads")
    code = f"""
from vllm_amphista import machine
machine.cpu_info = lambda: machine.read_cpu_info("model name : AMD EPYC 7B13\\nflags : avx2 fma")
from vllm.plugins import load_general_plugins
from vllm.engine.arg_utils import EngineArgs
load_general_plugins()
for dtype in ("bfloat16", "float32"):
    config = EngineArgs(model={str(tiny_target_dir)!r}, dtype=dtype, speculative_config={{
        "method": "amphista", "model": {str(tmp_path / "heads")!r}}}).create_engine_config()
    print("DTYPE", dtype, config.model_config.dtype, flush=True)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert [x for x in out.stdout.splitlines() if x.startswith("DTYPE")] == [
        "DTYPE bfloat16 torch.bfloat16", "DTYPE float32 torch.float32"]
    log = out.stdout + out.stderr
    warnings = [x for x in log.splitlines() if "amphista: the target runs in bfloat16" in x]
    # One line for the two configs: the bf16 one warned, the fp32 one did not.
    assert len(warnings) == 1 and "Pass --dtype float32" in warnings[0], log[-3000:]
