"""CPU decode tokens/s against context length, lminf vs the stock backend, with vLLM's own bench commands.

Same model, dtype, batch and random prompts (vLLM's random dataset, seeded) on both sides,
prefix caching off on both; the stock side gets the long-length override and a widened RoPE
table past the trained length. Two timers, both vLLM's:

* `serve` (decode only): one `vllm serve` per backend, `vllm bench serve` with `batch`
  concurrent requests of `context` random tokens and N output tokens (--ignore-eos). The
  step budget holds every prompt at once, so the batch decodes in lockstep and the median
  inter-token latency is one decode step of the whole batch:
  decode tokens/s = batch / median ITL. Prefill never enters it.
* `throughput` (the difference): `vllm bench throughput` twice on one batch of prompts,
  with 1 and with 1 + N output tokens (a fresh engine each):
  decode tokens/s = batch * N / (elapsed(1 + N) - elapsed(1)). The prefill cancels out only
  as well as two runs' prefill times agree, so past L, where stock's prefill dwarfs its
  decode, this one is noisy; it is kept because it needs no server.

(`vllm bench latency` would fit too but draws token ids below 10,000, past the tiny
model's vocabulary of 8,192.)

    python bench/bench_cpu_decode.py                      # contexts L/4 .. 64L, tiny model
    python bench/bench_cpu_decode.py --contexts 256 4096 --timers serve --repeats 3
"""

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

from common import MODEL_DIR, REPO, save

sys.path.insert(0, str(REPO / "tests" / "engine"))
from serving import serve, vllm_command  # noqa: E402

TRAINED_LENGTH = 256  # the tiny model's
BACKENDS = ("lminf", "stock")


def engine_args(backend: str, max_len: int, args) -> list[str]:
    """The engine flags both commands share: the same engine on both sides but the backend
    (and, for stock past L, the widened RoPE table)."""
    common = ["--dtype", args.dtype, "--max-num-seqs", str(args.batch),
              "--max-model-len", str(max_len), "--no-enable-prefix-caching",
              "--enforce-eager", "--seed", "0",
              "--kv-cache-memory-bytes", str(args.kv_cache_gib << 30)]
    if backend == "lminf":
        return common + ["--attention-backend", "lminf"]
    if max_len > TRAINED_LENGTH:
        return common + ["--hf-overrides", json.dumps({"max_position_embeddings": max_len})]
    return common


def random_dataset(context: int, output_len: int, batch: int) -> list[str]:
    return ["--dataset-name", "random", "--random-input-len", str(context),
            "--random-output-len", str(output_len), "--random-range-ratio", "0",
            "--num-prompts", str(batch), "--seed", "0"]


def bench_env(max_len: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    if max_len > TRAINED_LENGTH:
        env["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"
    return env


def run(command: list[str], env: dict) -> None:
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
        raise RuntimeError(f"failed: {' '.join(command)}")


def throughput_elapsed(backend: str, context: int, output_len: int, args, workdir: Path) -> float:
    """Wall time of one batch through `vllm bench throughput` (a fresh engine)."""
    max_len = context + output_len + 1
    out = workdir / f"throughput_{backend}_{context}_{output_len}.json"
    run([vllm_command(), "bench", "throughput", "--model", str(args.model),
         *engine_args(backend, max_len, args), *random_dataset(context, output_len, args.batch),
         "--output-json", str(out)], bench_env(max_len))
    return json.loads(out.read_text())["elapsed_time"]


def throughput_point(backend: str, context: int, args, workdir: Path) -> dict:
    prefill = throughput_elapsed(backend, context, 1, args, workdir)
    full = throughput_elapsed(backend, context, 1 + args.decode_tokens, args, workdir)
    return {"elapsed_output_1_s": prefill,
            f"elapsed_output_{1 + args.decode_tokens}_s": full,
            "decode_tokens_per_second": args.batch * args.decode_tokens / (full - prefill)}


def serve_point(server, context: int, args, workdir: Path) -> dict:
    """One `vllm bench serve` run of `batch` concurrent requests against a running server."""
    out = workdir / f"serve_{server.base.rsplit(':', 1)[1]}_{context}.json"
    run([vllm_command(), "bench", "serve", "--base-url", server.base, "--model",
         str(args.model), *random_dataset(context, args.decode_tokens, args.batch),
         "--max-concurrency", str(args.batch), "--ignore-eos", "--disable-tqdm",
         "--percentile-metrics", "ttft,tpot,itl", "--save-result",
         "--result-dir", str(workdir), "--result-filename", out.name],
        bench_env(0))
    result = json.loads(out.read_text())
    if result["completed"] != args.batch:
        raise RuntimeError(f"{result['failed']} of {args.batch} requests failed at {context}")
    row = {key: result[key] for key in ("median_itl_ms", "mean_itl_ms", "p99_itl_ms",
                                        "mean_tpot_ms", "mean_ttft_ms", "output_throughput")}
    return {**row, "decode_tokens_per_second": args.batch * 1000 / row["median_itl_ms"]}


def serve_sweep(args, workdir: Path, bar) -> list[dict]:
    """Both servers up at once, the backends alternating at each context (same load)."""
    longest = max(args.contexts) + args.decode_tokens + 1
    # every prompt of the batch fits one step, so all decode together from the next one on
    budget = ["--max-num-batched-tokens", str(args.batch * longest)]
    points = []
    with contextlib.ExitStack() as stack:
        servers = {backend: stack.enter_context(serve(
            args.model, [*engine_args(backend, longest, args), *budget],
            workdir / f"server_{backend}.log", bench_env(longest), startup_seconds=1800))
            for backend in BACKENDS}
        for context, repeat, backend in sweep_order(args):
            bar.set_description(f"serve {backend} {context}")
            points.append({"timer": "serve", "backend": backend, "context": context,
                           "repeat": repeat,
                           **serve_point(servers[backend], context, args, workdir)})
            bar.update()
    return points


def throughput_sweep(args, workdir: Path, bar) -> list[dict]:
    points = []
    for context, repeat, backend in sweep_order(args):
        bar.set_description(f"throughput {backend} {context}")
        points.append({"timer": "throughput", "backend": backend, "context": context,
                       "repeat": repeat, **throughput_point(backend, context, args, workdir)})
        bar.update()
    return points


def sweep_order(args):
    """(context, repeat, backend): the backends alternate within each repeat, so each pair
    of runs compared ran under the same load."""
    for context in args.contexts:
        for repeat in range(args.repeats):
            for backend in BACKENDS:
                yield context, repeat, backend


def rate(points: list[dict], timer: str, backend: str, context: int) -> float:
    """The median over repeats of one point's decode tokens/s."""
    return statistics.median(p["decode_tokens_per_second"] for p in points
                             if (p["timer"], p["backend"], p["context"]) ==
                             (timer, backend, context))


def plot(points: list[dict], timers: list[str], args, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for timer, style in zip(timers, ("-", "--")):
        for backend, marker in zip(BACKENDS, "os"):
            ax.plot(args.contexts, [rate(points, timer, backend, c) for c in args.contexts],
                    style, marker=marker, label=f"{backend} ({timer})")
    ax.axvline(TRAINED_LENGTH, color="grey", linestyle=":", label="trained length L")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(f"decode tokens/s (batch of {args.batch})")
    ax.set_title("CPU decode, tiny model: vllm bench serve (median ITL) / throughput", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=MODEL_DIR)
    parser.add_argument("--contexts", type=int, nargs="+",
                        default=[TRAINED_LENGTH * f // 4 for f in (1, 4, 16, 64, 256)])
    parser.add_argument("--timers", nargs="+", choices=("serve", "throughput"),
                        default=["serve", "throughput"])
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs per point and backend, alternating; the median is reported")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--kv-cache-gib", type=int, default=2)
    args = parser.parse_args()

    sweeps = {"serve": serve_sweep, "throughput": throughput_sweep}
    points = []
    with tempfile.TemporaryDirectory() as tmp, \
            tqdm(total=2 * len(args.contexts) * len(args.timers) * args.repeats,
                 unit="run") as bar:
        for timer in args.timers:
            points += sweeps[timer](args, Path(tmp), bar)
    print(f"\n{'timer':>10} {'context':>8} {'lminf tok/s':>12} {'stock tok/s':>12} "
          f"{'lminf/stock':>12}")
    for timer in args.timers:
        for context in args.contexts:
            a, b = (rate(points, timer, side, context) for side in BACKENDS)
            print(f"{timer:>10} {context:>8} {a:12.1f} {b:12.1f} {a / b:12.2f}")
    path = save("decode_vs_context", {
        "settings": {**vars(args), "model": str(args.model),
                     "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND")},
        "command": " ".join(sys.argv), "points": points})
    plot(points, args.timers, args, path.with_suffix(".png"))
    print(f"saved {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
