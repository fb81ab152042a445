"""vLLM's own scheduler + KV cache manager with the lminf spec, through one very long request.

Model execution is replaced by a no-op that returns one token per request that has
computed all its known tokens (what the model runner returns), so everything else is
vLLM's: Scheduler.schedule / update_from_output, the KV cache coordinator, LMInfManager,
the BlockPool, chunked prefill with our per-request chunk cap, and short requests that
arrive, run and finish alongside the long one.

Measured: the long request's blocks (from the manager's table, and the pool's used count
once the short requests are gone) from 1e4 tokens to the end, and the process RSS growth
per streamed token at checkpoints. The long request's prompt is a Python list of token ids
(vLLM keeps it, plus the copy `Request._all_token_ids`); its cost is measured on its own,
at submission, and reported separately from the growth while streaming.

    python bench/bench_scheduler_sim.py --tokens 200000000
    python bench/bench_scheduler_sim.py --tokens 1000000 --checkpoints 1e4,1e5,1e6  # quick
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL_DIR = REPO / "tests" / "assets" / "tiny-llama-L256"
RESULTS = REPO / "bench" / "results"
# Token id every simulated step returns; ids below 256 are CPython's shared small ints, so
# the lists vLLM keeps cost one 8-byte pointer per token (no int object per token).
NO_OP_TOKEN = 7


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def build_scheduler(*, max_model_len: int, block_size: int, n_global: int, n_local: int,
                    trained_length: int, max_num_seqs: int, max_num_batched_tokens: int,
                    num_blocks: int, receptive_field_prefill: bool = True):
    """A real vLLM Scheduler whose single KV cache group has the LMINF ring spec.

    The engine config comes from EngineArgs.create_engine_config, the path `LLM(...)` and
    `vllm serve` take (with the plugin's patches applied); the spec is built the way the
    backend builds it for the tiny model's layers.
    """
    import torch
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    import lminf_vllm
    from lminf_vllm import config as lminf_config
    from lminf_vllm.kv_cache import LMInfSpec

    lminf_vllm.register()
    vllm_config = EngineArgs(
        model=str(MODEL_DIR), attention_backend="lminf", dtype="float32",
        max_model_len=max_model_len, block_size=block_size, max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens, enforce_eager=True,
        additional_config={"lminf": {"n_global": n_global, "n_local": n_local,
                                     "trained_length": trained_length,
                                     "receptive_field_prefill": receptive_field_prefill}},
    ).create_engine_config()
    vllm_config.cache_config.num_gpu_blocks = num_blocks
    config = lminf_config.from_vllm_config(vllm_config)
    spec = LMInfSpec.from_attention_spec(
        FullAttentionSpec(block_size=block_size, num_kv_heads=2, head_size=64,
                          dtype=torch.float32), config)
    kv_cache_config = KVCacheConfig(
        num_blocks=num_blocks, kv_cache_tensors=[],
        kv_cache_groups=[KVCacheGroupSpec(
            layer_names=[f"model.layers.{i}.self_attn.attn" for i in range(6)],
            kv_cache_spec=spec)])
    scheduler = Scheduler(vllm_config=vllm_config, kv_cache_config=kv_cache_config,
                          structured_output_manager=StructuredOutputManager(vllm_config),
                          block_size=block_size, log_stats=False)
    return scheduler, config


def make_request(request_id: str, prompt_token_ids: list[int], max_tokens: int,
                 prompt_logprobs: int | None = None):
    from vllm import SamplingParams
    from vllm.v1.request import Request

    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0,
                            prompt_logprobs=prompt_logprobs)
    params.update_from_generation_config({}, None)
    return Request(request_id, prompt_token_ids, params, None)


def no_op_step(scheduler) -> dict:
    """One engine step with the model replaced by a no-op; returns {req_id: num tokens}."""
    from vllm.v1.outputs import ModelRunnerOutput

    scheduler_output = scheduler.schedule()
    scheduled = scheduler_output.num_scheduled_tokens
    req_ids = list(scheduled)
    sampled = []
    for req_id in req_ids:
        request = scheduler.requests[req_id]
        # A request that has now computed every known token samples one; a partial prefill
        # chunk samples nothing (as the model runner discards it).
        done = request.num_computed_tokens >= request.num_tokens
        sampled.append([NO_OP_TOKEN] if done else [])
    output = ModelRunnerOutput(req_ids=req_ids,
                               req_id_to_index={r: i for i, r in enumerate(req_ids)},
                               sampled_token_ids=sampled)
    scheduler.update_from_output(scheduler_output, output)
    return scheduled


def blocks_of(scheduler, request_id: str) -> int:
    manager = scheduler.kv_cache_manager.coordinator.single_type_managers[0]
    return len(manager.req_to_blocks.get(request_id, ()))


def run(args) -> dict:
    scheduler, config = build_scheduler(
        max_model_len=args.max_model_len, block_size=args.block_size,
        n_global=args.n_global, n_local=args.n_local, trained_length=args.trained_length,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        # the whole stream passes through the ring: no prompt middle skipped
        num_blocks=args.num_blocks, receptive_field_prefill=False)
    pool = scheduler.kv_cache_manager.block_pool
    pages_per_request = config.num_pinned_pages + config.num_ring_pages
    free_at_start = pool.get_num_free_blocks()
    total = args.tokens
    # the request finishes in the step that computes token total - 1: measure before it
    checkpoints = sorted(min(int(float(c)), total - 2) for c in args.checkpoints.split(","))
    output_tokens = args.output_tokens

    gc.collect()
    rss_before_prompt = rss_bytes()
    prompt = [NO_OP_TOKEN] * (total - output_tokens)
    long_request = make_request("long", prompt, output_tokens)
    del prompt
    scheduler.add_request(long_request)
    gc.collect()
    rss_after_submit = rss_bytes()

    short_id = 0
    rows, max_blocks_long, steps = [], 0, 0
    next_checkpoint = 0
    start_time = time.perf_counter()
    last_time, last_tokens = start_time, 0
    while "long" in scheduler.requests:
        # keep args.num_short short requests in flight next to the long one
        live_short = sum(1 for r in scheduler.requests if r != "long")
        for _ in range(args.num_short - live_short):
            length = 20 + (short_id * 37) % 400
            scheduler.add_request(make_request(f"short-{short_id}", [NO_OP_TOKEN] * length,
                                               max_tokens=1 + short_id % 16))
            short_id += 1
        no_op_step(scheduler)
        steps += 1
        request = scheduler.requests.get("long")
        streamed = request.num_computed_tokens if request is not None else total
        held = blocks_of(scheduler, "long")
        max_blocks_long = max(max_blocks_long, held)
        if held > pages_per_request:
            raise AssertionError(f"long request holds {held} > G + R = {pages_per_request} "
                                 f"blocks at {streamed} tokens")
        while next_checkpoint < len(checkpoints) and streamed >= checkpoints[next_checkpoint]:
            now = time.perf_counter()
            rss = rss_bytes()
            used = free_at_start - pool.get_num_free_blocks()
            rows.append(dict(
                tokens=streamed, checkpoint=checkpoints[next_checkpoint], steps=steps,
                long_request_blocks=held, pool_blocks_in_use=used,
                short_requests_in_flight=sum(1 for r in scheduler.requests if r != "long"),
                rss_bytes=rss, rss_growth_since_submit=rss - rss_after_submit,
                rss_growth_per_token=(rss - rss_after_submit) / max(streamed, 1),
                seconds=now - start_time,
                tokens_per_second_since_last=(streamed - last_tokens) / max(now - last_time,
                                                                            1e-9)))
            print(json.dumps(rows[-1]), flush=True)
            last_time, last_tokens = now, streamed
            next_checkpoint += 1
        if args.max_seconds and time.perf_counter() - start_time > args.max_seconds:
            print(f"stopping after {args.max_seconds} s at {streamed} tokens", flush=True)
            break

    finished = "long" not in scheduler.requests
    # let the short requests drain, then every block must be back
    while scheduler.requests and finished:
        no_op_step(scheduler)
    elapsed = time.perf_counter() - start_time
    streamed = total if finished else scheduler.requests["long"].num_computed_tokens
    import torch
    import vllm
    return dict(
        bench="scheduler_sim",
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        machine=platform.node(), cpu=platform.processor() or platform.machine(),
        cpu_count=os.cpu_count(), python=sys.version.split()[0], vllm=vllm.__version__,
        torch=torch.__version__,
        settings=dict(vars(args), G=config.num_pinned_pages, R=config.num_ring_pages,
                      max_prefill_chunk_tokens=config.max_prefill_chunk_tokens),
        finished=finished, tokens_streamed=streamed, steps=steps,
        short_requests_served=short_id, seconds=elapsed,
        tokens_per_second=streamed / elapsed,
        pages_per_request=pages_per_request, max_long_request_blocks=max_blocks_long,
        pool_restored=pool.get_num_free_blocks() == free_at_start if finished else None,
        # vLLM keeps the prompt list and Request._all_token_ids (a copy): 2 pointers/token
        token_id_lists_bytes=rss_after_submit - rss_before_prompt,
        token_id_lists_bytes_per_token=(rss_after_submit - rss_before_prompt)
        / (total - output_tokens),
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        checkpoints=rows,
    )


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["checkpoints"]
    tokens = [r["tokens"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(tokens, [r["long_request_blocks"] for r in rows], "o-", label="long request")
    ax1.axhline(result["pages_per_request"], color="gray", ls="--", label="G + R")
    ax1.set(xscale="log", xlabel="tokens streamed", ylabel="KV blocks held",
            title="blocks held by the long request")
    ax1.legend()
    ax2.plot(tokens, [r["rss_growth_per_token"] for r in rows], "o-")
    ax2.axhline(8, color="gray", ls="--", label="goal: 8 B/token")
    ax2.set(xscale="log", xlabel="tokens streamed", ylabel="bytes / token",
            title="RSS growth per streamed token\n(beyond the token-id lists)")
    ax2.legend()
    fig.suptitle(f"vLLM scheduler + lminf KV manager, no-op model "
                 f"({result['settings']['tokens']:.0e} tokens, {result['date'][:10]})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=lambda s: int(float(s)), default=200_000_000,
                        help="prompt + output tokens of the long request")
    parser.add_argument("--output-tokens", type=int, default=1000,
                        help="of which decoded one per step")
    parser.add_argument("--checkpoints", default="1e4,1e5,1e6,1e7,1e8,2e8")
    parser.add_argument("--max-model-len", type=lambda s: int(float(s)), default=200_000_000)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--n-global", type=int, default=64)
    parser.add_argument("--n-local", type=int, default=4096)
    parser.add_argument("--trained-length", type=int, default=4096,
                        help="L; a Llama-2-like 4k model (the tiny model's weights are "
                             "never run here)")
    parser.add_argument("--max-num-seqs", type=int, default=8)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--num-blocks", type=int, default=8192)
    parser.add_argument("--num-short", type=int, default=4,
                        help="short requests kept in flight beside the long one")
    parser.add_argument("--max-seconds", type=float, default=0,
                        help="stop early (reported honestly) after this long")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    result = run(args)
    stamp = datetime.date.today().isoformat()
    out = Path(args.out) if args.out else RESULTS / f"{stamp}_{platform.node()}_scheduler_sim"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    summary = {k: v for k, v in result.items() if k != "checkpoints"}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
