"""The tiny model in a real vLLM engine with lminf vs the float64 oracle (DESIGN §2).

One engine for the module, prefilling a 1,024-token prompt (4L) in one chunk; a second
module (test_chunked_prefill.py) covers chunks smaller than the window. Per-request
settings (extra_args lminf_n_global / lminf_n_local) are checked here too, each request
against the oracle with its own values.
"""

import numpy as np
import pytest
from vllm import LLM, SamplingParams
from vllm.exceptions import VLLMValidationError

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


def test_per_request_settings_in_one_mixed_batch_match_their_own_oracles(
        llm, oracle_model, long_prompt, val_tokens):
    """Each request narrows n_global / n_local its own way (extra_args, request_settings.py)
    in one batch: the long prompt twice (the engine's values and narrowed ones), shorter
    prompts with a window of one or none pinned. Prompt and decode logprobs of each match
    the oracle with that request's values, so no row got another's."""
    settings = [None, (0, 100), (17, 200), (5, 1), (64, 37)]
    prompts = [long_prompt, long_prompt, val_tokens[7_000:7_300].tolist(),
               val_tokens[9_000:9_064].tolist(), val_tokens[11_000:11_500].tolist()]
    params = [SamplingParams(max_tokens=8, prompt_logprobs=0, temperature=0, logprobs=0,
                             ignore_eos=True,
                             extra_args=None if s is None else {"lminf_n_global": s[0],
                                                                "lminf_n_local": s[1]})
              for s in settings]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    errors = []
    for i, (prompt, out, s) in enumerate(zip(prompts, outs, settings)):
        kwargs = dict(LMINF_ORACLE_KWARGS)
        if s is not None:
            kwargs.update(n_global=s[0], n_local=s[1])
        full = prompt + list(out.outputs[0].token_ids)
        expected = oracle_model.prompt_logprobs(full, **kwargs)
        what = f"request {i} (n_global={kwargs['n_global']}, n_local={kwargs['n_local']})"
        errors.append(assert_close(prompt_logprobs(out), expected[: len(prompt) - 1],
                                   f"{what} prompt"))
        errors.append(assert_close(sampled_logprobs(out), expected[len(prompt) - 1:],
                                   f"{what} decode", offset=len(prompt) - 1))
    # the narrowed long prompt really differs from the engine's (the check can fail)
    assert np.abs(prompt_logprobs(outs[0]) - prompt_logprobs(outs[1])).max() > 1e-2
    print(f"per-request settings, {len(prompts)} requests in one batch: max |Δ logprob| = "
          f"{max(errors):.2e}")


def test_a_bad_per_request_value_fails_that_call_and_the_engine_keeps_serving(llm):
    with pytest.raises(VLLMValidationError, match=r"lminf_n_local=257 is outside the "
                                                  r"allowed range \[1, 256\]"):
        llm.generate([{"prompt_token_ids": [1, 2, 3]}],
                     SamplingParams(max_tokens=1, extra_args={"lminf_n_local": 257}))
    out = llm.generate([{"prompt_token_ids": [1, 2, 3]}],
                       SamplingParams(max_tokens=2, extra_args={"lminf_n_local": 8}))[0]
    assert len(out.outputs[0].token_ids) == 2
