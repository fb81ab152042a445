"""Host side: engine start time, prefill and decode tokens/s, lminf vs the stock backend.

Same model, same prompts (held-out text), same machine, one run; each engine is started,
measured and shut down in turn, and the ratio lminf / stock is reported. Prefix caching is
off on both sides (lminf turns it off; the stock engine would otherwise serve the repeated
prompts from its cache), and one untimed pass warms each engine up first.

    python bench/bench_host.py                       # 4 prompts x 2,048 tokens, 3 repeats
"""

import argparse
import statistics
import time

from common import MODEL_DIR, machine, save, shutdown, val_tokens


def measure(engine_kwargs: dict, prompts: list[list[int]], decode_tokens: int,
            repeats: int) -> dict:
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(**engine_kwargs)
    start_seconds = time.perf_counter() - start
    inputs = [{"prompt_token_ids": p} for p in prompts]
    llm.generate(inputs, SamplingParams(max_tokens=2), use_tqdm=False)
    prefill, decode = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        llm.generate(inputs, SamplingParams(max_tokens=1), use_tqdm=False)
        prefill.append(sum(map(len, prompts)) / (time.perf_counter() - t))
        t = time.perf_counter()
        llm.generate(inputs, SamplingParams(max_tokens=decode_tokens + 1, ignore_eos=True),
                     use_tqdm=False)
        # the prefill of the same prompts is subtracted at its measured rate
        elapsed = time.perf_counter() - t - sum(map(len, prompts)) / prefill[-1]
        decode.append(len(prompts) * decode_tokens / elapsed)
    shutdown(llm)
    return {"engine_start_seconds": start_seconds,
            "prefill_tokens_per_second": statistics.median(prefill),
            "prefill_runs": prefill,
            "decode_tokens_per_second": statistics.median(decode), "decode_runs": decode}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=2048)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    # float32: on AVX2 CPUs without AVX512-BF16, oneDNN has no bf16 matmul and vLLM falls
    # back to torch.nn.functional.linear for both backends, which then dominates.
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()

    tokens = val_tokens()
    prompts = [tokens[i * 20_000:i * 20_000 + args.prompt_tokens].tolist()
               for i in range(args.prompts)]
    max_len = args.prompt_tokens + args.decode_tokens + 1
    common = dict(model=str(MODEL_DIR), dtype=args.dtype, gpu_memory_utilization=0.3,
                  max_model_len=max_len, max_num_seqs=args.prompts, seed=0,
                  enable_prefix_caching=False)
    results = {
        "lminf": measure(dict(common, attention_backend="lminf"), prompts,
                         args.decode_tokens, args.repeats),
        "stock": measure(dict(common, hf_overrides={"max_position_embeddings": max_len}),
                         prompts, args.decode_tokens, args.repeats),
    }
    print(f"\n{args.prompts} prompts x {args.prompt_tokens} tokens, {args.dtype}, "
          f"{machine()['cpu']} ({machine()['cores']} cores)")
    print(f"{'':>28} {'lminf':>10} {'stock':>10} {'lminf/stock':>12}")
    for key in ("engine_start_seconds", "prefill_tokens_per_second",
                "decode_tokens_per_second"):
        a, b = results["lminf"][key], results["stock"][key]
        print(f"{key:>28} {a:10.1f} {b:10.1f} {a / b:12.2f}")
    print(f"saved {save('host', {'settings': vars(args), **results})}")


if __name__ == "__main__":
    main()
