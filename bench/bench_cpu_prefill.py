"""CPU prefill time of one long prompt, lminf vs the stock backend, engines side by side.

Both engines live in this process at once and take turns on the same prompt (lminf, stock,
lminf, stock, ...), so a machine whose load drifts during the run disturbs both sides
alike; the median of each side is reported with every run. Prefix caching is off on both,
the stock side gets the long-length override and a widened RoPE table, both chunk the
prefill alike (max_num_batched_tokens). The prompt is seeded random token ids (speed only).

    python bench/bench_cpu_prefill.py --model ~/.cache/lminf-vllm/SmolLM2-135M-Instruct \
        --prompt-tokens 16384
"""

import argparse
import os
import statistics
import sys
import time

import numpy as np

from common import MODEL_DIR, machine, save


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(MODEL_DIR))
    parser.add_argument("--prompt-tokens", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--kv-cache-gib", type=float, default=2.0)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()

    os.environ["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"  # the stock side only needs it
    from transformers import AutoConfig
    from vllm import LLM, SamplingParams

    model_config = AutoConfig.from_pretrained(args.model)
    max_len = args.prompt_tokens + 2
    common = dict(model=args.model, dtype=args.dtype, max_model_len=max_len, max_num_seqs=1,
                  max_num_batched_tokens=args.max_num_batched_tokens, seed=0,
                  enable_prefix_caching=False, enforce_eager=True,
                  kv_cache_memory_bytes=int(args.kv_cache_gib * (1 << 30)))
    engines = {
        "lminf": LLM(**common, attention_backend="lminf"),
        "stock": LLM(**common, hf_overrides={"max_position_embeddings": max(
            max_len, model_config.max_position_embeddings)}),
    }
    rng = np.random.default_rng(0)
    prompt = {"prompt_token_ids": rng.integers(0, model_config.vocab_size,
                                               args.prompt_tokens).tolist()}
    params = SamplingParams(max_tokens=1)
    runs = {name: [] for name in engines}
    for _ in range(args.repeats):
        for name, llm in engines.items():
            start = time.perf_counter()
            llm.generate(prompt, params, use_tqdm=False)
            runs[name].append(time.perf_counter() - start)
            print(f"{name}: {runs[name][-1]:.1f} s", flush=True)
    median = {name: statistics.median(times) for name, times in runs.items()}
    print(f"\n{args.prompt_tokens}-token prompt, {args.dtype}, {machine()['cpu']} "
          f"({machine()['cores']} cores)")
    for name in engines:
        print(f"{name:>6}: {median[name]:7.1f} s  ({args.prompt_tokens / median[name]:6.1f} "
              f"tokens/s)  runs {', '.join(f'{t:.1f}' for t in runs[name])}")
    print(f"lminf speed / stock speed: {median['stock'] / median['lminf']:.2f}")
    path = save("prefill_side_by_side", {
        "settings": vars(args), "command": " ".join(sys.argv), "runs_seconds": runs,
        "median_seconds": median, "lminf_speedup_over_stock": median["stock"] / median["lminf"]})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
