"""A plain `vllm serve` (no PROMETHEUS_MULTIPROC_DIR) through the `openai` client.

One server for the module, started as a user would:

    vllm serve tests/assets/tiny-llama-L256 --attention-backend lminf \
        --max-model-len 1000000 --chat-template tests/assets/tiny-chat-template.jinja \
        --additional-config '{"lminf": {"n_global": 32, "n_local": 128,
                                        "max_prefill_chunk_tokens": 64}}'

(the tiny model ships no chat template, hence --chat-template). A small window makes the
ring (G = 2 pinned pages, R = 13 ring pages of 16 tokens) wrap many times in a short
stream. Checked: every lminf series is on /metrics beside vLLM's and moves during a long
stream and back; chat and completions, streamed and not, far past L = 256; a client that
disconnects mid-stream or gives up on a request returns every page, and serving goes on.
"""

import os
import threading
import time

import openai
import pytest

from conftest import MODEL_DIR, REPO
from engine_checks import TINY_L
from serving import serve

from lminf_vllm.config import LMInfConfig

N_GLOBAL, N_LOCAL, CHUNK, PAGE = 32, 128, 64, 16
RING = LMInfConfig(n_global=N_GLOBAL, n_local=N_LOCAL, trained_length=TINY_L,
                   page_size=PAGE, max_prefill_chunk_tokens=CHUNK)
MODEL = str(MODEL_DIR)
CHAT_TEMPLATE = REPO / "tests" / "assets" / "tiny-chat-template.jinja"
LMINF_SERIES = ("lminf:pages_pinned", "lminf:ring_pages", "lminf:ring_pages_overwritten_total",
                "lminf:tokens_past_trained_length_total", "lminf:requests_past_trained_length")
LEVELS = ("lminf:pages_pinned", "lminf:ring_pages", "lminf:requests_past_trained_length",
          "vllm:num_requests_running", "vllm:kv_cache_usage_perc")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    additional = ('{"lminf": {"n_global": %d, "n_local": %d, "max_prefill_chunk_tokens": %d}}'
                  % (N_GLOBAL, N_LOCAL, CHUNK))
    args = ["--attention-backend", "lminf", "--max-model-len", "1000000", "--dtype",
            "float32", "--max-num-seqs", "4", "--gpu-memory-utilization", "0.3",
            "--enforce-eager", "--block-size", str(PAGE), "--chat-template",
            str(CHAT_TEMPLATE), "--additional-config", additional]
    log = tmp_path_factory.mktemp("serve_api") / "server.log"
    with serve(MODEL_DIR, args, log, env) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def long_text(val_tokens):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL).decode(val_tokens[140_000:141_200].tolist())


def wait_until_idle(server, seconds=60):
    """The levels once no request is live: every lminf page back, the block pool empty."""
    deadline = time.time() + seconds
    while True:
        values = server.metrics()
        if all(values[name] == 0 for name in LEVELS) or time.time() > deadline:
            return {name: values[name] for name in LEVELS}
        time.sleep(0.5)


def test_every_lminf_series_is_on_metrics_beside_vllms(server):
    values = server.metrics()
    assert all(name in values for name in LMINF_SERIES), sorted(values)
    assert sum(name.startswith("vllm:") for name in values) > 20
    assert "PROMETHEUS_MULTIPROC_DIR" not in server.log.read_text()


def test_series_move_during_a_long_stream_and_come_back(server, client, val_tokens):
    prompt, max_tokens = val_tokens[150_000:150_600].tolist(), 800
    before = server.metrics()
    samples, streaming = [], threading.Event()
    streaming.set()

    def sample_metrics():
        while streaming.is_set():
            samples.append(server.metrics())
            time.sleep(0.3)

    sampler = threading.Thread(target=sample_metrics)
    sampler.start()
    try:
        stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens,
                                           temperature=0, stream=True,
                                           stream_options={"include_usage": True},
                                           extra_body={"ignore_eos": True})
        usage = [chunk.usage for chunk in stream][-1]
    finally:
        streaming.clear()
        sampler.join()
    assert usage.completion_tokens == max_tokens
    during = samples[1:-1]
    assert max(s["lminf:ring_pages"] for s in during) == RING.num_ring_pages
    assert max(s["lminf:pages_pinned"] for s in during) == RING.num_pinned_pages
    assert max(s["lminf:requests_past_trained_length"] for s in during) == 1
    overwritten = [s["lminf:ring_pages_overwritten_total"] for s in samples]
    assert overwritten == sorted(overwritten) and len(set(overwritten)) >= 3, overwritten

    assert wait_until_idle(server) == dict.fromkeys(LEVELS, 0)
    after = server.metrics()
    # the last sampled token is never written to the cache
    slots = len(prompt) + max_tokens - 1
    pages_per_request = RING.num_pinned_pages + RING.num_ring_pages
    assert (after["lminf:ring_pages_overwritten_total"]
            - before["lminf:ring_pages_overwritten_total"]) == -(-slots // PAGE) - pages_per_request
    assert (after["lminf:tokens_past_trained_length_total"]
            - before["lminf:tokens_past_trained_length_total"]) == slots - TINY_L


def test_chat_streamed_and_not_far_past_l(client, long_text):
    messages = [{"role": "system", "content": "Continue the story."},
                {"role": "user", "content": long_text}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24,
                                           temperature=0)
    assert whole.usage.prompt_tokens > 4 * TINY_L
    assert whole.choices[0].finish_reason == "length" and whole.choices[0].message.content
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24,
                                            temperature=0, stream=True)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream
                       if chunk.choices)
    assert streamed == whole.choices[0].message.content


def test_completions_streamed_and_not_far_past_l(client, val_tokens):
    prompt = val_tokens[100_000:103_000].tolist()  # 12 L
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16,
                                      temperature=0, extra_body={"ignore_eos": True})
    assert whole.usage.prompt_tokens == len(prompt) and whole.choices[0].text
    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16,
                                       temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    assert "".join(chunk.choices[0].text for chunk in stream) == whole.choices[0].text


def test_a_disconnect_mid_stream_returns_every_page(server, client, val_tokens):
    stream = client.completions.create(model=MODEL, prompt=val_tokens[110_000:111_000].tolist(),
                                       max_tokens=20_000, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    for received, _ in enumerate(stream):
        if received == 50:
            break
    assert server.metrics()["lminf:ring_pages"] == RING.num_ring_pages
    stream.close()  # the client goes away: the server aborts the request
    assert wait_until_idle(server) == dict.fromkeys(LEVELS, 0)
    again = client.completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=4)
    assert again.choices[0].finish_reason in ("length", "stop")


def test_a_client_that_gives_up_returns_every_page(server, client, val_tokens):
    impatient = client.with_options(timeout=8)
    with pytest.raises(openai.APITimeoutError):
        impatient.completions.create(model=MODEL, prompt=val_tokens[112_000:113_000].tolist(),
                                     max_tokens=20_000, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert wait_until_idle(server) == dict.fromkeys(LEVELS, 0)
    again = client.completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=4)
    assert again.choices[0].finish_reason in ("length", "stop")
