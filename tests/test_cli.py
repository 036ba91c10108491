"""The command line's engine environment: the commands that fork vLLM engines from their own
process restart under the served preload (LD_PRELOAD reaches only processes started after
it is set)."""

from __future__ import annotations

import sys

import pytest

from vllm_amphista import cli, engine
from vllm_amphista.eval import bench


class Restarted(Exception):
    pass


@pytest.mark.parametrize("command, user_preload, restarts", [
    (["demo"], None, True),
    (["calibrate", "--dtype", "bfloat16"], None, True),
    (["demo"], "", False),  # the user keeps GNU OpenMP
    (["demo"], "/opt/libtcmalloc.so", False),  # the user's preload, in place from the start
    (["bench"], None, False),  # its engines are `vllm serve` processes it starts
])
def test_commands_forking_engines_restart_under_the_served_preload(
        command, user_preload, restarts, monkeypatch, tmp_path):
    for key in ("LD_PRELOAD", "VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_KVCACHE_SPACE"):
        monkeypatch.delenv(key, raising=False)  # restored after the test
    if user_preload is not None:
        monkeypatch.setenv("LD_PRELOAD", user_preload)
    monkeypatch.setattr(engine, "intel_openmp", lambda: tmp_path / "libiomp5.so")
    monkeypatch.setattr(sys, "argv", ["vllm-amphista", *command])
    executed: list[list[str]] = []

    def execv(path: str, argv: list[str]) -> None:
        executed.append(argv)
        raise Restarted

    monkeypatch.setattr(engine.os, "execv", execv)
    ran = []
    for name in ("_demo", "_calibrate"):
        monkeypatch.setattr(cli, name, lambda args: ran.append(args.command) or 0)
    monkeypatch.setattr(bench, "main", lambda args: ran.append(args.command) or 0)
    if restarts:
        with pytest.raises(Restarted):
            cli.main()
        assert executed == [[sys.executable, "-m", "vllm_amphista.cli", *command]]
        assert ran == [] and engine.os.environ["LD_PRELOAD"] == str(tmp_path / "libiomp5.so")
    else:
        assert cli.main() == 0 and executed == [] and ran == [command[0]]
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    cli.main(command)  # called with arguments (from Python): never restarts
    assert len(executed) == int(restarts)
