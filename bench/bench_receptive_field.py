"""Time to first token against prompt length, receptive-field prefill on vs off (issue #13).

One engine per side, in turn, in one run: the tiny model with lminf defaults (n_global 64,
n_local 256, B 16, chunk 256), lminf.receptive_field_prefill true or false. Each prompt
(held-out tokens, L to the largest multiple asked for; repeated past 602L, below) is
generated with max_tokens=1, so the wall time is the prefill plus one sampled token; the
median of --repeats runs is kept.
With skipping, every prompt past about 1.8K tokens computes its first chunk and its last
R + up to B - 1 tokens (R = 6 · 255 + 1), so its time should be flat beyond that.

    python bench/bench_receptive_field.py                 # L .. 64L
    python bench/bench_receptive_field.py --multiples 1,4,16,64,256,512,1024

Prompts longer than the held-out text (154,255 tokens, about 602L) repeat it from its
start (np.resize).
"""

from __future__ import annotations

import argparse
import statistics
import time

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from common import MODEL_DIR, RESULTS, save, shutdown, val_tokens  # noqa: E402

TRAINED_LENGTH = 256


def time_prompts(skipping: bool, prompts: dict[int, list[int]], repeats: int) -> dict:
    from vllm import LLM, SamplingParams

    llm = LLM(str(MODEL_DIR), attention_backend="lminf", dtype="float32",
              max_model_len=max(prompts) + 64, max_num_seqs=1, enforce_eager=True, seed=0,
              gpu_memory_utilization=0.3,
              additional_config={"lminf": {"receptive_field_prefill": skipping}})
    params = SamplingParams(max_tokens=1, temperature=0)
    llm.generate([{"prompt_token_ids": prompts[min(prompts)]}], params, use_tqdm=False)  # warm
    seconds = {}
    for length, prompt in prompts.items():
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
            runs.append(time.perf_counter() - start)
        seconds[length] = statistics.median(runs)
        print(f"skipping={skipping} {length:>7} tokens: {seconds[length]:.3f} s "
              f"(runs {', '.join(f'{r:.3f}' for r in runs)})", flush=True)
    shutdown(llm)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--multiples", default="1,2,4,8,16,32,64",
                        help="prompt lengths in units of L = 256")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tag", default="",
                        help="appended to the result's name (keeps an earlier run's file)")
    args = parser.parse_args()
    tokens = val_tokens()
    lengths = [int(m) * TRAINED_LENGTH for m in args.multiples.split(",")]
    # Past its end the held-out text is repeated from its start: the prompt stays real
    # text (what the model computes on), and neither side caches anything across it.
    prompts = {n: np.resize(tokens, n).tolist() for n in lengths}
    on = time_prompts(True, prompts, args.repeats)
    off = time_prompts(False, prompts, args.repeats)
    rows = [{"prompt_tokens": n, "skipping_s": on[n], "full_s": off[n],
             "speedup": off[n] / on[n]} for n in lengths]
    path = save("receptive_field_ttft" + (f"_{args.tag}" if args.tag else ""), {
        "command": "python bench/bench_receptive_field.py " + " ".join(
            f"--{k} {v}" for k, v in vars(args).items()),
        "settings": {"model": "tiny-llama-L256 (6 layers)", "n_global": 64, "n_local": 256,
                     "page_size": 16, "max_prefill_chunk_tokens": 256, "max_tokens": 1,
                     "repeats": args.repeats, "statistic": "median wall time of generate",
                     "text": f"held-out tokens (shared/data/val.npy, {len(tokens)} tokens), "
                             f"repeated from the start past their end"},
        "rows": rows})
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot(lengths, [off[n] for n in lengths], "o-", label="every prompt token computed")
    axis.plot(lengths, [on[n] for n in lengths], "o-", label="receptive-field prefill")
    axis.set(xscale="log", yscale="log", xlabel="prompt tokens",
             ylabel="time to first token (s)",
             title="tiny model, CPU: TTFT vs prompt length")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path.with_suffix(".png"), dpi=120)
    print(f"wrote {path} and {path.with_suffix('.png').name}")
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
