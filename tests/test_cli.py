"""The command line's engine environment: the commands that fork vLLM engines from their own
process restart under the served preload and malloc settings (they reach only processes
started after they are set)."""

from __future__ import annotations

import sys

import pytest

from vllm_amphista import cli, engine
from vllm_amphista.eval import bench


class Restarted(Exception):
    pass


USER_MALLOC = {"MALLOC_TRIM_THRESHOLD_": "0"}  # one of ours, set by the user: theirs wins


@pytest.mark.parametrize("command, user_env, restarts", [
    (["demo"], {}, True),
    (["calibrate", "--dtype", "bfloat16"], {}, True),
    (["demo"], {"LD_PRELOAD": ""}, True),  # GNU OpenMP kept, the malloc settings added
    (["demo"], {"LD_PRELOAD": "", **USER_MALLOC}, False),  # all the user's from the start
    (["demo"], {"LD_PRELOAD": "/opt/libtcmalloc.so", **USER_MALLOC}, False),
    (["bench"], {}, False),  # its engines are `vllm serve` processes it starts
])
def test_commands_forking_engines_restart_under_the_served_settings(
        command, user_env, restarts, monkeypatch, tmp_path):
    for key in (*engine.PROCESS_START_SETTINGS, *USER_MALLOC, "VLLM_CPU_OMP_THREADS_BIND",
                "VLLM_CPU_KVCACHE_SPACE"):
        monkeypatch.delenv(key, raising=False)  # restored after the test
    for key, value in user_env.items():
        monkeypatch.setenv(key, value)
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
        assert ran == [] and engine.os.environ["LD_PRELOAD"] == user_env.get(
            "LD_PRELOAD", str(tmp_path / "libiomp5.so"))
    else:
        assert cli.main() == 0 and executed == [] and ran == [command[0]]
    for key in engine.PROCESS_START_SETTINGS:
        monkeypatch.delenv(key, raising=False)
    cli.main(command)  # called with arguments (from Python): never restarts
    assert len(executed) == int(restarts)
