"""Helpers for tests that start real vLLM engines and servers (marked `engine`).

A test's engines run in a subprocess of their own, one after the other: a crash in one
test must not take the others down, and vLLM is imported once per test, not per engine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock

from vllm_amphista.eval import server
from vllm_amphista.eval.report import result_from

ENGINE_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "TOKENIZERS_PARALLELISM": "false",
}


def engine_env(**extra: str) -> dict[str, str]:
    """The test process's environment for an engine, without the Triton interpreter
    that tests/conftest.py turns on for the kernel tests."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return {**env, **extra}


REPO_ROOT = Path(__file__).resolve().parent.parent


def run_engine_script(code: str, timeout: float = 600,
                      env_extra: dict[str, str] | None = None) -> dict:
    """Run `code` in a fresh Python; it hands its result over with
    `vllm_amphista.eval.report.print_result`."""
    return _run_for_result([sys.executable, "-c", code], timeout, env_extra)


def run_scenarios(spec: dict, *speculative_configs: dict | None,
                  timeout: float = 900) -> list[dict]:
    """tests/engine_scenarios.py with `spec`, in one fresh Python: one engine per
    speculative config (None: plain), one after the other. A result per config."""
    spec = {**spec, "speculative_configs": list(speculative_configs)}
    results = _run_for_result([sys.executable, "-m", "tests.engine_scenarios",
                               json.dumps(spec)], timeout)
    for config, result in zip(speculative_configs, results, strict=True):  # pytest -rP
        print((config or {}).get("method", "plain"), {
            name: round(s, 1) for name, s in result["seconds"].items()})
    return results


def computed_once(tmp_path_factory: pytest.TempPathFactory, name: str,
                  compute: Callable[[], dict]) -> dict:
    """compute() once per pytest run, shared by every xdist worker: the first worker to
    ask writes it as JSON into the run's common temporary folder under a lock, the others
    wait for it and read it. (A reference engine run several tests compare with.)"""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return compute()
    path = tmp_path_factory.getbasetemp().parent / f"{name}.json"
    with FileLock(f"{path}.lock"):
        if not path.is_file():
            path.write_text(json.dumps(compute()))
        return json.loads(path.read_text())


def _run_for_result(cmd: list[str], timeout: float,
                    env_extra: dict[str, str] | None = None):
    env = engine_env(**ENGINE_ENV, **(env_extra or {}))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=REPO_ROOT)
    result = result_from(proc.stdout)
    if result is not None:
        return result
    raise AssertionError(f"engine script failed ({proc.returncode}):\n{proc.stderr[-4000:]}")


# `vllm serve` without a separate worker process (the engine core runs the model itself):
# two vLLM imports where the default layout (API server, engine core, worker) pays three,
# ~17 s less per start. For tests whose subject is not that layout; the
# `--speculative-model` server test keeps the default.
IN_PROCESS = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def vllm_server(args: list[str], timeout: float = 240, in_process: bool = False):
    """`vllm serve ...` on a free loopback port with the test engine environment; yields
    (base_url, log_path)."""
    env = engine_env(VLLM_CPU_KVCACHE_SPACE="1", **(IN_PROCESS if in_process else {}))
    return server.vllm_server(args, env, timeout)


post_json = server.post_json
