"""Receptive-field prefill in a real engine: skipping the middle of a prompt changes nothing.

A request without prompt logprobs computes its global prefix (its first chunk) and its tail
from `receptive_field.request_tail_start`; the same prompt with prompt logprobs computes
every token. Their greedy outputs and sampled logprobs must agree within the engine
tolerance, at 4L (nothing to skip), at the shortest prompt that skips and one token below
it, and at 16L; the scheduler's counter shows exactly how many tokens were skipped.

One in-process engine per setting (VLLM_ENABLE_V1_MULTIPROCESSING=0, to read the
scheduler's counters): the tiny model (6 layers, L = 256, B = 16, n_local = 256, first
chunk 256 tokens) with n_global = 37 (not page-aligned: G = 3) and n_global = 0.
"""


import pytest
from vllm import LLM, SamplingParams

from conftest import MODEL_DIR
from engine_checks import TINY_L, assert_close, engine_core_in_process, sampled_logprobs
from lminf_vllm.config import LMInfConfig
from lminf_vllm.receptive_field import request_tail_start

PAGE, N_LOCAL, NUM_LAYERS = 16, 256, 6
FIRST_CHUNK = N_LOCAL  # the default chunk cap, which a lone request's first chunk meets
OUTPUT_TOKENS = 8
MAX_MODEL_LEN = 16 * TINY_L + 64


def tail_of(n_global: int, prompt_tokens: int) -> int:
    config = LMInfConfig(n_global, N_LOCAL, TINY_L, PAGE, FIRST_CHUNK,
                         receptive_field_layers=NUM_LAYERS)
    return request_tail_start(config, prompt_tokens, needs_every_output=False)


def shortest_skipping_prompt(n_global: int) -> int:
    """The shortest prompt whose tail starts past its first chunk (so the jump happens)."""
    length = FIRST_CHUNK
    while tail_of(n_global, length) <= FIRST_CHUNK:
        length += 1
    return length


@pytest.fixture(scope="module", params=[37, 0], ids=["n_global-37", "n_global-0"])
def engine(request):
    with engine_core_in_process():
        llm = LLM(str(MODEL_DIR), attention_backend="lminf", dtype="float32",
                  max_model_len=MAX_MODEL_LEN, max_num_seqs=4, block_size=PAGE,
                  gpu_memory_utilization=0.3, enforce_eager=True, seed=0,
                  additional_config={"lminf": {"n_global": request.param}})
    yield llm, request.param
    llm.llm_engine.engine_core.shutdown()


def skipped_so_far(llm) -> int:
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    return sum(manager.counters.prompt_tokens_skipped
               for manager in scheduler.kv_cache_manager.coordinator.single_type_managers)


def generate(llm, prompt, **params):
    out, = llm.generate([{"prompt_token_ids": prompt}],
                        SamplingParams(max_tokens=OUTPUT_TOKENS, temperature=0, logprobs=0,
                                       ignore_eos=True, **params), use_tqdm=False)
    return out


@pytest.mark.parametrize("length", ["4L", "shortest skipping - 1", "shortest skipping", "16L"])
def test_skipping_the_middle_gives_the_full_computation(engine, val_tokens, length):
    llm, n_global = engine
    prompt_tokens = {"4L": 4 * TINY_L, "16L": 16 * TINY_L,
                     "shortest skipping": shortest_skipping_prompt(n_global),
                     "shortest skipping - 1": shortest_skipping_prompt(n_global) - 1}[length]
    prompt = val_tokens[50_000:50_000 + prompt_tokens].tolist()
    tail = tail_of(n_global, prompt_tokens)
    expected_skip = tail - FIRST_CHUNK if tail > FIRST_CHUNK else 0
    assert (expected_skip > 0) == (length in ("shortest skipping", "16L"))

    before = skipped_so_far(llm)
    skipping = generate(llm, prompt)
    assert skipped_so_far(llm) - before == expected_skip, "the scheduler skipped otherwise"
    full = generate(llm, prompt, prompt_logprobs=0)  # every prompt token computed
    assert skipped_so_far(llm) - before == expected_skip, "a prompt-logprobs request skipped"

    assert list(skipping.outputs[0].token_ids) == list(full.outputs[0].token_ids), (
        f"{prompt_tokens}-token prompt: greedy output changed by skipping {expected_skip}")
    error = assert_close(sampled_logprobs(skipping), sampled_logprobs(full),
                         f"{prompt_tokens}-token prompt, {expected_skip} skipped")
    print(f"n_global {n_global}, {prompt_tokens}-token prompt: {expected_skip} tokens skipped "
          f"(tail from {tail}), max |Δ logprob| vs full = {error:.2e}")


def test_the_metadata_builder_reads_the_runner_rows(engine):
    """The plan's half of the skip needs each row's request: the runner reached the
    builders' engine context (patches/runner_for_builders.py), and its builder gives a
    long prompt's row its tail start."""
    from lminf_vllm import engine_context

    llm, n_global = engine
    runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker \
        .model_runner
    assert engine_context.of(runner.vllm_config).model_runner() is runner
    (builder,) = {group.get_metadata_builder() for groups in runner.attn_groups
                  for group in groups}
    prompt_tokens = 16 * TINY_L
    llm.llm_engine.add_request("probe", {"prompt_token_ids": [5] * prompt_tokens},
                               SamplingParams(max_tokens=1))
    llm.llm_engine.step()  # the probe's first chunk: the runner now holds its row
    assert list(builder._tail_starts(1)) == [tail_of(n_global, prompt_tokens)]
    while llm.llm_engine.has_unfinished_requests():
        llm.llm_engine.step()
