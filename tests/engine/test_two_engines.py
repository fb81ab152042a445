"""Three engines alive in one process see only their own state (issue #14 item 7).

VLLM_ENABLE_V1_MULTIPROCESSING=0 keeps every EngineCore and its model in this process, so
what vLLM caches process-wide (get_rope's module cache, the CustomOp registry, the
backend class) is shared by them:

* A: the tiny model with LMINF (n_global = 64, n_local = 256, B = 16, L = 256);
* B: a second, random-weight Llama made here from a config (head size 32, L = 128) with
  other LMINF settings (n_global = 16, n_local = 64, B = 32);
* C: the tiny model with vLLM's own attention backend.

Each engine's prompt logprobs match the float64 oracle with its own settings, after all
three were built; A gives the same logprobs before and after B and C exist. A module
built for one engine's page size or trained length and reused by another would move
logprobs by far more than the tolerance (and C would see page-local positions).
"""


import numpy as np
import pytest
from vllm import LLM, SamplingParams

from conftest import MODEL_DIR
from engine_checks import assert_close, engine_core_in_process, prompt_logprobs
from oracle import Float64Llama
from random_llama import random_llama

KV_CACHE_BYTES = 256 << 20  # per engine: three engines share the machine
A = dict(n_global=64, n_local=256, L=256, B=16)
B = dict(n_global=16, n_local=64, L=128, B=32)
SECOND_MODEL = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=32, intermediate_size=256, num_hidden_layers=2,
                    max_position_embeddings=B["L"])


def start(model, max_model_len=4096, **kwargs):
    return LLM(str(model), dtype="float32", max_model_len=max_model_len, max_num_seqs=4,
               max_num_batched_tokens=1024, enforce_eager=True, seed=0,
               kv_cache_memory_bytes=KV_CACHE_BYTES, **kwargs)


def lminf(settings, **extra):
    return dict(attention_backend="lminf", block_size=settings["B"], additional_config={
        "lminf": {"n_global": settings["n_global"], "n_local": settings["n_local"],
                  "max_prefill_chunk_tokens": 1024, **extra}})


def logprobs_of(llm, prompt):
    out = llm.generate([{"prompt_token_ids": prompt}],
                       SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    return prompt_logprobs(out)


@pytest.fixture(scope="module")
def prompts(val_tokens):
    return {"A": val_tokens[10_000:10_700].tolist(),   # past 2L of the tiny model
            "B": val_tokens[20_000:20_500].tolist(),   # past 3L of the second model
            "C": val_tokens[30_000:30_200].tolist()}   # within L: plain attention


@pytest.fixture(scope="module")
def engines(tmp_path_factory, prompts):
    second = random_llama(tmp_path_factory.mktemp("second-model"), **SECOND_MODEL)
    with engine_core_in_process():
        a = start(MODEL_DIR, **lminf(A))
        a_alone = logprobs_of(a, prompts["A"])
        b = start(second, **lminf(B))
        c = start(MODEL_DIR, max_model_len=A["L"])
    yield {"A": a, "B": b, "C": c, "second": second, "a_alone": a_alone}


def test_first_engine_matches_its_oracle_with_the_others_alive(engines, prompts):
    got = logprobs_of(engines["A"], prompts["A"])
    np.testing.assert_array_equal(got, engines["a_alone"])
    expected = Float64Llama(MODEL_DIR).prompt_logprobs(prompts["A"], mode="lminf", **A)
    assert_close(got, expected, "engine A (tiny model, B = 16, L = 256)")


def test_second_engine_matches_its_oracle(engines, prompts):
    got = logprobs_of(engines["B"], prompts["B"])
    expected = Float64Llama(engines["second"]).prompt_logprobs(prompts["B"], mode="lminf",
                                                               **B)
    assert_close(got, expected, "engine B (second model, B = 32, L = 128)")


def test_stock_engine_sees_no_lminf_state(engines, prompts):
    got = logprobs_of(engines["C"], prompts["C"])
    expected = Float64Llama(MODEL_DIR).prompt_logprobs(prompts["C"], mode="dense")
    assert_close(got, expected, "engine C (stock attention)")
