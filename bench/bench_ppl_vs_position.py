"""Perplexity by position segment, lminf vs the stock backend, on held-out text.

Both engines score the same windows of val text (tokens the tiny model never saw) with
prompt logprobs, in one run. The stock side gets a RoPE table widened to the window length
(hf_overrides max_position_embeddings): without it vLLM reads past the cos/sin table and
returns NaN, which would hide the real failure (dense attention past L).

    python bench/bench_ppl_vs_position.py                 # 16 windows of 4,096 tokens
    python bench/bench_ppl_vs_position.py --windows 2 --length 1024   # quick look
"""

import argparse
import math
import time

import numpy as np

from common import MODEL_DIR, machine, save, shutdown, val_tokens

SEGMENTS = [(0, 256), (256, 512), (512, 1024), (1024, 2048), (2048, 4096), (4096, 8192),
            (8192, 16384)]


def window_starts(num_tokens: int, length: int, windows: int) -> list[int]:
    """Evenly spread, non-overlapping windows over the held-out text."""
    stride = (num_tokens - length) // max(windows - 1, 1)
    if stride < length:
        raise SystemExit(f"--windows {windows} x --length {length} does not fit in "
                         f"{num_tokens} held-out tokens")
    return [i * stride for i in range(windows)]


def score(engine_kwargs: dict, prompts: list[list[int]]) -> tuple[np.ndarray, float]:
    from vllm import LLM, SamplingParams

    llm = LLM(**engine_kwargs)
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(max_tokens=1, prompt_logprobs=0))
    seconds = time.perf_counter() - start
    shutdown(llm)
    logprobs = np.array([[row[t].logprob for row, t in zip(o.prompt_logprobs[1:],
                                                           o.prompt_token_ids[1:])]
                         for o in outs])
    return logprobs, seconds


def segment_perplexity(logprobs: np.ndarray, length: int) -> dict[str, float]:
    """Pooled over windows: exp(-mean logprob) of the predictions made at positions a..b-1."""
    return {f"{a}-{b}": float(math.exp(-logprobs[:, a:min(b, length - 1)].mean()))
            for a, b in SEGMENTS if a < length - 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()

    tokens = val_tokens()
    prompts = [tokens[s:s + args.length].tolist()
               for s in window_starts(len(tokens), args.length, args.windows)]
    common = dict(model=str(MODEL_DIR), dtype=args.dtype, gpu_memory_utilization=0.3,
                  max_model_len=args.length + 1, max_num_seqs=4, seed=0)
    runs = {
        "lminf": dict(common, attention_backend="lminf"),
        "stock": dict(common, hf_overrides={"max_position_embeddings": args.length + 1}),
    }
    table, seconds = {}, {}
    for name, kwargs in runs.items():
        logprobs, seconds[name] = score(kwargs, prompts)
        table[name] = segment_perplexity(logprobs, args.length)

    first = table["lminf"]["0-256"]
    print(f"\nPerplexity by position, {args.windows} windows x {args.length} tokens of "
          f"held-out text, tiny-llama-L256 (L = 256), {machine()['cpu']}")
    print(f"{'segment':>12} {'lminf':>9} {'stock':>9}   lminf / its 0-256")
    for segment in table["lminf"]:
        print(f"{segment:>12} {table['lminf'][segment]:9.2f} {table['stock'][segment]:9.2f}"
              f"   {table['lminf'][segment] / first:8.3f}")
    ratios = [v / first for v in table["lminf"].values()]
    print(f"lminf / its 0-256 value ranges over [{min(ratios):.3f}, {max(ratios):.3f}] "
          "(goal: within 10%)")
    path = save(f"ppl_vs_position_{args.windows}x{args.length}", {
        "settings": {**vars(args), "n_global": 64, "n_local": 256, "trained_length": 256,
                     "page_size": "auto (16)", "stock_rope_table": args.length},
        "perplexity": table, "lminf_ratio_to_first_segment": [min(ratios), max(ratios)],
        "scoring_seconds": seconds})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
