"""Stream runner: one long stream through the tiny Llama with the plugin's planning, cache and kernels.

No vLLM (the GPU machine has none): the model's safetensors run layer by layer in plain
PyTorch, with exactly what the plugin does inside vLLM around attention:
  * RoPE is fed positions mod B (the page-local key frame, DESIGN §3);
  * new keys/values go to the paged cache through plan.slot_block/slot_offset (attention.write_kv);
  * attention.run dispatches to the Triton kernels on CUDA (the reference on CPU);
  * one request owns G pinned pages and a ring of R pages (num_ring_pages), so the cache
    never grows however long the stream.

Parts:
  1. the stream: the val text cycled, fed in chunks of --chunk tokens, up to --tokens or until
     --seconds run out; perplexity over the --eval-tokens tokens after each checkpoint (those
     tokens are always val[:eval_tokens], so every checkpoint scores the same text), GPU memory
     and the token rate at each checkpoint.
  2. CUDA graphs (on CUDA): the decode step (embedding to logits, kernels included) is captured
     once with torch.cuda.CUDAGraph and replayed for --graph-steps tokens across a ring wrap;
     logits must equal an eager run from the same cache state.

    python bench/stream_runner.py --tokens 200000000 --out stream.json       # GPU
    python bench/stream_runner.py --device cpu --tokens 3000 --chunk 256 \
        --checkpoints 1000,2000 --eval-tokens 256 --out /tmp/s.json           # CPU smoke test
"""

from __future__ import annotations

import argparse
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
from lminf_vllm.attention import (AttentionPlan, TileGroup, build_plan,  # noqa: E402
                                  plan_tile_queries, rotation_for)
from lminf_vllm.attention.rotation import QueryRotation, rotate  # noqa: E402
from lminf_vllm.config import DEFAULT_N_GLOBAL, LMInfConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "tests/assets/tiny-llama-L256"
DEFAULT_VAL = [ROOT / ".gpudata/val.npy", Path("/work/shared/data/val.npy")]
CHECKPOINTS = (10_000, 100_000, 1_000_000, 10_000_000, 100_000_000, 200_000_000)
PAGE_SIZE = 16
DECODE_PAGES = 32  # fixed page width of the decode plan (>= G + window pages), for graphs


class TinyLlama:
    """A Llama forward over the plugin's paged cache, one chunk of one stream at a time."""

    def __init__(self, model_dir: Path, device, dtype, config_overrides: dict, chunk: int):
        cfg = json.loads((model_dir / "config.json").read_text())
        weights = {}
        for shard in sorted(model_dir.glob("*.safetensors")):
            weights.update(load_file(str(shard)))
        self.w = {k.removeprefix("model."): v.to(device=device, dtype=dtype)
                  for k, v in weights.items()}
        if "lm_head.weight" not in self.w:
            self.w["lm_head.weight"] = self.w["embed_tokens.weight"]  # tied
        self.layers = cfg["num_hidden_layers"]
        self.heads = cfg["num_attention_heads"]
        self.kv_heads = cfg["num_key_value_heads"]
        self.head_dim = cfg.get("head_dim", cfg["hidden_size"] // self.heads)
        self.eps = cfg["rms_norm_eps"]
        self.device, self.dtype = device, dtype
        trained_length = cfg["max_position_embeddings"]
        theta = cfg.get("rope_parameters", {}).get("rope_theta", cfg.get("rope_theta", 10000.0))
        inv_freq = 1.0 / theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float64)
                                   / self.head_dim)
        angle = torch.arange(trained_length + 1, dtype=torch.float64)[:, None] * inv_freq
        table = torch.cat([angle.cos(), angle.sin()], dim=1).float()      # the model's cache
        model_rotation = QueryRotation.from_model_table(table, trained_length + 1, True)
        self.rope_cos = table[:, : self.head_dim // 2].to(device)
        self.rope_sin = table[:, self.head_dim // 2:].to(device)
        self.config = LMInfConfig(
            n_global=config_overrides.get("n_global", DEFAULT_N_GLOBAL),
            n_local=config_overrides.get("n_local", trained_length),
            trained_length=trained_length, page_size=PAGE_SIZE, max_prefill_chunk_tokens=chunk)
        # the table and tiles the backend uses on this device
        self.rotation = rotation_for(model_rotation, self.config, device)
        self.tile_queries = plan_tile_queries(self.config, device)
        width = self.config.num_pinned_pages + self.config.num_ring_pages
        self.block_table = torch.arange(width).view(1, width)             # host, one request
        self.kv = [torch.zeros(width, self.kv_heads, PAGE_SIZE, 2 * self.head_dim,
                               device=device, dtype=dtype) for _ in range(self.layers)]
        self.scale = self.head_dim ** -0.5

    def plan(self, start: int, length: int, min_pages: int = 0) -> AttentionPlan:
        """The step's plan, built on the host and moved without a sync."""
        plan = build_plan(self.config, np.array([0, length]), np.array([start + length]),
                          self.block_table, num_ring_pages=self.config.num_ring_pages,
                          tile_queries=self.tile_queries, min_pages=min_pages)
        return to_device(plan, self.device)

    def rms(self, x, name):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.w[name].float()).to(self.dtype)

    def forward(self, tokens, frame_position, plan: AttentionPlan):
        """Logits [T, vocab] float32 of tokens [T] whose key-frame positions are given."""
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
            attention.write_kv(plan, k, v, self.kv[i])
            out = torch.empty_like(q)
            attention.run(plan, q, self.kv[i], out, self.rotation, self.scale)
            x = x + out.view(t, -1) @ w[p + "self_attn.o_proj.weight"].T
            h = self.rms(x, p + "post_attention_layernorm.weight")
            gate = F.silu(h @ w[p + "mlp.gate_proj.weight"].T)
            x = x + (gate * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
        x = self.rms(x, "norm.weight")
        return (x @ w["lm_head.weight"].T).float()


def to_device(plan: AttentionPlan, device) -> AttentionPlan:
    if torch.device(device).type == "cpu":
        return plan
    move = lambda x: x.pin_memory().to(device, non_blocking=True)  # noqa: E731
    return AttentionPlan(plan.config, move(plan.slot_block), move(plan.slot_offset),
                         tuple(TileGroup(*(move(x) for x in (g.query_rows, g.query_position,
                                                             g.page_block, g.page_base)))
                               for g in plan.groups))


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


def stream(model: TinyLlama, text: Text, total: int, chunk: int, seconds: float, log):
    """Feed the stream; return per-checkpoint perplexity, memory and timing."""
    device = model.device
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
        frame = torch.arange(position, position + length, device=device) % PAGE_SIZE
        plan = model.plan(position, length)
        logits = model.forward(ids_t[:-1], frame, plan)
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


def decode_graph_check(model_dir, device, dtype, val, steps: int, prefill: int, log):
    """Decode steps eager vs replayed from one captured CUDA graph, across a ring wrap."""
    chunk = 64
    model = TinyLlama(model_dir, device, dtype, {}, chunk)
    ring_tokens = model.config.num_ring_pages * PAGE_SIZE
    text = Text(val, [], 0)
    for start in range(0, prefill, chunk):
        ids = torch.from_numpy(text.tokens(start, start + chunk)).to(device)
        frame = torch.arange(start, start + chunk, device=device) % PAGE_SIZE
        model.forward(ids, frame, model.plan(start, chunk))
    saved = [k.clone() for k in model.kv]
    ids = torch.from_numpy(text.tokens(prefill, prefill + steps)).to(device)

    # eager
    eager = []
    for s in range(steps):
        pos = prefill + s
        plan = model.plan(pos, 1, min_pages=DECODE_PAGES)
        frame = torch.tensor([pos % PAGE_SIZE], device=device)
        eager.append(model.forward(ids[s:s + 1], frame, plan))
    eager = torch.cat(eager)

    # graph: static inputs, refreshed by copies before each replay
    for k, s in zip(model.kv, saved):
        k.copy_(s)
    static_plan = model.plan(prefill, 1, min_pages=DECODE_PAGES)
    static_token = ids[:1].clone()
    static_frame = torch.tensor([prefill % PAGE_SIZE], device=device)

    def refresh(pos, s):
        plan = model.plan(pos, 1, min_pages=DECODE_PAGES)
        static_plan.slot_block.copy_(plan.slot_block)
        static_plan.slot_offset.copy_(plan.slot_offset)
        for a, b in zip(static_plan.groups, plan.groups):
            for x, y in zip((a.query_rows, a.query_position, a.page_block, a.page_base),
                            (b.query_rows, b.query_position, b.page_block, b.page_base)):
                x.copy_(y)
        static_token.copy_(ids[s:s + 1])
        static_frame.fill_(pos % PAGE_SIZE)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up compiles every kernel outside the capture
        model.forward(static_token, static_frame, static_plan)
    torch.cuda.current_stream().wait_stream(side)
    for k, s in zip(model.kv, saved):
        k.copy_(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_logits = model.forward(static_token, static_frame, static_plan)
    replayed = []
    torch.cuda.synchronize()
    t0 = time.time()
    for s in range(steps):
        refresh(prefill + s, s)
        graph.replay()
        replayed.append(static_logits.clone())
    torch.cuda.synchronize()
    replay_s = time.time() - t0
    replayed = torch.cat(replayed)
    # replay time alone, without the host-side planning
    t1 = time.time()
    for _ in range(steps):
        graph.replay()
    torch.cuda.synchronize()
    pure_replay_s = time.time() - t1
    diff = (replayed - eager).abs().max().item()
    result = dict(steps=steps, prefill_tokens=prefill, ring_tokens=ring_tokens,
                  crosses_ring_wrap=steps > ring_tokens, max_abs_logit_diff=diff,
                  equal=diff == 0.0, ms_per_step_with_planning=1e3 * replay_s / steps,
                  ms_per_step_replay_only=1e3 * pure_replay_s / steps)
    log(f"decode graph: {result}")
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--val", default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=200_000_000 + 16_384)
    parser.add_argument("--chunk", type=int, default=16_384)
    parser.add_argument("--seconds", type=float, default=1e9)
    parser.add_argument("--checkpoints", default=",".join(map(str, CHECKPOINTS)))
    parser.add_argument("--eval-tokens", type=int, default=16_384)
    parser.add_argument("--graph-steps", type=int, default=400)
    parser.add_argument("--n-local", type=int, default=None)
    args = parser.parse_args()
    val_path = Path(args.val) if args.val else next(p for p in DEFAULT_VAL if p.exists())
    val = np.load(val_path)
    dtype = torch.bfloat16 if args.device != "cpu" else torch.float32
    log = lambda s: print(s, flush=True)  # noqa: E731
    results = dict(date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                   device=(torch.cuda.get_device_name() if args.device != "cpu" else "cpu"),
                   torch=torch.__version__, args=vars(args))

    def save():
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)

    if args.device != "cpu" and args.graph_steps:
        results["decode_graph"] = decode_graph_check(Path(args.model), args.device, dtype, val,
                                                     args.graph_steps, 600, log)
        save()
    overrides = {} if args.n_local is None else {"n_local": args.n_local}
    model = TinyLlama(Path(args.model), args.device, dtype, overrides, args.chunk)
    results["config"] = dict(vars(model.config), num_pinned_pages=model.config.num_pinned_pages,
                             num_ring_pages=model.config.num_ring_pages)
    text = Text(val, [int(c) for c in args.checkpoints.split(",")], args.eval_tokens)
    results["stream"] = stream(model, text, args.tokens, args.chunk, args.seconds, log)
    save()
    s = results["stream"]
    print(f"\n== stream: {s['tokens']:,} tokens in {s['seconds']:.1f} s "
          f"({s['tokens_per_s'] / 1e6:.2f} M tok/s; 2e8 projected {s['projected_seconds_2e8']:.0f} s)")
    for cp, c in s["checkpoints"].items():
        print(f"  ppl @ {cp:>11,}: {c['perplexity']:.3f} (x{c.get('ratio_to_first', 1):.3f}) "
              f"mem {c['memory_allocated']}")


if __name__ == "__main__":
    main()
