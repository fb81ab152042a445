"""Chunked prefill with chunks smaller than the window (96 < n_local = 256) vs the oracle."""

import pytest
from vllm import LLM, SamplingParams

from engine_checks import LMINF_ORACLE_KWARGS, assert_close, engine_kwargs, prompt_logprobs
from conftest import MODEL_DIR
from oracle import Float64Llama

CHUNK_TOKENS = 96


@pytest.fixture(scope="module")
def llm():
    return LLM(**engine_kwargs(max_num_batched_tokens=CHUNK_TOKENS, max_num_seqs=4))


def test_chunked_prefill_matches_the_oracle(llm, val_tokens):
    prompts = [val_tokens[70_000:71_024].tolist(), val_tokens[90_000:90_300].tolist()]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(max_tokens=1, prompt_logprobs=0))
    model = Float64Llama(MODEL_DIR)
    for i, (prompt, out) in enumerate(zip(prompts, outs)):
        error = assert_close(prompt_logprobs(out),
                             model.prompt_logprobs(prompt, **LMINF_ORACLE_KWARGS),
                             f"request {i}, chunks of {CHUNK_TOKENS}")
        print(f"chunked prefill ({CHUNK_TOKENS}-token chunks), request {i}: "
              f"max |Δ logprob| = {error:.2e}")
