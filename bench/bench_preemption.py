"""Recovery after preemption at 64L: tokens recomputed and time, bounded vs full replay (#13).

A long stream (prompt of held-out text, greedy decode) is preempted by real pool pressure
when it is about --multiple · L tokens long: a filler request, admitted first, holds
FILLER_PAGES pages of a pool of G + R + FILLER_PAGES and needs one more in its last step,
so vLLM preempts the newest running request, the stream (patches/receptive_field_prefill.py,
tests/engine/test_bounded_recovery.py). The stream then resumes:

* bounded: lminf.receptive_field_prefill true (the default): the replay computes its
  first chunk and the last n_layers · (n_local − 1) + 1 tokens of its stream, from a page
  boundary;
* full replay: lminf.receptive_field_prefill false: vLLM's stock recovery, the whole stream
  (prompt and output so far) recomputed.

Measured per run: the stream length at preemption, the tokens the replay computed
(`lminf:recompute_tokens`, read from the scheduler) and the recovery time, from the first
step after the preemption to the step that returns the stream's next token (wall time and
this process's CPU time: the engines run in-process, VLLM_ENABLE_V1_MULTIPROCESSING=0).
Both engines live in one process and their runs alternate, so machine noise hits both
alike; the median of --repeats runs is kept. The outputs of the two sides are compared.

    python bench/bench_preemption.py                  # 64L, 3 repeats
    python bench/bench_preemption.py --multiple 16 --repeats 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from common import MODEL_DIR, save, shutdown, val_tokens

TRAINED_LENGTH = 256
PAGE = 16
PER_REQUEST = 4 + 33  # G + R pages with the defaults (n_global 64, n_local 256, chunk 256)
FILLER_PAGES = 16
OUTPUTS_BEFORE_PREEMPTION = 32
OUTPUT_TOKENS = OUTPUTS_BEFORE_PREEMPTION + 16
CHUNK = 256


def make_engine(bounded: bool, max_model_len: int):
    from vllm import LLM

    return LLM(str(MODEL_DIR), attention_backend="lminf", dtype="float32",
               max_model_len=max_model_len, max_num_seqs=2, block_size=PAGE,
               enforce_eager=True, seed=0, gpu_memory_utilization=0.3,
               num_gpu_blocks_override=PER_REQUEST + FILLER_PAGES,
               additional_config={"lminf": {"receptive_field_prefill": bounded}})


def prefill_steps(bounded: bool, prompt_tokens: int) -> int:
    """Engine steps the stream's first prefill takes (chunks of CHUNK tokens)."""
    from lminf_vllm.config import LMInfConfig
    from lminf_vllm.receptive_field import request_tail_start

    config = LMInfConfig(64, 256, TRAINED_LENGTH, PAGE, CHUNK,
                         receptive_field_layers=6 if bounded else 0)
    start = request_tail_start(config, prompt_tokens, needs_every_output=False)
    if not start:
        return -(-prompt_tokens // CHUNK)
    return 1 + -(-(prompt_tokens - start) // CHUNK)


def run_once(llm, bounded: bool, prompt: list[int], filler: list[int]) -> dict:
    """One stream preempted and resumed; what its recovery cost."""
    from vllm import SamplingParams
    from vllm.v1.request import RequestStatus

    from lminf_vllm.patches.scheduler_stats_lminf import ring_counters_of

    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    # the filler preempts the stream in its decode step filler_steps + 1
    filler_steps = prefill_steps(bounded, len(prompt)) + OUTPUTS_BEFORE_PREEMPTION
    filler_prompt = filler[:PAGE * FILLER_PAGES - filler_steps]
    if not filler_prompt:
        raise SystemExit("the filler's prompt would be empty: raise FILLER_PAGES")
    engine.add_request("filler", {"prompt_token_ids": filler_prompt},
                       SamplingParams(max_tokens=filler_steps + 2, temperature=0,
                                      ignore_eos=True))
    engine.add_request("stream", {"prompt_token_ids": prompt},
                       SamplingParams(max_tokens=OUTPUT_TOKENS, temperature=0,
                                      ignore_eos=True))
    stream_id, = [r for r in scheduler.requests if r.startswith("stream")]
    stream = scheduler.requests[stream_id]
    recompute_before = ring_counters_of(scheduler.kv_cache_manager)["recompute_tokens"]
    preempted_at = outputs_at_preemption = None
    wall = cpu = 0.0  # from the first step after the preemption
    resumed = False
    last = None
    while engine.has_unfinished_requests():
        wall_start, cpu_start = time.perf_counter(), time.process_time()
        outs = engine.step()
        step_wall, step_cpu = time.perf_counter() - wall_start, time.process_time() - cpu_start
        for out in outs:
            if out.request_id == "stream":
                last = out
        if preempted_at is None:
            if stream.status == RequestStatus.PREEMPTED:
                preempted_at = stream.num_tokens
                outputs_at_preemption = stream.num_output_tokens
        elif not resumed:
            wall, cpu = wall + step_wall, cpu + step_cpu
            resumed = stream.num_output_tokens > outputs_at_preemption
    if preempted_at is None or stream.num_preemptions != 1:
        raise SystemExit(f"expected one preemption, got {stream.num_preemptions}")
    recomputed = (ring_counters_of(scheduler.kv_cache_manager)["recompute_tokens"]
                  - recompute_before)
    return {"stream_tokens_at_preemption": preempted_at, "recompute_tokens": recomputed,
            "recovery_wall_s": wall, "recovery_cpu_s": cpu,
            "output_token_ids": list(last.outputs[0].token_ids)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--multiple", type=int, default=64,
                        help="stream length at preemption, in units of L = 256")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # read the scheduler in-process
    tokens = val_tokens()
    prompt_tokens = args.multiple * TRAINED_LENGTH - OUTPUTS_BEFORE_PREEMPTION
    if prompt_tokens + 100_000 > len(tokens):
        raise SystemExit(f"the held-out text has {len(tokens)} tokens: too few")
    prompt = tokens[:prompt_tokens].tolist()
    filler = tokens[100_000:100_000 + PAGE * FILLER_PAGES].tolist()
    max_model_len = prompt_tokens + OUTPUT_TOKENS + 64
    engines = {"bounded": make_engine(True, max_model_len),
               "full_replay": make_engine(False, max_model_len)}
    runs = {side: [] for side in engines}
    for repeat in range(args.repeats):
        for side, llm in engines.items():
            result = run_once(llm, side == "bounded", prompt, filler)
            runs[side].append(result)
            print(f"repeat {repeat} {side}: preempted at "
                  f"{result['stream_tokens_at_preemption']} tokens, recomputed "
                  f"{result['recompute_tokens']}, recovery {result['recovery_wall_s']:.3f} s "
                  f"wall / {result['recovery_cpu_s']:.3f} s CPU", flush=True)
    for llm in engines.values():
        shutdown(llm)
    same_output = runs["bounded"][0]["output_token_ids"] == \
        runs["full_replay"][0]["output_token_ids"]
    summary = {}
    for side, side_runs in runs.items():
        summary[side] = {
            "stream_tokens_at_preemption": side_runs[0]["stream_tokens_at_preemption"],
            "recompute_tokens": side_runs[0]["recompute_tokens"],
            "recovery_wall_s_median": statistics.median(r["recovery_wall_s"]
                                                        for r in side_runs),
            "recovery_cpu_s_median": statistics.median(r["recovery_cpu_s"]
                                                       for r in side_runs),
            "runs": [{k: v for k, v in r.items() if k != "output_token_ids"}
                     for r in side_runs]}
    bounded, full = summary["bounded"], summary["full_replay"]
    path = save("preemption_recovery", {
        "command": f"python bench/bench_preemption.py --multiple {args.multiple} "
                   f"--repeats {args.repeats}",
        "settings": {"model": "tiny-llama-L256 (6 layers)", "n_global": 64, "n_local": 256,
                     "page_size": 16, "max_prefill_chunk_tokens": CHUNK,
                     "pool_pages": PER_REQUEST + FILLER_PAGES,
                     "outputs_before_preemption": OUTPUTS_BEFORE_PREEMPTION,
                     "recovery": "first step after the preemption through the step that "
                                 "returns the stream's next token",
                     "statistic": f"median of {args.repeats} alternating runs"},
        "summary": {side: {k: v for k, v in s.items() if k != "runs"}
                    for side, s in summary.items()},
        "recompute_ratio": full["recompute_tokens"] / bounded["recompute_tokens"],
        "wall_speedup": full["recovery_wall_s_median"] / bounded["recovery_wall_s_median"],
        "cpu_speedup": full["recovery_cpu_s_median"] / bounded["recovery_cpu_s_median"],
        "same_output_tokens": same_output,
        "runs": {side: s["runs"] for side, s in summary.items()}})
    print(f"wrote {path}")
    print(f"bounded: {bounded['recompute_tokens']} tokens, "
          f"{bounded['recovery_wall_s_median']:.3f} s; full replay: "
          f"{full['recompute_tokens']} tokens, {full['recovery_wall_s_median']:.3f} s; "
          f"same output: {same_output}")


if __name__ == "__main__":
    main()
