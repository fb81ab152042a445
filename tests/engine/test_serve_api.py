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


# (vllm_xargs, what the 400's message must contain): each names the field and its range
BAD_SETTINGS = [
    ({"lminf_n_global": -1}, ("lminf_n_global=-1", f"[0, {N_GLOBAL}]")),
    ({"lminf_n_global": N_GLOBAL + 1}, (f"lminf_n_global={N_GLOBAL + 1}", f"[0, {N_GLOBAL}]")),
    ({"lminf_n_local": 0}, ("lminf_n_local=0", f"[1, {N_LOCAL}]")),
    ({"lminf_n_local": N_LOCAL + 1}, (f"lminf_n_local={N_LOCAL + 1}", f"[1, {N_LOCAL}]")),
    ({"lminf_n_local": "64"}, ("lminf_n_local='64' must be an integer", f"[1, {N_LOCAL}]")),
    ({"lminf_n_global": 8.5}, ("lminf_n_global=8.5 must be an integer", f"[0, {N_GLOBAL}]")),
    ({"lminf_window": 5}, ("'lminf_window'", "lminf_n_local")),
]


def test_bad_per_request_settings_get_a_400_each_while_seven_others_complete_unchanged(
        client, val_tokens):
    """Seven good requests (four narrowing n_global / n_local their own way) run alone
    first, then again concurrently with one request per bad value: each bad one gets a 400
    naming its field and range, each good one the same completion as alone. A narrowed
    request's logprobs match the oracle with its own values (the values arrive)."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from engine_checks import assert_close
    from oracle import Float64Llama

    narrowed = [None, {"lminf_n_local": 40}, {"lminf_n_global": 0}, None,
                {"lminf_n_global": 5, "lminf_n_local": 40}, None,
                {"lminf_n_global": 17, "lminf_n_local": 1}]
    prompts = [val_tokens[60_000 + 1000 * i:60_000 + 1000 * i + 300 + 50 * i].tolist()
               for i in range(len(narrowed))]

    def complete(prompt, xargs):
        body = {"ignore_eos": True, "return_tokens_as_token_ids": True}
        if xargs is not None:
            body["vllm_xargs"] = xargs
        try:
            return client.completions.create(model=MODEL, prompt=prompt, max_tokens=12,
                                             temperature=0, logprobs=0, extra_body=body)
        except openai.BadRequestError as error:
            return error

    alone = [complete(p, x) for p, x in zip(prompts, narrowed)]
    with ThreadPoolExecutor(len(prompts) + len(BAD_SETTINGS)) as pool:
        good = [pool.submit(complete, p, x) for p, x in zip(prompts, narrowed)]
        bad = [pool.submit(complete, prompts[0], x) for x, _ in BAD_SETTINGS]
        good, bad = [f.result() for f in good], [f.result() for f in bad]

    for (xargs, needles), error in zip(BAD_SETTINGS, bad):
        assert isinstance(error, openai.BadRequestError), (xargs, error)
        assert error.status_code == 400
        assert all(needle in error.message for needle in needles), (xargs, error.message)
    for i, (first, again) in enumerate(zip(alone, good)):
        assert not isinstance(first, Exception) and not isinstance(again, Exception), i
        assert again.choices[0].text == first.choices[0].text, f"request {i} ({narrowed[i]})"

    logprobs = alone[4].choices[0].logprobs
    generated = [int(t.split(":")[1]) for t in logprobs.tokens]
    expected = Float64Llama(MODEL_DIR).prompt_logprobs(
        prompts[4] + generated, mode="lminf", n_global=5, n_local=40, L=TINY_L, B=PAGE)
    assert_close(np.array(logprobs.token_logprobs), expected[len(prompts[4]) - 1:],
                 "served completion with lminf_n_global=5, lminf_n_local=40",
                 offset=len(prompts[4]) - 1)


def test_a_nested_per_request_value_gets_vllms_own_400(client):
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=2,
                                  extra_body={"vllm_xargs": {"lminf": {"n_local": 8}}})
    assert raised.value.status_code == 400 and "vllm_xargs" in raised.value.message
