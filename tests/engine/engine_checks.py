"""Helpers shared by the engine tests: start an engine, read prompt logprobs, compare."""

import contextlib
import os

import numpy as np

from conftest import MODEL_DIR

# vLLM float32 (CPU) vs the float64 oracle over 6 layers and 1k tokens: measured 2e-5.
# transformers' float32 forward of the same model is off by up to 1.9e-4 at 2,048 tokens
# (model README), so 2e-4 is the float32 budget; a wrong position, page or mask moves
# logprobs by 1e-2 or more.
LOGPROB_ATOL = 2e-4

TINY_L = 256
LMINF_ORACLE_KWARGS = dict(mode="lminf", n_global=64, n_local=256, L=256, B=16)


@contextlib.contextmanager
def engine_core_in_process():
    """Engines built inside keep their EngineCore in this process
    (VLLM_ENABLE_V1_MULTIPROCESSING=0, read when an LLM is built), so that a test can read
    its scheduler and KV manager; the variable is restored afterwards."""
    name = "VLLM_ENABLE_V1_MULTIPROCESSING"
    previous = os.environ.get(name)
    os.environ[name] = "0"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name)
        else:
            os.environ[name] = previous


def engine_kwargs(**overrides):
    kwargs = dict(model=str(MODEL_DIR), attention_backend="lminf", dtype="float32",
                  gpu_memory_utilization=0.3, max_model_len=16 * TINY_L, max_num_seqs=8,
                  enforce_eager=True, seed=0)
    kwargs.update(overrides)
    return kwargs


def prompt_logprobs(request_output) -> np.ndarray:
    """log p(token i+1 | tokens 0..i) for i = 0..len-2, as the oracle lays them out."""
    rows = request_output.prompt_logprobs[1:]
    ids = request_output.prompt_token_ids[1:]
    return np.array([row[token].logprob for row, token in zip(rows, ids)])


def sampled_logprobs(request_output) -> np.ndarray:
    completion = request_output.outputs[0]
    return np.array([row[token].logprob
                     for row, token in zip(completion.logprobs, completion.token_ids)])


def assert_close(got: np.ndarray, expected: np.ndarray, what: str, offset: int = 0) -> float:
    assert got.shape == expected.shape, f"{what}: {got.shape} vs {expected.shape}"
    error = np.abs(got - expected)
    worst = int(error.argmax())
    assert error.max() < LOGPROB_ATOL, (
        f"{what}: max |Δ logprob| {error.max():.2e} at prediction {offset + worst} "
        f"(position {offset + worst}, page {(offset + worst) // 16})")
    return float(error.max())
