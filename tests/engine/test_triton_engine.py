"""The Triton kernels inside a real vLLM engine, on the CPU, under the Triton interpreter.

additional_config.lminf.attention_impl = "triton" makes the CPU engine run the decode and
prefill kernels instead of the PyTorch reference; TRITON_INTERPRET=1 has to be set before
anything imports triton (vLLM does at startup), so under a plain pytest run this module
holds one test that runs the module again in a fresh interpreter with it set, where the
real test below starts the engine (its core in the same process, so the test counts the
kernel launches). The interpreter executes every kernel program in Python, so the stream
is short: a 320-token prompt (past L = 256) in 64-token chunks, then 16 decode steps,
against the float64 oracle.
"""

import os
import subprocess
import sys

import pytest

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
PROMPT_TOKENS = 320
CHUNK_TOKENS = 64
DECODE_TOKENS = 16
NUM_LAYERS = 6

if not INTERPRETED:
    def test_the_engine_under_the_triton_interpreter():
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", __file__],
            env={**os.environ, "TRITON_INTERPRET": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
            capture_output=True, text=True,
            cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
        print("\n".join(line for line in result.stdout.splitlines()
                        if line.startswith("triton in the engine")))
else:
    from vllm import LLM, SamplingParams

    from conftest import MODEL_DIR
    from engine_checks import (LMINF_ORACLE_KWARGS, assert_close, engine_kwargs,
                               prompt_logprobs, sampled_logprobs)
    from oracle import Float64Llama

    @pytest.fixture(scope="module")
    def launches():
        """Calls of each kernel launcher while the module's engine runs."""
        from lminf_vllm.attention import triton_decode, triton_prefill

        counts = {"decode": 0, "prefill": 0}
        with pytest.MonkeyPatch.context() as patch:
            for name, module in (("decode", triton_decode), ("prefill", triton_prefill)):
                def counted(*args, _launch=module.attend_group, _name=name, **kwargs):
                    counts[_name] += 1
                    return _launch(*args, **kwargs)
                patch.setattr(module, "attend_group", counted)
            yield counts

    @pytest.fixture(scope="module")
    def llm(launches):
        return LLM(**engine_kwargs(max_num_batched_tokens=CHUNK_TOKENS, max_num_seqs=2,
                                   max_model_len=2 * PROMPT_TOKENS,
                                   additional_config={"lminf": {"attention_impl": "triton"}}))

    def test_chunked_prefill_and_decode_past_l_match_the_oracle(llm, launches, val_tokens):
        launches.update(decode=0, prefill=0)
        prompt = val_tokens[50_000:50_000 + PROMPT_TOKENS].tolist()
        out = llm.generate([{"prompt_token_ids": prompt}],
                           SamplingParams(max_tokens=DECODE_TOKENS, temperature=0,
                                          prompt_logprobs=0, logprobs=0,
                                          ignore_eos=True))[0]
        generated = list(out.outputs[0].token_ids)
        expected = Float64Llama(MODEL_DIR).prompt_logprobs(prompt + generated,
                                                           **LMINF_ORACLE_KWARGS)
        prefill = assert_close(prompt_logprobs(out), expected[: PROMPT_TOKENS - 1],
                               f"prefill in {CHUNK_TOKENS}-token chunks")
        decode = assert_close(sampled_logprobs(out), expected[PROMPT_TOKENS - 1:], "decode",
                              offset=PROMPT_TOKENS - 1)
        # every layer of the 5 chunks ran the prefill kernel, and of the 15 steps after the
        # prompt the decode kernel
        assert launches["prefill"] == NUM_LAYERS * PROMPT_TOKENS // CHUNK_TOKENS, launches
        assert launches["decode"] == NUM_LAYERS * (DECODE_TOKENS - 1), launches
        print(f"triton in the engine (interpreter): kernel launches {launches}; prefill "
              f"max |Δ logprob| {prefill:.2e}, decode max |Δ logprob| {decode:.2e}")
