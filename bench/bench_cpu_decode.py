"""CPU decode tokens/s against context length, lminf vs the stock backend, with `vllm bench throughput`.

Same model, dtype, batch and random prompts (vLLM's random dataset, seeded) on both sides,
prefix caching off on both; the stock side gets the long-length override and a widened RoPE
table past the trained length. Each point runs vLLM's own `vllm bench throughput` twice on
one batch of prompts, with 1 and with 1 + N output tokens:
decode tokens/s = batch * N / (elapsed(1 + N) - elapsed(1)), so the prefill cancels out.
(`vllm bench latency` would fit better but draws token ids below 10,000, past the tiny
model's vocabulary of 8,192.)

    python bench/bench_cpu_decode.py                      # contexts L/4 .. 64L, tiny model
    python bench/bench_cpu_decode.py --contexts 256 4096  # a subset
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

from common import MODEL_DIR, RESULTS, machine, save

TRAINED_LENGTH = 256  # the tiny model's


def elapsed_seconds(backend: str, context: int, output_len: int, args) -> float:
    """Wall time of one batch through `vllm bench throughput` (a fresh engine)."""
    max_len = context + output_len + 1
    command = ["vllm", "bench", "throughput", "--model", str(args.model), "--dtype", args.dtype,
               "--dataset-name", "random", "--random-input-len", str(context),
               "--random-output-len", str(output_len), "--random-range-ratio", "0",
               "--num-prompts", str(args.batch), "--max-num-seqs", str(args.batch),
               "--max-model-len", str(max_len),
               "--no-enable-prefix-caching", "--enforce-eager", "--seed", "0",
               "--kv-cache-memory-bytes", str(args.kv_cache_gib << 30)]
    env = dict(os.environ)
    if backend == "lminf":
        command += ["--attention-backend", "lminf"]
    elif max_len > TRAINED_LENGTH:
        command += ["--hf-overrides", json.dumps({"max_position_embeddings": max_len})]
        env["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "throughput.json"
        run = subprocess.run(command + ["--output-json", str(out)], env=env,
                             capture_output=True, text=True)
        if run.returncode:
            sys.stderr.write(run.stdout[-3000:] + run.stderr[-3000:])
            raise RuntimeError(f"vllm bench throughput failed: {' '.join(command)}")
        return json.loads(out.read_text())["elapsed_time"]


def plot(points: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for backend in ("lminf", "stock"):
        rows = [p for p in points if p["backend"] == backend]
        ax.plot([p["context"] for p in rows], [p["decode_tokens_per_second"] for p in rows],
                marker="o", label=backend)
    ax.axvline(TRAINED_LENGTH, color="grey", linestyle=":", label="trained length L")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("decode tokens/s (batch of 4)")
    ax.set_title("CPU decode, tiny model, vllm bench throughput")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=MODEL_DIR)
    parser.add_argument("--contexts", type=int, nargs="+",
                        default=[TRAINED_LENGTH * f for f in (0.25, 1, 4, 16, 64)])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--kv-cache-gib", type=int, default=2)
    args = parser.parse_args()

    sweep = [(context, backend) for context in map(int, args.contexts)
             for backend in ("lminf", "stock")]
    points = []
    for context, backend in tqdm(sweep, desc="decode sweep", unit="point"):
        prefill = elapsed_seconds(backend, context, 1, args)
        full = elapsed_seconds(backend, context, 1 + args.decode_tokens, args)
        points.append({"backend": backend, "context": context,
                       "elapsed_output_1_s": prefill,
                       f"elapsed_output_{1 + args.decode_tokens}_s": full,
                       "decode_tokens_per_second":
                           args.batch * args.decode_tokens / (full - prefill)})
    print(f"\n{'context':>8} {'lminf tok/s':>12} {'stock tok/s':>12} {'lminf/stock':>12}")
    for context in map(int, args.contexts):
        a, b = (next(p["decode_tokens_per_second"] for p in points
                     if p["backend"] == side and p["context"] == context)
                for side in ("lminf", "stock"))
        print(f"{context:>8} {a:12.1f} {b:12.1f} {a / b:12.2f}")
    path = save("decode_vs_context", {"settings": {**vars(args), "model": str(args.model)},
                                      "command": " ".join(sys.argv), "points": points})
    plot(points, path.with_suffix(".png"))
    print(f"saved {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
