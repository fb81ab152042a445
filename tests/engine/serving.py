"""A real `vllm serve` on a free loopback port, and its Prometheus text, for the serve tests.

Used by tests/engine/test_serve*.py (one server per module) and bench/bench_soak.py.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

# 30-110 s on 2 shared cores, more while other engines start beside it
STARTUP_SECONDS = 300
SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(?:\{([^}]*)\})? ([0-9.e+-]+|NaN)$", re.M)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_command() -> str:
    """The `vllm` script of the interpreter running the tests (the one CI installed)."""
    command = shutil.which("vllm", path=str(Path(sys.executable).parent))
    if command is None:
        raise FileNotFoundError(f"no `vllm` command beside {sys.executable}")
    return command


@dataclass
class Server:
    base: str  # http://127.0.0.1:PORT
    log: Path
    process: subprocess.Popen

    def metrics(self) -> dict[str, float]:
        """/metrics as {series name: value}, summed over label sets."""
        with urllib.request.urlopen(self.base + "/metrics", timeout=30) as response:
            return parse_metrics(response.read().decode())


def parse_metrics(text: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for name, _, value in SAMPLE.findall(text):
        values[name] = values.get(name, 0.0) + float(value)
    return values


@contextlib.contextmanager
def serve(model: str | Path, args: Sequence[str], log: Path, env: dict[str, str],
          startup_seconds: float = STARTUP_SECONDS) -> Iterator[Server]:
    """Run `vllm serve MODEL ARGS` on 127.0.0.1 until /health answers; stop it on exit."""
    port = free_port()
    with open(log, "w") as log_file:
        process = subprocess.Popen(
            [vllm_command(), "serve", str(model), *args, "--host", "127.0.0.1",
             "--port", str(port)],
            stdout=log_file, stderr=subprocess.STDOUT, env=env)
    server = Server(f"http://127.0.0.1:{port}", log, process)
    try:
        deadline = time.time() + startup_seconds
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {process.returncode}:\n"
                                   + log.read_text()[-4000:])
            try:
                with urllib.request.urlopen(server.base + "/health", timeout=2):
                    break
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError("vllm serve did not come up:\n"
                                       + log.read_text()[-4000:])
                time.sleep(2)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
