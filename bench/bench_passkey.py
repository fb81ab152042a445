"""Passkey retrieval, lminf vs the stock backend, SmolLM2-135M-Instruct (JSON + table).

The standard task (Mohtashami & Jaggi 2023, used by LM-Infinite): a random 5-digit key is
stated once inside repeated filler text at a chosen depth, and the model is asked to repeat
it. The prompt goes through SmolLM2-Instruct's chat template; decoding is greedy, and a
reply counts as correct when it contains the key. Lengths are whole prompts in tokens
(template included); depth 0% puts the key right after the task statement, 100% right
before the question. The stock side gets its RoPE table widened to the longest prompt
(hf_overrides), as in bench_ppl_vs_position.py.

What LM-Infinite predicts (n_global 64, n_local = L = 8,192 unless --n-local): a key in the
global prefix or in the last n_local tokens is visible to the question's tokens; one in the
evicted middle is not visible in the first layer, and only what earlier layers carried
forward inside the window can reach the answer. Results are
saved after each prompt, so a run cut short keeps what it measured.

    python bench/bench_passkey.py                                   # 2K..16K, 5 depths, 2 keys
    python bench/bench_passkey.py --lengths 2048 4096 --keys 1      # quick look
    python bench/bench_passkey.py --combine bench/results/*_passkey_*.json   # one table
"""

import argparse
import random
import time
from pathlib import Path

from common import RESULTS, machine, save, shutdown

TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
        "memorize it. I will quiz you about the important information there.\n\n")
FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again. ")
KEY_SENTENCE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\n\nWhat is the pass key? Answer with the number only."
MAX_REPLY_TOKENS = 12


def build_prompt(tokenizer, length: int, depth: float, key: int) -> tuple[list[int], int]:
    """Token ids of a chat prompt of about `length` tokens, and the key's token position.

    The filler is repeated to fill the length; the key sentence goes between filler
    sentences at the given fraction of them.
    """
    def chat_text(body: str) -> str:
        return tokenizer.apply_chat_template([{"role": "user", "content": body}],
                                             tokenize=False, add_generation_prompt=True)

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    key_text = KEY_SENTENCE.format(key=key)
    fixed = count(chat_text(TASK + key_text + QUESTION))
    per_filler = count(FILLER * 64) / 64
    repeats = max(0, int((length - fixed) / per_filler))
    before = round(repeats * depth)
    text = chat_text(TASK + FILLER * before + key_text + FILLER * (repeats - before) + QUESTION)
    return (tokenizer(text, add_special_tokens=False)["input_ids"],
            count(text[:text.index(key_text)]))


def run_side(llm, name: str, cases: list[dict], prompts: list[list[int]]) -> float:
    """Greedy replies for the prompts; marks each case correct or not. Returns seconds."""
    from vllm import SamplingParams

    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=MAX_REPLY_TOKENS))
    seconds = time.perf_counter() - start
    for case, out in zip(cases, outs):
        reply = out.outputs[0].text
        case[name] = {"reply": reply, "correct": str(case["key"]) in reply}
    return seconds


def accuracy_table(cases: list[dict], sides: list[str]) -> dict:
    """side -> length -> depth -> fraction correct."""
    table = {}
    for side in sides:
        for case in sorted(cases, key=lambda case: case["length"]):  # rows by length
            if side not in case:
                continue
            cell = table.setdefault(side, {}).setdefault(str(case["length"]), {}) \
                .setdefault(f"{case['depth']:.0%}", [])
            cell.append(case[side]["correct"])
    return {side: {length: {depth: sum(v) / len(v) for depth, v in depths.items()}
                   for length, depths in lengths.items()}
            for side, lengths in table.items()}


def print_table(table: dict, depths: list[float]) -> None:
    header = " ".join(f"{d:>6.0%}" for d in depths)
    for side, lengths in table.items():
        print(f"\n{side}: fraction of keys retrieved\n{'length':>8} {header}")
        for length, row in lengths.items():
            print(f"{length:>8} " + " ".join(f"{row.get(f'{d:.0%}', float('nan')):6.2f}"
                                               for d in depths))


def combine(paths: list[Path], results_dir: Path) -> None:
    """One accuracy table (JSON + PNG) from the cases of several saved runs."""
    import json

    from plots import plot_passkey

    # a combined table among the inputs (a glob over the results) is an earlier output
    loaded = [(p, json.loads(p.read_text())) for p in paths]
    paths, runs = [p for p, run in loaded if "sources" not in run], [
        run for _, run in loaded if "sources" not in run]
    cases = [case for run in runs for case in run["cases"]]
    sides = [s for s in ("lminf", "stock") if any(s in case for case in cases)]
    table = accuracy_table(cases, sides)
    depths = sorted({case["depth"] for case in cases})
    keys = {side: {f"{length}/{depth:.0%}": n for (length, depth), n in
                   _cell_counts([c for c in cases if side in c]).items()} for side in sides}
    print_table(table, depths)
    path = save("passkey_smollm2_combined",
                {"sources": [{"file": p.name, "date": run["machine"]["date"],
                              "settings": run["settings"], "seconds": run["seconds"]}
                             for p, run in zip(paths, runs)],
                 "accuracy": table, "keys_per_cell": keys, "cases": cases}, results_dir,
                replace=True)
    png = plot_passkey(path.with_suffix(".png"), table, [f"{d:.0%}" for d in depths],
                       "SmolLM2-135M-Instruct passkey, fraction of keys")
    print(f"saved {path}\nplot  {png}")


def _cell_counts(cases: list[dict]) -> dict[tuple[int, float], int]:
    counts = {}
    for case in cases:
        counts[case["length"], case["depth"]] = counts.get((case["length"], case["depth"]), 0) + 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--depths", type=float, nargs="+", default=[0, 0.25, 0.5, 0.75, 1])
    parser.add_argument("--keys", type=int, default=2, help="keys per (length, depth) cell")
    parser.add_argument("--sides", nargs="+", default=["lminf", "stock"],
                        choices=["lminf", "stock"])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--n-local", type=int, default=None,
                        help="lminf's window (default L = 8,192); a shorter one shows the "
                             "eviction pattern at shorter, cheaper lengths")
    parser.add_argument("--eager", action="store_true",
                        help="no torch.compile warm-up (minutes on a crowded 2-core machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--combine", type=Path, nargs="+", default=None,
                        help="run nothing: pool the cases of these saved results (runs split "
                             "by length, side or --seed) into one table, JSON + PNG")
    args = parser.parse_args()
    if args.combine:
        combine(args.combine, args.results_dir)
        return

    import smollm2
    from transformers import AutoTokenizer

    checkpoint = smollm2.checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    rng = random.Random(args.seed)
    cases, prompts = [], []
    for length in args.lengths:
        for depth in args.depths:
            for _ in range(args.keys):
                key = rng.randint(10_000, 99_999)
                ids, key_position = build_prompt(tokenizer, length, depth, key)
                cases.append({"length": length, "depth": depth, "key": key,
                              "prompt_tokens": len(ids), "key_position": key_position})
                prompts.append(ids)
    longest = max(len(p) for p in prompts) + MAX_REPLY_TOKENS
    common = dict(model=str(checkpoint), dtype=args.dtype, gpu_memory_utilization=0.3,
                  max_num_seqs=4, seed=0, max_model_len=longest, enforce_eager=args.eager,
                  max_num_batched_tokens=args.max_num_batched_tokens)
    window = {"n_local": args.n_local} if args.n_local else {}
    engines = {
        "lminf": dict(common, attention_backend="lminf",
                      additional_config={"lminf": window}),
        # Prefix caching stays on (vLLM's default): the prompts share their filler, and the
        # stock side's time is not the point of this benchmark (bench_ppl_vs_position is).
        "stock": dict(common, hf_overrides={"max_position_embeddings": longest}),
    }
    seconds = {}
    name = f"passkey_smollm2_{'-'.join(map(str, args.lengths))}_{'-'.join(args.sides)}"
    from vllm import LLM

    for side in args.sides:
        llm = LLM(**engines[side])
        for length in args.lengths:
            picked = [i for i, c in enumerate(cases) if c["length"] == length]
            print(f"{side}: {len(picked)} prompts of {length} tokens", flush=True)
            seconds[f"{side}_{length}"] = 0.0
            # One prompt at a time, saved after each: a run cut short keeps every reply it
            # got. (Batching them gains little: chunked prefill runs one prompt's chunk
            # per step at these lengths.)
            for i in picked:
                seconds[f"{side}_{length}"] += run_side(llm, side, [cases[i]], [prompts[i]])
                table = accuracy_table(cases, args.sides)
                path = save(name, {"settings": {**{k: str(v) if isinstance(v, Path) else v
                                                   for k, v in vars(args).items()},
                                                "model_dir": checkpoint.name,
                                                "lminf": {"n_global": 64, "trained_length": 8192,
                                                          "n_local": args.n_local or 8192,
                                                          "page_size": "auto (128)"},
                                                "stock_rope_table": longest},
                                   "accuracy": table, "seconds": seconds, "cases": cases},
                            args.results_dir)
        shutdown(llm)
    print_table(accuracy_table(cases, args.sides), args.depths)
    for key, value in seconds.items():
        print(f"{key}: {value:.0f} s")
    print(f"saved {path} ({machine()['cpu']})")


if __name__ == "__main__":
    main()
