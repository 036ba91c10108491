"""What every measurement script leaves: a JSON file that names the machine it was
measured on, and a markdown table under one line that names it too."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vllm_amphista.machine import cpu_label, describe


def write_report(path: str | Path, report: dict, machine: dict | None = None) -> None:
    """`report` as JSON, with the machine (default: machine.describe()) first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine or describe(), **report}, indent=2) + "\n")


def machine_line(machine: dict | None = None, **dtypes: str) -> str:
    """The line above a printed table: the CPU, its bf16 flags, cores, torch threads, the
    OpenMP (where recorded) and the dtypes given (machine_line(target="float32",
    draft="float32")), of `machine` (default: machine.describe())."""
    machine = machine or describe()
    gpu = f", GPU {machine['gpu']}" if machine["gpu"] else ""
    openmp = f", {machine['openmp']} OpenMP" if machine.get("openmp") else ""
    named = "".join(f"; {name} {str(value).removeprefix('torch.')}"
                    for name, value in dtypes.items())
    return (f"{cpu_label(machine)}, {machine['cores']} cores, "
            f"{machine['torch_threads'] or '?'} torch threads{openmp}{gpu}{named}")


RESULT_MARKER = "RESULT "


def print_result(value: Any) -> None:
    """What a child process hands its parent: `value` as JSON after RESULT_MARKER, on
    one line, flushed at once (read back with result_from)."""
    print(RESULT_MARKER + json.dumps(value), flush=True)


def result_from(stdout: str) -> Any:
    """The JSON value a child process printed after `RESULT ` (the last one), or None.
    vLLM's engine and worker processes log to the same stdout and can write into that
    line (seen: a TP worker's log line glued after the JSON), so the value is read up to
    its own end, not the line's."""
    start = stdout.rfind(RESULT_MARKER)
    if start < 0:
        return None
    value, _ = json.JSONDecoder().raw_decode(stdout, start + len(RESULT_MARKER))
    return value


def markdown_table(columns: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def parse_unless_child(parser: argparse.ArgumentParser, argv: list[str] | None,
                       run: Callable[..., Any]) -> argparse.Namespace | None:
    """The child's half of run_child: parse argv with `parser` and the hidden `--one`;
    where `--one` carried a job (JSON), run it, hand its value back with print_result and
    return None, else the parsed arguments."""
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: JSON job for a child
    args = parser.parse_args(argv)
    if args.one is None:
        return args
    print_result(run(**json.loads(args.one)))
    return None


def run_child(module: str, job: dict, env: dict[str, str] | None = None) -> Any:
    """`python -m <module> --one <job as JSON>` in a fresh Python (vLLM's CPU build starts
    one engine a process): the value it handed back with print_result, or None, the
    child's stderr then printed. env: the child's (default: this one's, without
    TRITON_INTERPRET)."""
    if env is None:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", module, "--one", json.dumps(job)],
                          capture_output=True, text=True, env=env)
    result = result_from(proc.stdout)
    if result is None:
        print(proc.stderr[-4000:], file=sys.stderr)
    return result
