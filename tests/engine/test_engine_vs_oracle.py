"""The tiny model in a real vLLM engine with lminf vs the float64 oracle (DESIGN §2).

One engine for the module, prefilling a 1,024-token prompt (4L) in one chunk; a second
module (test_chunked_prefill.py) covers chunks smaller than the window.
"""

import numpy as np
import pytest
from vllm import LLM, SamplingParams

from engine_checks import (LMINF_ORACLE_KWARGS, assert_close, engine_kwargs, prompt_logprobs,
                           sampled_logprobs)
from conftest import MODEL_DIR
from oracle import Float64Llama

PROMPT_TOKENS = 1024


@pytest.fixture(scope="module")
def llm():
    # The per-request chunk cap defaults to n_local; lift it so the prompt is one chunk.
    return LLM(**engine_kwargs(max_num_batched_tokens=2048, additional_config={
        "lminf": {"max_prefill_chunk_tokens": 2048}}))


@pytest.fixture(scope="module")
def oracle_model():
    return Float64Llama(MODEL_DIR)


@pytest.fixture(scope="module")
def long_prompt(val_tokens):
    return val_tokens[40_000:40_000 + PROMPT_TOKENS].tolist()


def test_one_chunk_prefill_matches_the_oracle(llm, oracle_model, long_prompt):
    out = llm.generate([{"prompt_token_ids": long_prompt}],
                       SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    expected = oracle_model.prompt_logprobs(long_prompt, **LMINF_ORACLE_KWARGS)
    error = assert_close(prompt_logprobs(out), expected, "one-chunk prefill")
    print(f"one-chunk prefill, {PROMPT_TOKENS} tokens: max |Δ logprob| = {error:.2e}")


def test_decode_matches_the_oracle(llm, oracle_model, long_prompt):
    out = llm.generate([{"prompt_token_ids": long_prompt}],
                       SamplingParams(max_tokens=48, temperature=0, logprobs=0,
                                      ignore_eos=True))[0]
    generated = list(out.outputs[0].token_ids)
    expected = oracle_model.prompt_logprobs(long_prompt + generated, **LMINF_ORACLE_KWARGS)
    error = assert_close(sampled_logprobs(out), expected[PROMPT_TOKENS - 1:], "decode",
                         offset=PROMPT_TOKENS - 1)
    print(f"decode, 48 tokens after {PROMPT_TOKENS}: max |Δ logprob| = {error:.2e}")


def test_batch_with_short_requests_matches_each_alone(llm, oracle_model, long_prompt,
                                                      val_tokens):
    rng = np.random.default_rng(0)
    shorts = [val_tokens[s:s + n].tolist()
              for s, n in zip(rng.integers(0, 100_000, 5), [3, 17, 64, 255, 300])]
    prompts = [long_prompt] + shorts
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(max_tokens=8, prompt_logprobs=0, temperature=0,
                                       logprobs=0, ignore_eos=True))
    for i, (prompt, out) in enumerate(zip(prompts, outs)):
        full = prompt + list(out.outputs[0].token_ids)
        expected = oracle_model.prompt_logprobs(full, **LMINF_ORACLE_KWARGS)
        assert_close(prompt_logprobs(out), expected[: len(prompt) - 1], f"request {i} prompt")
        assert_close(sampled_logprobs(out), expected[len(prompt) - 1:], f"request {i} decode",
                     offset=len(prompt) - 1)
