"""`vllm bench serve` and `vllm bench throughput`: lminf vs the stock CPU backend by context.

Same model (the tiny L = 256 one), same prompts (vLLM's random dataset, one seed) and the
same settings for both backends; input lengths L/2 .. 64 L. One `vllm serve` per backend
(both up at once, on free loopback ports) is swept with `vllm bench serve` (TTFT, output
tokens/s), then `vllm bench throughput` runs its own engine at each length; the backends
alternate at each length, so each pair ran under the same load. The stock
backend gets a RoPE table widened to the longest prompt (hf_overrides
max_position_embeddings, as bench/bench_ppl_vs_position.py does; without it vLLM refuses
a max_model_len past 256) and is swept only up to the first length where it fails or
runs past --timeout. JSON + PNG go to bench/results/.

    python bench/bench_serve.py                                  # 128 .. 16384 tokens
    python bench/bench_serve.py --lengths 128 1024 --num-prompts 2   # quick look
"""

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

from common import MODEL_DIR, REPO, RESULTS, save

sys.path.insert(0, str(REPO / "tests" / "engine"))
from serving import serve, vllm_command  # noqa: E402

L = 256
BACKENDS = ("lminf", "stock")
COMMON = ["--dtype", "float32", "--enforce-eager", "--max-num-seqs", "4", "--seed", "0"]


def backend_args(backend: str, longest: int) -> list[str]:
    if backend == "lminf":
        return ["--attention-backend", "lminf", "--max-model-len", "1000000"]
    return ["--max-model-len", str(longest),
            "--hf-overrides", json.dumps({"max_position_embeddings": longest})]


def run(command: list[str], timeout: int, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def bench_serve(server, length: int, args, workdir: Path, env: dict) -> dict:
    out = workdir / f"serve_{length}.json"
    done = run([vllm_command(), "bench", "serve", "--base-url", server.base, "--model",
                str(MODEL_DIR), "--dataset-name", "random", "--random-input-len", str(length),
                "--random-output-len", str(args.output_len), "--random-range-ratio", "0",
                "--num-prompts", str(args.num_prompts), "--max-concurrency",
                str(args.concurrency), "--ignore-eos", "--seed", "0", "--disable-tqdm",
                "--save-result", "--result-dir", str(workdir), "--result-filename",
                out.name], args.timeout, env)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    result = json.loads(out.read_text())
    return {key: result[key] for key in ("completed", "failed", "output_throughput",
                                         "mean_ttft_ms", "median_ttft_ms", "mean_tpot_ms",
                                         "request_throughput")}


def bench_throughput(backend: str, length: int, args, workdir: Path, env: dict) -> dict:
    out = workdir / f"throughput_{backend}_{length}.json"
    done = run([vllm_command(), "bench", "throughput", "--model", str(MODEL_DIR),
                *backend_args(backend, args.longest), *COMMON, "--gpu-memory-utilization",
                "0.3", "--dataset-name", "random", "--random-input-len", str(length),
                "--random-output-len", str(args.output_len), "--random-range-ratio", "0",
                "--num-prompts", str(args.num_prompts), "--output-json", str(out)],
               args.timeout, env)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    result = json.loads(out.read_text())
    output_tokens = result["num_requests"] * args.output_len
    return {"elapsed_s": result["elapsed_time"], "tokens_per_second":
            result["tokens_per_second"], "output_tokens_per_second":
            output_tokens / result["elapsed_time"]}


def sweep(args, bar, env: dict, workdir: Path) -> dict:
    """backend -> {"serve": {length: result}, "throughput": {...}}.

    The backends alternate at each length (both servers up at once), so that the pairs
    compared ran under the same load; a failure ends that backend's sweep of that kind.
    """
    results = {backend: {"serve": {}, "throughput": {}} for backend in BACKENDS}
    with contextlib.ExitStack() as servers:
        running = {backend: servers.enter_context(serve(
            MODEL_DIR, [*backend_args(backend, args.longest), *COMMON,
                        "--gpu-memory-utilization", "0.3"],
            workdir / f"server_{backend}.log", env, startup_seconds=1800))
            for backend in BACKENDS}
        for length in args.lengths:
            for backend in BACKENDS:
                bar.set_description(f"{backend} serve {length}")
                step(results[backend]["serve"], length, bench_serve, running[backend],
                     length, args, workdir, env)
                bar.update()
    for length in args.lengths:
        for backend in BACKENDS:
            bar.set_description(f"{backend} throughput {length}")
            step(results[backend]["throughput"], length, bench_throughput, backend, length,
                 args, workdir, env)
            bar.update()
    return results


def step(rows: dict, length: int, function, *call_args) -> None:
    """rows[length] = the run's result, or its error; nothing once a shorter run failed."""
    if any("error" in row for row in rows.values()):
        return
    try:
        rows[length] = function(*call_args)
    except (RuntimeError, subprocess.TimeoutExpired) as error:
        rows[length] = {"error": str(error)[-1000:]}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed, ttft) = plt.subplots(1, 2, figsize=(11, 4))
    for backend, style in (("lminf", "-o"), ("stock", "--s")):
        kinds = results[backend]
        for kind, key, label in (("serve", "output_throughput", "bench serve"),
                                 ("throughput", "output_tokens_per_second",
                                  "bench throughput")):
            points = [(n, r[key]) for n, r in kinds[kind].items() if key in r]
            if points:
                speed.plot(*zip(*points), style, label=f"{backend}, {label}")
        points = [(n, r["mean_ttft_ms"] / 1000) for n, r in kinds["serve"].items()
                  if "mean_ttft_ms" in r]
        if points:
            ttft.plot(*zip(*points), style, label=backend)
    for axis, label in ((speed, "output tokens/s"), (ttft, "mean TTFT (s), bench serve")):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("input length (tokens; L = 256)")
        axis.set_ylabel(label)
        axis.legend(fontsize=8)
    fig.suptitle("tiny Llama, CPU (2 shared cores): lminf vs stock vLLM CPU attention",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+",
                        default=[L // 2, L, 4 * L, 16 * L, 64 * L])
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--num-prompts", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=900,
                        help="seconds per bench command; past it the backend's sweep ends")
    args = parser.parse_args()
    args.longest = max(args.lengths) + args.output_len + 1  # bench throughput wants >
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    with tempfile.TemporaryDirectory() as tmp, \
            tqdm(total=4 * len(args.lengths), unit="run") as bar:
        results = sweep(args, bar, env, Path(tmp))
    settings = {**vars(args), "model": str(MODEL_DIR), "dataset": "random, seed 0",
                "common_args": COMMON, "stock_args": backend_args("stock", args.longest),
                "lminf_args": backend_args("lminf", args.longest),
                "VLLM_CPU_KVCACHE_SPACE": env.get("VLLM_CPU_KVCACHE_SPACE"),
                "command": " ".join(sys.argv)}
    path = save("bench_serve", {"settings": settings, "results": results})
    plot(results, path.with_suffix(".png"))
    print(path)
    for backend in results:
        for kind, rows in results[backend].items():
            for length, row in rows.items():
                print(backend, kind, length, {k: v for k, v in row.items() if k != "error"}
                      or row["error"][-200:])


if __name__ == "__main__":
    main()
