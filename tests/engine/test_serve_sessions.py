"""Sessions through a plain `vllm serve` and the `openai` client (lminf_vllm/sessions.py).

One server for the module, transparent continuation on:

    vllm serve tests/assets/tiny-llama-L256 --attention-backend lminf \
        --additional-config '{"lminf": {"n_global": 32, "n_local": 128,
                                        "continuation": true}}'

Checked: a session started and continued through vllm_xargs; each refusal is the HTTP
status it stands for with a message naming the session (unknown or closed 404, busy 409,
other settings 400, malformed keys 400); explicit close frees the pages at once; a client
resending the whole history (token ids) continues the kept state; the session series on
/metrics.
"""

import os
import threading
import time

import openai
import pytest

from conftest import MODEL_DIR
from serving import serve

MODEL = str(MODEL_DIR)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    args = ["--attention-backend", "lminf", "--max-model-len", "1000000", "--dtype",
            "float32", "--max-num-seqs", "4", "--gpu-memory-utilization", "0.3",
            "--enforce-eager", "--block-size", "16", "--additional-config",
            '{"lminf": {"n_global": 32, "n_local": 128, "continuation": true}}']
    log = tmp_path_factory.mktemp("serve_sessions") / "server.log"
    with serve(MODEL_DIR, args, log, env) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0)


def complete(client, prompt, max_tokens=4, **xargs):
    return client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens,
                                     temperature=0,
                                     extra_body={"ignore_eos": True, "vllm_xargs": xargs})


def test_a_session_over_http(server, client, val_tokens):
    text = val_tokens[20_000:22_000].tolist()
    before = server.metrics()
    first = complete(client, text[:400], lminf_session="chat-1", lminf_session_new=True)
    assert first.choices[0].finish_reason == "length"
    second = complete(client, text[400:700], lminf_session="chat-1")
    assert second.usage.prompt_tokens == 300  # the client's own prompt: the new tokens
    values = server.metrics()
    assert values["lminf:sessions_held"] == before["lminf:sessions_held"] + 1
    adopted = (values["lminf:stream_tokens_adopted_total"]
               - before["lminf:stream_tokens_adopted_total"])
    assert adopted == 400 + 4 - 1, adopted

    with pytest.raises(openai.BadRequestError, match="chat-1.*lminf_n_local|lminf_n_local"):
        complete(client, text[700:710], lminf_session="chat-1", lminf_n_local=64)
    with pytest.raises(openai.NotFoundError) as unknown:
        complete(client, text[:10], lminf_session="no-such-session")
    assert "'no-such-session'" in str(unknown.value)
    assert "resend the full stream" in str(unknown.value)
    with pytest.raises(openai.BadRequestError, match="stop"):
        client.completions.create(model=MODEL, prompt=text[:10], max_tokens=2, stop=["x"],
                                  extra_body={"vllm_xargs": {"lminf_session": "chat-1"}})

    # a second request while one runs on the session: 409, the running one unharmed
    results = {}

    def long_turn():
        results["long"] = complete(client, text[700:1200], max_tokens=300,
                                   lminf_session="chat-1")

    runner = threading.Thread(target=long_turn)
    runner.start()
    time.sleep(1.0)  # the long turn is admitted first (300 tokens take seconds)
    conflict = None
    while runner.is_alive() and conflict is None:
        try:
            complete(client, text[1200:1210], lminf_session="chat-1")
        except openai.ConflictError as error:
            conflict = error
    runner.join()
    assert conflict is not None and "'chat-1' is busy" in str(conflict)
    assert results["long"].choices[0].finish_reason == "length"

    complete(client, text[1210:1220], lminf_session="chat-1", lminf_session_close=True)
    assert server.metrics()["lminf:sessions_held"] == before["lminf:sessions_held"]
    with pytest.raises(openai.NotFoundError, match="'chat-1' is closed"):
        complete(client, text[1220:1230], lminf_session="chat-1")


def test_a_client_resending_the_history_continues_the_state(server, client, val_tokens):
    history = val_tokens[30_000:30_500].tolist()
    before = server.metrics()["lminf:stream_tokens_adopted_total"]
    out = client.completions.create(model=MODEL, prompt=history, max_tokens=4, temperature=0,
                                    extra_body={"ignore_eos": True, "return_token_ids": True})
    generated = list(out.choices[0].token_ids)
    history = history + generated + val_tokens[31_000:31_200].tolist()
    complete(client, history)
    adopted = server.metrics()["lminf:stream_tokens_adopted_total"] - before
    assert adopted == 500 + 4 - 1, adopted
