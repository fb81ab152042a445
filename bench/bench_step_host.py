"""Host time of one decode step's attention work while the device is busy: planning the step
(once) and enqueueing one layer (write_kv + attention.run), as the backend does them.

A step that waits for the device (a blocking host-to-device copy, a .item()) costs the host
the device's whole queue, so the device is first given GPU_BUSY_MS of matrix products and
the host time is read right after (no synchronize in between). Run it against two
checkouts to compare them side by side, the plugin under test on PYTHONPATH:

    PYTHONPATH=. python bench/bench_step_host.py --out /tmp/after.json
    PYTHONPATH=/path/to/older/checkout python bench/bench_step_host.py --out /tmp/before.json

The older checkouts have no StepPlanner; there the step is planned with build_plan and the
block table on the device, which is what their backend did.
"""

import argparse
import json
import statistics
import time

import numpy as np
import torch

from lminf_vllm import attention
from lminf_vllm.attention.rotation import QueryRotation
from lminf_vllm.config import LMInfConfig

GPU_BUSY_MS = 20      # matrix products queued before each measured step
MATMUL_SIZE = 4096


def rope_table(head_dim, trained_length):
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angle = torch.arange(trained_length + 1, dtype=torch.float64)[:, None] * inv_freq
    return QueryRotation(torch.cat([angle.cos(), angle.sin()], 1).float(), head_dim, True)


def planner_for(config, args, device):
    """plan(qsl, seq_lens, table) as the checkout's backend plans a step."""
    tile_queries = attention.plan_tile_queries(config, device)
    if hasattr(attention, "StepPlanner"):
        planner = attention.StepPlanner(
            config, max_num_reqs=args.requests, max_num_tokens=args.max_tokens, device=device,
            num_ring_pages=config.num_ring_pages, tile_queries=tile_queries,
            min_pages=attention.decode_pages(config))
        return lambda qsl, seq_lens, table: planner.plan(qsl, seq_lens, table,
                                                         num_tokens=len(seq_lens))
    return lambda qsl, seq_lens, table: attention.build_plan(
        config, qsl, seq_lens, table, num_ring_pages=config.num_ring_pages,
        tile_queries=tile_queries)


def busy(a):
    """Queue about GPU_BUSY_MS of work on the device (a 4096² float32 product is ~2 ms on
    an H100/H200)."""
    for _ in range(max(1, GPU_BUSY_MS // 2)):
        a = a @ a
        a = a / a.norm()
    return a


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--n-local", type=int, default=4096)
    parser.add_argument("--page-size", type=int, default=64)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    args = parser.parse_args()
    device = torch.device("cuda")
    config = LMInfConfig(n_global=64, n_local=args.n_local, trained_length=args.n_local,
                         page_size=args.page_size, max_prefill_chunk_tokens=args.n_local)
    width = config.num_pinned_pages + config.num_ring_pages
    table = (1 + torch.arange(args.requests * width, dtype=torch.int32)).view(
        args.requests, width).to(device)
    cache = torch.randn(1 + args.requests * width, args.kv_heads, args.page_size,
                        2 * args.head_dim, device=device, dtype=torch.float16)
    q = torch.randn(args.requests, args.heads, args.head_dim, device=device,
                    dtype=torch.float16)
    k = torch.randn(args.requests, args.kv_heads, args.head_dim, device=device,
                    dtype=torch.float16)
    out = torch.empty_like(q)
    rotation = attention.rotation_for(rope_table(args.head_dim, config.trained_length), config,
                                      device)
    plan_step = planner_for(config, args, device)
    qsl = np.arange(args.requests + 1)
    start = np.random.default_rng(0).integers(10_000, 100_000_000, args.requests)
    a = torch.randn(MATMUL_SIZE, MATMUL_SIZE, device=device)
    plan_us, layer_us = [], []
    for step in range(args.steps + 5):          # the first 5 compile and warm up
        torch.cuda.synchronize()
        a = busy(a)
        t0 = time.perf_counter()
        plan = plan_step(qsl, start + step, table)
        t1 = time.perf_counter()
        attention.write_kv(plan, k, k, cache)
        attention.run(plan, q, cache, out, rotation, args.head_dim ** -0.5)
        t2 = time.perf_counter()
        if step >= 5:
            plan_us.append(1e6 * (t1 - t0))
            layer_us.append(1e6 * (t2 - t1))
    torch.cuda.synchronize()
    result = dict(
        planner="StepPlanner" if hasattr(attention, "StepPlanner") else "build_plan",
        device=torch.cuda.get_device_name(), torch=torch.__version__,
        settings=vars(args), gpu_busy_ms=GPU_BUSY_MS,
        plan_host_us_median=statistics.median(plan_us),
        plan_host_us_p90=float(np.percentile(plan_us, 90)),
        layer_host_us_median=statistics.median(layer_us),
        layer_host_us_p90=float(np.percentile(layer_us, 90)),
        date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    print(json.dumps(result, indent=2))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
