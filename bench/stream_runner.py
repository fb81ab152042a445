"""Stream runner: one long stream through a Llama with the plugin's planning, cache and kernels.

No vLLM (the GPU machine has none): the model's safetensors run layer by layer in plain
PyTorch, with exactly what the plugin does inside vLLM around attention:
  * RoPE is fed positions mod B (the page-local key frame, DESIGN §3);
  * new keys/values go to the paged cache through plan.slot_block/slot_offset (attention.write_kv);
  * attention.run dispatches to the Triton kernels on CUDA (the reference on CPU);
  * one request owns G pinned pages and a ring of R pages (num_ring_pages), so the cache
    never grows however long the stream.

Parts (the model: the tiny Llama's safetensors, or --random-model 1b, a Llama-3.2-1B-shaped
model with random weights drawn on the device):
  1. the stream: the val text cycled, fed in chunks of --chunk tokens, up to --tokens or until
     --seconds run out; perplexity over the --eval-tokens tokens after each checkpoint (those
     tokens are always val[:eval_tokens], so every checkpoint scores the same text), GPU memory
     and the token rate at each checkpoint.
  2. CUDA graphs (on CUDA): the decode step (embedding to logits, kernels included) is captured
     once with torch.cuda.CUDAGraph and replayed for --graph-steps tokens across a ring wrap;
     logits must equal an eager run from the same cache state.

  3. --throughput P1,P2,..: prefill (chunks of L) and decode (CUDA graph) tokens/s of the
     Λ path at those stream positions, against the same model with the stock attention (a
     dense cache, torch SDPA causal) at a stream of L tokens, its best case; same run.

    python bench/stream_runner.py --tokens 200000000 --out stream.json       # GPU
    python bench/stream_runner.py --random-model 1b --throughput 1e4,1e6,1e7 --out t.json
    python bench/stream_runner.py --device cpu --tokens 3000 --chunk 256 \
        --checkpoints 1000,2000 --eval-tokens 256 --out /tmp/s.json           # CPU smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lminf_vllm import attention  # noqa: E402
from lminf_vllm.attention import (AttentionPlan, build_plan,  # noqa: E402
                                  plan_tile_queries, rotation_for)
from lminf_vllm.attention.rotation import QueryRotation, rotate  # noqa: E402
from lminf_vllm.config import DEFAULT_N_GLOBAL, LMInfConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "tests/assets/tiny-llama-L256"
DEFAULT_VAL = [ROOT / ".gpudata/val.npy", Path("/work/shared/data/val.npy")]
CHECKPOINTS = (10_000, 100_000, 1_000_000, 10_000_000, 100_000_000, 200_000_000)
PAGE_SIZE = 16


# A Llama-3.2-1B-shaped model (16 layers, 2048 hidden, 32/8 heads, d 64), L = 4096: built with
# random weights on the device by --random-model 1b (nothing downloaded or carried).
RANDOM_MODELS = {"1b": dict(num_hidden_layers=16, hidden_size=2048, intermediate_size=8192,
                            num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                            vocab_size=128256, max_position_embeddings=4096,
                            rms_norm_eps=1e-5, rope_theta=500000.0)}


def load_model_dir(model_dir: Path):
    """config dict and weights of a safetensors Llama checkpoint."""
    cfg = json.loads((model_dir / "config.json").read_text())
    weights = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        weights.update(load_file(str(shard)))
    return cfg, {k.removeprefix("model."): v for k, v in weights.items()}


def random_weights(cfg: dict, device, dtype, seed: int = 0) -> dict:
    """Llama weights drawn on the device (normal, std 0.02; norms 1), lm_head tied."""
    g = torch.Generator(device=device).manual_seed(seed)
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    q_dim = cfg["num_attention_heads"] * cfg["head_dim"]
    kv_dim = cfg["num_key_value_heads"] * cfg["head_dim"]
    draw = lambda *shape: (0.02 * torch.randn(*shape, generator=g, device=device)  # noqa: E731
                           ).to(dtype)
    w = {"embed_tokens.weight": draw(cfg["vocab_size"], hidden),
         "norm.weight": torch.ones(hidden, device=device, dtype=dtype)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"layers.{i}."
        w.update({p + "input_layernorm.weight": torch.ones(hidden, device=device, dtype=dtype),
                  p + "post_attention_layernorm.weight": torch.ones(hidden, device=device,
                                                                    dtype=dtype),
                  p + "self_attn.q_proj.weight": draw(q_dim, hidden),
                  p + "self_attn.k_proj.weight": draw(kv_dim, hidden),
                  p + "self_attn.v_proj.weight": draw(kv_dim, hidden),
                  p + "self_attn.o_proj.weight": draw(hidden, q_dim),
                  p + "mlp.gate_proj.weight": draw(inter, hidden),
                  p + "mlp.up_proj.weight": draw(inter, hidden),
                  p + "mlp.down_proj.weight": draw(hidden, inter)})
    return w


class Llama:
    """A Llama forward in plain PyTorch, one chunk of one stream at a time; attention is
    handed in (`attend(layer, q, k, v) -> out`), so the Λ paged cache and the dense baseline
    run the same model code."""

    def __init__(self, cfg: dict, weights: dict, device, dtype):
        self.w = {k: v.to(device=device, dtype=dtype) for k, v in weights.items()}
        if "lm_head.weight" not in self.w:
            self.w["lm_head.weight"] = self.w["embed_tokens.weight"]  # tied
        self.layers = cfg["num_hidden_layers"]
        self.heads = cfg["num_attention_heads"]
        self.kv_heads = cfg["num_key_value_heads"]
        self.head_dim = cfg.get("head_dim", cfg["hidden_size"] // self.heads)
        self.eps = cfg["rms_norm_eps"]
        self.device, self.dtype = device, dtype
        self.trained_length = cfg["max_position_embeddings"]
        theta = cfg.get("rope_parameters", {}).get("rope_theta", cfg.get("rope_theta", 10000.0))
        inv_freq = 1.0 / theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float64)
                                   / self.head_dim)
        angle = torch.arange(self.trained_length + 1, dtype=torch.float64)[:, None] * inv_freq
        self.table = torch.cat([angle.cos(), angle.sin()], dim=1).float()  # the model's cache
        self.rope_cos = self.table[:, : self.head_dim // 2].to(device)
        self.rope_sin = self.table[:, self.head_dim // 2:].to(device)
        self.scale = self.head_dim ** -0.5

    def rms(self, x, name):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.w[name].float()).to(self.dtype)

    def forward(self, tokens, frame_position, attend, last_only: bool = False):
        """Logits [T, vocab] float32 of tokens [T] whose RoPE positions are given (the last
        row alone with last_only, as a server samples after a prompt chunk)."""
        w = self.w
        x = w["embed_tokens.weight"][tokens]
        cos = self.rope_cos[frame_position][:, None]
        sin = self.rope_sin[frame_position][:, None]
        t = tokens.shape[0]
        for i in range(self.layers):
            p = f"layers.{i}."
            h = self.rms(x, p + "input_layernorm.weight")
            q = (h @ w[p + "self_attn.q_proj.weight"].T).view(t, self.heads, self.head_dim)
            k = (h @ w[p + "self_attn.k_proj.weight"].T).view(t, self.kv_heads, self.head_dim)
            v = (h @ w[p + "self_attn.v_proj.weight"].T).view(t, self.kv_heads, self.head_dim)
            q = rotate(q.float(), cos, sin, True).to(self.dtype)
            k = rotate(k.float(), cos, sin, True).to(self.dtype)
            out = attend(i, q, k, v)
            x = x + out.view(t, -1) @ w[p + "self_attn.o_proj.weight"].T
            h = self.rms(x, p + "post_attention_layernorm.weight")
            gate = F.silu(h @ w[p + "mlp.gate_proj.weight"].T)
            x = x + (gate * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
        if last_only:
            x = x[-1:]
        x = self.rms(x, "norm.weight")
        return (x @ w["lm_head.weight"].T).float()


class LambdaCache:
    """The plugin's side of a step: G pinned pages and a ring of R pages per layer, plans,
    keys/values written through plan.slot_block/slot_offset, attention.run (the kernels on CUDA). RoPE
    is fed positions mod B (the page-local key frame, DESIGN §3)."""

    def __init__(self, model: Llama, config_overrides: dict, chunk: int):
        self.model = model
        self.config = LMInfConfig(
            n_global=config_overrides.get("n_global", DEFAULT_N_GLOBAL),
            n_local=config_overrides.get("n_local", model.trained_length),
            trained_length=model.trained_length, page_size=PAGE_SIZE,
            max_prefill_chunk_tokens=chunk)
        model_rotation = QueryRotation.from_model_table(model.table, model.trained_length + 1,
                                                        True)
        # the table and tiles the backend uses on this device
        self.rotation = rotation_for(model_rotation, self.config, model.device)
        self.tile_queries = plan_tile_queries(self.config, model.device)
        width = self.config.num_pinned_pages + self.config.num_ring_pages
        # fixed page width of decode plans, for graphs: the most pages a decode query sees
        self.decode_pages = (self.config.num_pinned_pages
                             + -(-self.config.n_local // PAGE_SIZE) + 1)
        self.block_table = torch.arange(width).view(1, width)             # host, one request
        self.kv = [torch.zeros(width, model.kv_heads, PAGE_SIZE, 2 * model.head_dim,
                               device=model.device, dtype=model.dtype)
                   for _ in range(model.layers)]

    def plan(self, start: int, length: int, min_pages: int = 0) -> AttentionPlan:
        """The step's plan, built on the host and moved without a sync."""
        plan = build_plan(self.config, np.array([0, length]), np.array([start + length]),
                          self.block_table, num_ring_pages=self.config.num_ring_pages,
                          tile_queries=self.tile_queries, min_pages=min_pages)
        return to_device(plan, self.model.device)

    def frame(self, start: int, length: int):
        return torch.arange(start, start + length, device=self.model.device) % PAGE_SIZE

    def attend(self, plan: AttentionPlan):
        def attend(layer, q, k, v):
            attention.write_kv(plan, k, v, self.kv[layer])
            out = torch.empty_like(q)
            attention.run(plan, q, self.kv[layer], out, self.rotation, self.model.scale)
            return out
        return attend

    def forward(self, tokens, start: int, plan: AttentionPlan | None = None, **kwargs):
        plan = plan if plan is not None else self.plan(start, tokens.shape[0])
        return self.model.forward(tokens, self.frame(start, tokens.shape[0]),
                                  self.attend(plan), **kwargs)


class DenseCache:
    """The baseline: the stock model's attention, a dense [Hkv, L, D] key and value cache per
    layer and torch SDPA (causal over a prompt chunk, the whole cache for a decode token),
    RoPE at absolute positions. It only runs within L tokens (its best case)."""

    def __init__(self, model: Llama):
        self.model = model
        shape = (model.kv_heads, model.trained_length, model.head_dim)
        self.k = [torch.zeros(shape, device=model.device, dtype=model.dtype)
                  for _ in range(model.layers)]
        self.v = [torch.zeros_like(x) for x in self.k]
        self.group = model.heads // model.kv_heads

    def attend(self, positions):
        """positions: [T] device int64, consecutive, the chunk's absolute positions; a prompt
        chunk starts at 0 (causal over itself), a decode token sees every earlier key."""
        def attend(layer, q, k, v):
            self.k[layer].index_copy_(1, positions, k.transpose(0, 1))
            self.v[layer].index_copy_(1, positions, v.transpose(0, 1))
            t = q.shape[0]
            if t == 1:   # decode: the whole cache (static shape, graph-safe)
                out = F.scaled_dot_product_attention(
                    q.transpose(0, 1)[None], self.k[layer][None], self.v[layer][None],
                    enable_gqa=True)
            else:        # prompt chunk from position 0: causal over its t keys (flash path)
                keys, values = (x[layer][:, :t].repeat_interleave(self.group, 0)[None]
                                for x in (self.k, self.v))
                out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys, values,
                                                     is_causal=True)
            return out[0].transpose(0, 1).contiguous()
        return attend

    def forward(self, tokens, positions, **kwargs):
        return self.model.forward(tokens, positions, self.attend(positions), **kwargs)


def to_device(plan: AttentionPlan, device) -> AttentionPlan:
    if torch.device(device).type == "cpu":
        return plan
    move = lambda x: x.pin_memory().to(device, non_blocking=True)  # noqa: E731
    return AttentionPlan(plan.config, move(plan.slot_block), move(plan.slot_offset),
                         tuple(g.apply(move) for g in plan.groups))


class Text:
    """Token at each stream position: the val text cycled, with val[:E] after each checkpoint."""

    def __init__(self, val: np.ndarray, checkpoints, eval_tokens: int):
        self.val = val.astype(np.int64)
        self.checkpoints = np.array(checkpoints, dtype=np.int64)
        self.eval_tokens = eval_tokens

    def tokens(self, start: int, stop: int) -> np.ndarray:
        p = np.arange(start, stop, dtype=np.int64)
        out = self.val[p % len(self.val)]
        for cp in self.checkpoints:
            inside = (p >= cp) & (p < cp + self.eval_tokens)
            out[inside] = self.val[p[inside] - cp]
        return out


def stream(cache: LambdaCache, text: Text, total: int, chunk: int, seconds: float, log):
    """Feed the stream; return per-checkpoint perplexity, memory and timing."""
    device = cache.model.device
    cps = [int(c) for c in text.checkpoints]
    nll_sum = torch.zeros(len(cps), dtype=torch.float64, device=device)
    count = [0] * len(cps)
    reached = {}
    t0 = time.time()
    position = 0
    mem0 = None
    while position < total:
        length = min(chunk, total - position)
        ids = text.tokens(position, position + length + 1)
        ids_t = torch.from_numpy(ids)
        if device != "cpu":
            ids_t = ids_t.pin_memory().to(device, non_blocking=True)
        logits = cache.forward(ids_t[:-1], position)
        nll = F.cross_entropy(logits, ids_t[1:], reduction="none")
        for i, cp in enumerate(cps):
            lo, hi = max(cp, position), min(cp + text.eval_tokens, position + length)
            if lo < hi:
                nll_sum[i] += nll[lo - position: hi - position].double().sum()
                count[i] += hi - lo
                if hi == cp + text.eval_tokens:
                    if device != "cpu":
                        torch.cuda.synchronize()
                    elapsed = time.time() - t0
                    reached[cp] = dict(
                        position=hi, seconds=elapsed, tokens_per_s=hi / elapsed,
                        memory_allocated=(torch.cuda.memory_allocated() if device != "cpu"
                                          else None),
                        max_memory_allocated=(torch.cuda.max_memory_allocated()
                                              if device != "cpu" else None))
                    if mem0 is None:
                        mem0 = reached[cp]["memory_allocated"]
                    log(f"checkpoint {cp:>11,}: {elapsed:7.1f} s, "
                        f"{hi / elapsed / 1e6:.2f} M tok/s, mem {reached[cp]['memory_allocated']}")
        position += length
        if time.time() - t0 > seconds:
            log(f"stopping at {position:,} tokens: --seconds {seconds} spent")
            break
    if device != "cpu":
        torch.cuda.synchronize()
    elapsed = time.time() - t0
    nll_host = nll_sum.tolist()
    results = dict(tokens=position, seconds=elapsed, tokens_per_s=position / elapsed,
                   projected_seconds_2e8=2e8 / (position / elapsed), checkpoints={})
    for i, cp in enumerate(cps):
        if count[i] == text.eval_tokens:
            results["checkpoints"][cp] = dict(reached[cp], perplexity=math.exp(nll_host[i]
                                                                                / count[i]))
    first = results["checkpoints"].get(cps[0])
    if first:
        for c in results["checkpoints"].values():
            c["ratio_to_first"] = c["perplexity"] / first["perplexity"]
    return results


class DecodeGraph:
    """One decode step (embedding to logits, kernels included) captured in a CUDA graph with
    static inputs; `step(position, token)` refreshes them (the plan built on the host and
    copied without a sync, the token, the RoPE frame) and replays."""

    def __init__(self, cache, position: int, token):
        self.cache = cache
        device = cache.model.device
        self.token = token.clone()
        if isinstance(cache, LambdaCache):
            self.plan = cache.plan(position, 1, min_pages=cache.decode_pages)
            self.frame = torch.tensor([position % PAGE_SIZE], device=device)
            run = lambda: cache.model.forward(self.token, self.frame,  # noqa: E731
                                              cache.attend(self.plan))
        else:
            self.frame = torch.tensor([position], device=device)
            run = lambda: cache.forward(self.token, self.frame)  # noqa: E731
        saved = self.cache_state()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up compiles every kernel outside the capture
            run()
        torch.cuda.current_stream().wait_stream(side)
        self.restore(saved)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = run()
        self.restore(saved)

    def cache_state(self):
        c = self.cache
        return [x.clone() for x in (c.kv if isinstance(c, LambdaCache) else c.k + c.v)]

    def restore(self, saved):
        c = self.cache
        for x, y in zip(c.kv if isinstance(c, LambdaCache) else c.k + c.v, saved):
            x.copy_(y)

    def step(self, position: int, token):
        if isinstance(self.cache, LambdaCache):
            plan = self.cache.plan(position, 1, min_pages=self.cache.decode_pages)
            self.plan.slot_block.copy_(plan.slot_block, non_blocking=True)
            self.plan.slot_offset.copy_(plan.slot_offset, non_blocking=True)
            for a, b in zip(self.plan.groups, plan.groups):
                for x, y in zip((a.query_rows, a.query_position, a.page_block, a.page_base),
                                (b.query_rows, b.query_position, b.page_block, b.page_base)):
                    x.copy_(y, non_blocking=True)
            self.frame.fill_(position % PAGE_SIZE)
        else:
            self.frame.fill_(position)
        self.token.copy_(token, non_blocking=True)
        self.graph.replay()
        return self.logits


def decode_graph_check(cache: LambdaCache, val, steps: int, prefill: int, log):
    """Decode steps eager vs replayed from one captured CUDA graph, across a ring wrap."""
    chunk = 64
    device = cache.model.device
    ring_tokens = cache.config.num_ring_pages * PAGE_SIZE
    text = Text(val, [], 0)
    for start in range(0, prefill, chunk):
        cache.forward(torch.from_numpy(text.tokens(start, start + chunk)).to(device), start)
    saved = [k.clone() for k in cache.kv]
    ids = torch.from_numpy(text.tokens(prefill, prefill + steps)).to(device)

    eager = torch.cat([cache.forward(ids[s:s + 1], prefill + s,
                                     cache.plan(prefill + s, 1, min_pages=cache.decode_pages))
                       for s in range(steps)])
    for k, s in zip(cache.kv, saved):
        k.copy_(s)
    graph = DecodeGraph(cache, prefill, ids[:1])
    replayed = []
    torch.cuda.synchronize()
    t0 = time.time()
    for s in range(steps):
        replayed.append(graph.step(prefill + s, ids[s:s + 1]).clone())
    torch.cuda.synchronize()
    replay_s = time.time() - t0
    replayed = torch.cat(replayed)
    # replay time alone, without the host-side planning
    t1 = time.time()
    for _ in range(steps):
        graph.graph.replay()
    torch.cuda.synchronize()
    pure_replay_s = time.time() - t1
    diff = (replayed - eager).abs().max().item()
    result = dict(steps=steps, prefill_tokens=prefill, ring_tokens=ring_tokens,
                  crosses_ring_wrap=steps > ring_tokens, max_abs_logit_diff=diff,
                  equal=diff == 0.0, ms_per_step_with_planning=1e3 * replay_s / steps,
                  ms_per_step_replay_only=1e3 * pure_replay_s / steps)
    log(f"decode graph: {result}")
    return result


def timed(fn, repeats: int) -> float:
    """Seconds per call of fn over `repeats` calls enqueued back to back (host planning of
    the next call overlaps the device's work, as in a pipelined server; synchronising every
    call instead exposes the host's time: 3.5 vs 2.7 ms per Λ decode step, 2026-12-01 21:12
    run), after a collection so that no earlier graph is released inside the timing."""
    gc.collect()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(repeats):
        fn(i)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def prefill_graph_ms(run, repeats: int) -> float:
    """Device time of one prefill chunk alone: `run` (the chunk, its plan fixed) captured in
    a CUDA graph and replayed, so that neither host work nor launch gaps count; against the
    chunk's enqueued time it says whether the host holds the device back. Rewrites the
    chunk's keys into the cache (run after the timings that read it)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    ms = 1e3 * timed(lambda i: graph.replay(), repeats)
    del graph
    return ms


def device_time_or_error(run, repeats: int):
    """prefill_graph_ms, or the capture's error (the runner's own timings stand either way)."""
    try:
        return prefill_graph_ms(run, repeats)
    except RuntimeError as e:
        torch.cuda.synchronize()
        return f"capture failed: {e!r}"[:300]


def random_tokens(model: Llama, seed: int):
    """tokens(n): n random token ids of the model's vocabulary on its device, drawn from one
    seeded generator (so a run's prompts repeat run to run)."""
    vocab = model.w["embed_tokens.weight"].shape[0]
    g = torch.Generator(device=model.device).manual_seed(seed)
    return lambda n: torch.randint(0, vocab, (n,), generator=g, device=model.device)


def throughput_lambda(cache: LambdaCache, position: int, chunk: int, chunks: int,
                      decode_steps: int, seed: int, log):
    """Prefill and decode tokens/s of the Λ path at a stream position.

    The stream's first chunk fills the global pages, then it jumps to two windows before
    `position` and runs up to it (the ring then holds the window's real keys, as a stream
    that had run all the way would); time: `chunks` chunks from `position` (host planning
    included), then `decode_steps` graph-replayed decode steps after them (plan refreshed
    per step), and the same graph replayed alone.
    """
    tokens = random_tokens(cache.model, seed)
    starts = [0] + list(range(max(chunk, position - 2 * cache.config.n_local), position, chunk))
    for start in starts:
        cache.forward(tokens(min(chunk, position - start)), start, last_only=True)
    prompt = [tokens(chunk) for _ in range(chunks)]
    before = torch.cuda.memory_stats()
    prefill_s = timed(lambda i: cache.forward(prompt[i], position + i * chunk, last_only=True),
                      chunks)
    after = torch.cuda.memory_stats()
    # device allocations and frees inside the timed chunks (a cudaFree synchronises the
    # device, which would expose the host's time)
    allocator = {k: after.get(k, 0) - before.get(k, 0)
                 for k in ("num_device_alloc", "num_device_free", "num_alloc_retries")}
    at = position + chunks * chunk
    graph = DecodeGraph(cache, at, tokens(1))
    ids = tokens(decode_steps)
    decode_s = timed(lambda i: graph.step(at + i, ids[i:i + 1]), decode_steps)
    replay_s = timed(lambda i: graph.graph.replay(), decode_steps)
    del graph
    plan = cache.plan(position, chunk)
    prefill_graph = device_time_or_error(
        lambda: cache.forward(prompt[0], position, plan=plan, last_only=True), chunks)
    result = dict(position=position, prefill_tokens_per_s=chunk / prefill_s,
                  prefill_ms_per_chunk=1e3 * prefill_s, decode_position=at,
                  decode_tokens_per_s=1 / decode_s, decode_ms_per_step=1e3 * decode_s,
                  decode_ms_per_step_replay_only=1e3 * replay_s,
                  memory_allocated=torch.cuda.memory_allocated(), prefill_allocator=allocator,
                  prefill_graph_ms_per_chunk=prefill_graph)
    log(f"lminf @ {position:>11,}: {result}")
    return result


def throughput_dense(dense: DenseCache, chunk: int, chunks: int, decode_steps: int, seed: int,
                     log):
    """The baseline's best case: a prompt chunk of L tokens from position 0 (causal), and
    decode of the token at L - 1 over the full dense cache, graph-replayed."""
    model = dense.model
    device = model.device
    length = model.trained_length
    tokens = random_tokens(model, seed)
    prompt = [tokens(length) for _ in range(chunks)]
    positions = torch.arange(length, device=device)
    dense.forward(prompt[0], positions, last_only=True)  # warm-up
    prefill_s = timed(lambda i: dense.forward(prompt[i], positions, last_only=True), chunks)
    graph = DecodeGraph(dense, length - 1, prompt[0][:1])
    ids = tokens(decode_steps)
    decode_s = timed(lambda i: graph.step(length - 1, ids[i:i + 1]), decode_steps)
    replay_s = timed(lambda i: graph.graph.replay(), decode_steps)
    del graph
    prefill_graph = device_time_or_error(
        lambda: dense.forward(prompt[0], positions, last_only=True), chunks)
    result = dict(prompt_tokens=length, prefill_tokens_per_s=length / prefill_s,
                  prefill_ms_per_chunk=1e3 * prefill_s, decode_position=length - 1,
                  decode_tokens_per_s=1 / decode_s, decode_ms_per_step=1e3 * decode_s,
                  decode_ms_per_step_replay_only=1e3 * replay_s,
                  memory_allocated=torch.cuda.memory_allocated(),
                  prefill_graph_ms_per_chunk=prefill_graph)
    log(f"dense SDPA @ L: {result}")
    return result


def model_without_attention(model: Llama, chunks: int, seed: int, log) -> dict:
    """Where a prefill chunk's time goes: the same chunks of L tokens through the model with
    attention left out (each layer's attention output is its query, no cache written), so
    that a path's attention (its cache writes, key turn and kernels included) is its chunk
    time minus this."""
    device = model.device
    length = model.trained_length
    tokens = random_tokens(model, seed)
    prompt = [tokens(length) for _ in range(chunks)]
    frame = torch.arange(length, device=device) % PAGE_SIZE
    skip = lambda layer, q, k, v: q  # noqa: E731
    model.forward(prompt[0], frame, skip, last_only=True)  # warm-up
    prefill_s = timed(lambda i: model.forward(prompt[i], frame, skip, last_only=True), chunks)
    result = dict(prefill_ms_per_chunk=1e3 * prefill_s)
    log(f"model without attention: {result}")
    return result


def throughput(model: Llama, positions, chunk: int, args, log) -> dict:
    """Λ at each position against the dense baseline at L, same model, same run; the
    baseline runs before and after (clocks can drift over a run) and the faster of its two
    runs is the reference, per measure."""
    dense = DenseCache(model)
    results = dict(dense=throughput_dense(dense, chunk, args.chunks, args.decode_steps, 1, log))
    cache = LambdaCache(model, {} if args.n_local is None else {"n_local": args.n_local}, chunk)
    results["config"] = dict(vars(cache.config), num_pinned_pages=cache.config.num_pinned_pages,
                             num_ring_pages=cache.config.num_ring_pages)
    results["lminf"] = [throughput_lambda(cache, p, chunk, args.chunks, args.decode_steps, 2,
                                          log) for p in positions]
    results["dense_after"] = throughput_dense(dense, chunk, args.chunks, args.decode_steps, 3,
                                              log)
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):
        best = max(results["dense"][key], results["dense_after"][key])
        for r in results["lminf"]:
            r[key.split("_")[0] + "_vs_dense"] = r[key] / best
    rest = model_without_attention(model, args.chunks, 4, log)["prefill_ms_per_chunk"]
    results["model_without_attention"] = dict(prefill_ms_per_chunk=rest)
    for r in [results["dense"], results["dense_after"]] + results["lminf"]:
        r["attention_ms_per_chunk"] = r["prefill_ms_per_chunk"] - rest
        r["attention_ms_per_layer"] = r["attention_ms_per_chunk"] / model.layers
    return results


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--random-model", choices=sorted(RANDOM_MODELS), default=None,
                        help="random weights of this shape, drawn on the device (no --model)")
    parser.add_argument("--val", default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=200_000_000 + 16_384)
    parser.add_argument("--chunk", type=int, default=16_384)
    parser.add_argument("--seconds", type=float, default=1e9)
    parser.add_argument("--checkpoints", default=",".join(map(str, CHECKPOINTS)))
    parser.add_argument("--eval-tokens", type=int, default=16_384)
    parser.add_argument("--graph-steps", type=int, default=400)
    parser.add_argument("--n-local", type=int, default=None)
    parser.add_argument("--throughput", default=None, metavar="POSITIONS",
                        help="comma-separated stream positions: prefill and decode tokens/s "
                             "there (chunk = L) against the dense SDPA baseline at L, instead "
                             "of the perplexity stream")
    parser.add_argument("--chunks", type=int, default=24, help="timed prompt chunks (throughput)")
    parser.add_argument("--decode-steps", type=int, default=200, help="timed decode steps")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.device != "cpu" else torch.float32
    log = lambda s: print(s, flush=True)  # noqa: E731
    results = dict(date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                   device=(torch.cuda.get_device_name() if args.device != "cpu" else "cpu"),
                   torch=torch.__version__, args=vars(args))
    if args.random_model:
        cfg = RANDOM_MODELS[args.random_model]
        model = Llama(cfg, random_weights(cfg, args.device, dtype), args.device, dtype)
    else:
        cfg, weights = load_model_dir(Path(args.model))
        model = Llama(cfg, weights, args.device, dtype)
    results["model"] = dict(cfg, random=bool(args.random_model))

    def save():
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)

    if args.throughput:
        if args.device == "cpu":
            raise SystemExit("--throughput times CUDA graphs: run it on the GPU")
        positions = [int(float(p)) for p in args.throughput.split(",")]
        results["throughput"] = throughput(model, positions, model.trained_length, args, log)
        save()
        t = results["throughput"]
        d, a = t["dense"], t["dense_after"]
        print(f"\n== throughput (bf16, chunk {model.trained_length}; dense SDPA at L, before / "
              f"after: prefill {d['prefill_tokens_per_s']:,.0f} / {a['prefill_tokens_per_s']:,.0f}"
              f" tok/s, decode {d['decode_tokens_per_s']:,.0f} / {a['decode_tokens_per_s']:,.0f}"
              f" tok/s) ==")
        for r in t["lminf"]:
            print(f"  lminf @ {r['position']:>11,}: prefill {r['prefill_tokens_per_s']:,.0f} "
                  f"tok/s (x{r['prefill_vs_dense']:.3f}), decode "
                  f"{r['decode_tokens_per_s']:,.0f} tok/s (x{r['decode_vs_dense']:.3f})")
        print("  prefill ms per chunk, enqueued / graph-replayed (device alone): Λ "
              + ", ".join(f"{r['prefill_ms_per_chunk']:.2f} / {r['prefill_graph_ms_per_chunk']}"
                          for r in t["lminf"]) + f"; dense {d['prefill_ms_per_chunk']:.2f} / "
              f"{d['prefill_graph_ms_per_chunk']}")
        print(f"  prefill chunk without attention {t['model_without_attention']['prefill_ms_per_chunk']:.2f}"
              f" ms; attention per layer: dense {d['attention_ms_per_layer']:.3f} / "
              f"{a['attention_ms_per_layer']:.3f} ms, lminf "
              + " / ".join(f"{r['attention_ms_per_layer']:.3f}" for r in t["lminf"]) + " ms")
        return

    val_path = Path(args.val) if args.val else next(p for p in DEFAULT_VAL if p.exists())
    val = np.load(val_path)
    overrides = {} if args.n_local is None else {"n_local": args.n_local}
    if args.device != "cpu" and args.graph_steps:
        results["decode_graph"] = decode_graph_check(LambdaCache(model, overrides, 64), val,
                                                     args.graph_steps, 600, log)
        save()
    cache = LambdaCache(model, overrides, args.chunk)
    results["config"] = dict(vars(cache.config), num_pinned_pages=cache.config.num_pinned_pages,
                             num_ring_pages=cache.config.num_ring_pages)
    text = Text(val, [int(c) for c in args.checkpoints.split(",")], args.eval_tokens)
    results["stream"] = stream(cache, text, args.tokens, args.chunk, args.seconds, log)
    save()
    s = results["stream"]
    print(f"\n== stream: {s['tokens']:,} tokens in {s['seconds']:.1f} s "
          f"({s['tokens_per_s'] / 1e6:.2f} M tok/s; 2e8 projected {s['projected_seconds_2e8']:.0f} s)")
    for cp, c in s["checkpoints"].items():
        print(f"  ppl @ {cp:>11,}: {c['perplexity']:.3f} (x{c.get('ratio_to_first', 1):.3f}) "
              f"mem {c['memory_allocated']}")


if __name__ == "__main__":
    main()
