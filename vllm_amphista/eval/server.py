"""Start `vllm serve` on a free loopback port and talk JSON to it (benchmarks and tests)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def vllm_server(args: list[str], env: dict[str, str] | None = None, timeout: float = 240,
                log_dir: Path = Path("/tmp"), executable: Path | None = None,
                cwd: Path | None = None) -> Iterator[tuple[str, Path]]:
    """`vllm serve ARGS` (the `vllm` script beside this Python unless `executable`);
    yields (base_url, log_path) once /health answers, and stops the server on exit."""
    port = free_port()
    log = log_dir / f"vllm-amphista-server-{port}.log"
    cmd = [str(executable or Path(sys.executable).parent / "vllm"), "serve", *args,
           "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                                env=env if env is not None else dict(os.environ))
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"server not ready:\n{log.read_text()[-4000:]}") from None
                time.sleep(1)
        try:
            yield base, log
        except BaseException:
            # What the server said is the only clue to a failed request: show its end.
            sys.stderr.write(f"--- end of {log} ---\n{log.read_text()[-8000:]}\n")
            raise
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def worker_cores(log: str) -> int | None:
    """How many cores vLLM's CPU worker bound its OpenMP threads to, read from the
    server's own log ("local_rank=0, core ids=[0]"; vLLM 0.32 leaves a core to the front
    end unless VLLM_CPU_OMP_THREADS_BIND says otherwise), or None where the log does not
    say."""
    found = re.search(r"local_rank=0, core ids=\[([\d, ]*)\]", log)
    return len(found.group(1).split(",")) if found and found.group(1).strip() else None


def post_json(url: str, body: dict, timeout: float = 120) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def get_text(url: str, timeout: float = 30) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()
