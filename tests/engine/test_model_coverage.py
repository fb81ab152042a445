"""Every RoPE family vLLM serves, in a real engine with lminf, against the float64 oracle.

One engine per family (model_families.FAMILIES: random weights, 2 layers, trained length
L = 64) scores a 300-token prompt (~4.7 L, so the middle is evicted and far keys are held at
the distance limit) and greedily decodes 8 tokens; prompt and sampled log-probabilities
must match the oracle (tests/oracle.py: transformers' architecture in float64 with DESIGN §2
attention, RoPE from the table vLLM serves) within the float32 budget. L is the config's
original trained length, stated here independently of lminf's own default. Each case also
checks that the oracle's lminf and dense log-probabilities differ far beyond the tolerance
past L, so the comparison could fail.

Families lminf cannot serve fail at startup naming the reason (no engine is started).
"""

import numpy as np
import pytest
from vllm import LLM, SamplingParams
from vllm.engine.arg_utils import EngineArgs

from engine_checks import LOGPROB_ATOL, assert_close, prompt_logprobs, sampled_logprobs
from lminf_vllm.config import LMInfConfigError
from model_families import FAMILIES, TRAINED_LENGTH, VOCAB_SIZE, make_checkpoint
from oracle import Float64HFModel

PROMPT_TOKENS = 300
DECODE_TOKENS = 8
N_GLOBAL = 16
PAGE_SIZE = 16  # lminf's automatic choice for L = 64 (and the smallest it picks)


@pytest.fixture(scope="module")
def prompt():
    rng = np.random.default_rng(0)
    return rng.integers(2, VOCAB_SIZE, PROMPT_TOKENS).tolist()


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_family_matches_the_oracle_past_the_trained_length(family, prompt, tmp_path):
    model_dir = make_checkpoint(family, tmp_path / "model")
    llm = LLM(model=str(model_dir), attention_backend="lminf", dtype="float32",
              skip_tokenizer_init=True, enforce_eager=True, gpu_memory_utilization=0.3,
              max_model_len=512, max_num_seqs=2, seed=0,
              additional_config={"lminf": {"n_global": N_GLOBAL}})
    try:
        assert llm.llm_engine.vllm_config.cache_config.block_size == PAGE_SIZE
        out = llm.generate([{"prompt_token_ids": prompt}],
                           SamplingParams(max_tokens=DECODE_TOKENS, temperature=0,
                                          prompt_logprobs=0, logprobs=0, ignore_eos=True,
                                          detokenize=False))[0]
    finally:
        llm.llm_engine.engine_core.shutdown()

    length = family.trained_length()
    oracle = Float64HFModel(model_dir)
    tokens = prompt + list(out.outputs[0].token_ids)
    window = dict(n_global=N_GLOBAL, n_local=length, L=length, B=PAGE_SIZE)
    expected = oracle.prompt_logprobs(tokens, mode="lminf", **window)
    dense = oracle.prompt_logprobs(tokens, mode="dense", **window)
    sensitivity = np.abs(expected - dense)[length:].max()
    assert sensitivity > 100 * LOGPROB_ATOL, (
        f"{family.name}: lminf and dense differ by only {sensitivity:.1e} past L; the model "
        "is too flat for this comparison to detect a wrong distance")

    error = assert_close(prompt_logprobs(out), expected[:PROMPT_TOKENS - 1],
                         f"{family.name} prompt")
    error = max(error, assert_close(sampled_logprobs(out), expected[PROMPT_TOKENS - 1:],
                                    f"{family.name} decode", offset=PROMPT_TOKENS - 1))
    print(f"{family.name}: L {length}, max |Δ logprob| {error:.1e} "
          f"(lminf vs dense past L: {sensitivity:.2f})")


UNSERVABLE = [
    ("phi3", dict(rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                   "short_factor": [1.0] * 16, "long_factor": [2.0] * 16,
                                   "original_max_position_embeddings": TRAINED_LENGTH},
                  max_position_embeddings=4 * TRAINED_LENGTH, sliding_window=None,
                  hidden_size=128, num_attention_heads=4),  # head 32: 16 factors each
     "RoPE type 'longrope' is not supported"),
    ("mistral", dict(sliding_window=32), "own sliding window"),
    ("gpt2", dict(n_embd=128, n_layer=2, n_head=4, n_positions=TRAINED_LENGTH),
     "no RoPE parameters"),
]


@pytest.mark.parametrize("model_type,config,reason", UNSERVABLE,
                         ids=[u[0] for u in UNSERVABLE])
def test_unservable_family_fails_at_startup_naming_the_reason(model_type, config, reason,
                                                              tmp_path):
    from transformers import AutoConfig

    AutoConfig.for_model(model_type, vocab_size=VOCAB_SIZE, **config).save_pretrained(tmp_path)
    with pytest.raises(LMInfConfigError, match=reason):
        EngineArgs(model=str(tmp_path), attention_backend="lminf", dtype="float32",
                   skip_tokenizer_init=True).create_engine_config()

