"""The project as a user installs it: a wheel built from the repository, installed with
--no-deps into a folder of its own beside the existing engine, must carry the shipped
heads, serve `--speculative-model amphista-heads` and run the demo."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.engine_helpers import IN_PROCESS, REPO_ROOT, engine_env, post_json
from vllm_amphista.eval.server import vllm_server
from vllm_amphista.model.target import export_smollm2

pytestmark = [pytest.mark.engine, pytest.mark.slow]


def build_wheel(out: Path) -> Path:
    """The wheel of the repository's files (tracked or new, not ignored)."""
    source = out / "source"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO_ROOT,
                           capture_output=True, text=True, check=True).stdout.splitlines()
    for name in files:
        if (REPO_ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes((REPO_ROOT / name).read_bytes())
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(out / "dist"), str(source)],
                   check=True, capture_output=True, timeout=300)
    return next((out / "dist").glob("vllm_amphista-*.whl"))


def test_wheel_serves_the_shipped_heads_by_name_and_runs_the_demo(tmp_path):
    wheel = build_wheel(tmp_path)
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(site), str(wheel)], check=True, capture_output=True, timeout=300)
    shipped = site / "vllm_amphista" / "heads" / "SmolLM2-135M-Instruct" / "amphista"
    assert (shipped / "model.safetensors").is_file() and (shipped / "config.json").is_file()

    env = engine_env(PYTHONPATH=str(site), VLLM_CPU_KVCACHE_SPACE="1", **IN_PROCESS)
    where = subprocess.run([sys.executable, "-c", "import vllm_amphista; print("
                            "vllm_amphista.__file__)"], env=env, capture_output=True,
                           text=True, check=True, cwd=tmp_path).stdout.strip()
    assert Path(where).is_relative_to(site), where

    target = str(export_smollm2())
    with vllm_server([target, "--enforce-eager", "--max-model-len", "1024", "--dtype",
                      "float32", "--speculative-model", "amphista-heads"], env,
                     timeout=300, executable=site / "bin" / "vllm", cwd=tmp_path) as (base, log):
        reply = post_json(f"{base}/v1/chat/completions", {
            "model": target, "temperature": 0, "max_tokens": 16, "ignore_eos": True,
            "messages": [{"role": "user", "content": "Name three colours."}]})
        assert reply["usage"]["completion_tokens"] == 16
        assert str(shipped) in log.read_text()

    demo = subprocess.run([str(site / "bin" / "vllm-amphista"), "demo", "--num-prompts", "1",
                           "--max-tokens", "24"], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert "identical tokens: yes" in demo.stdout, demo.stdout[-2000:]
