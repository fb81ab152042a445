"""Soak: 32 concurrent streaming clients past 16 L for 10 minutes, with random disconnects.

One `vllm serve` (lminf, the tiny model, L = 256) on a free loopback port. Each client
loops: a prompt of 16 L to 24 L held-out tokens from a random offset, streamed with
16-128 new tokens; one request in four is dropped by the client after a random number of
chunks (the server aborts it). Every 10 s the server's RSS (API server + EngineCore +
workers, psutil) and its /metrics (lminf pages, vLLM's block-pool usage and request
counts) are sampled. At the end the clients stop, the server must go idle with every
page back, and the run is written as JSON + PNG to bench/results/.

Counted as a server error: any HTTP status >= 500, any failure of a request the client
did not drop, and any ERROR line in the server log while it serves (vLLM's own shutdown,
which the bench triggers at the end, logs an EngineDeadError traceback: not counted).

    nice -n 10 python bench/bench_soak.py                      # 32 clients, 600 s
    python bench/bench_soak.py --clients 4 --seconds 60        # quick look
"""

import argparse
import asyncio
import os
import random
import sys
import time
from pathlib import Path

import psutil
from tqdm import tqdm

from common import MODEL_DIR, REPO, RESULTS, save, val_tokens

sys.path.insert(0, str(REPO / "tests" / "engine"))
from serving import serve  # noqa: E402

L = 256
SAMPLE_SECONDS = 10
PAGES = ("lminf:pages_pinned", "lminf:ring_pages")


def server_rss(process: psutil.Process) -> int:
    """RSS of the server and every process it started."""
    total = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def sample(server, process, start) -> dict:
    values = server.metrics()
    return {"t": round(time.time() - start, 1), "rss_bytes": server_rss(process),
            "pages": int(sum(values[name] for name in PAGES)),
            **{name: values[name] for name in (*PAGES, "vllm:kv_cache_usage_perc",
                                               "vllm:num_requests_running",
                                               "vllm:num_requests_waiting",
                                               "lminf:ring_pages_overwritten_total",
                                               "lminf:tokens_past_trained_length_total")}}


async def client_loop(client, tokens, stop_at, rng, tally) -> None:
    import openai

    while time.time() < stop_at:
        length = rng.randint(16 * L, 24 * L)
        offset = rng.randrange(0, len(tokens) - length)
        drop_after = rng.randint(1, 64) if rng.random() < 0.25 else None
        try:
            stream = await client.completions.create(
                model=str(MODEL_DIR), prompt=tokens[offset:offset + length].tolist(),
                max_tokens=rng.randint(16, 128), temperature=0.8, stream=True,
                extra_body={"ignore_eos": True})
            chunks = 0
            async for _ in stream:
                chunks += 1
                if drop_after is not None and chunks >= drop_after:
                    break
            await stream.close()
            tally["dropped" if drop_after is not None and chunks >= drop_after
                  else "completed"] += 1
        except openai.APIStatusError as error:
            tally["server_errors" if error.status_code >= 500 else "client_errors"] += 1
        except (openai.APIError, OSError) as error:
            tally["server_errors"] += 1
            tally.setdefault("error_messages", []).append(repr(error)[:300])


async def soak(server, args) -> dict:
    import openai

    tokens = val_tokens()
    process = psutil.Process(server.process.pid)
    start = time.time()
    stop_at = start + args.seconds
    tally = {"completed": 0, "dropped": 0, "server_errors": 0, "client_errors": 0}
    client = openai.AsyncOpenAI(base_url=server.base + "/v1", api_key="unused",
                                max_retries=0, timeout=600)
    clients = [asyncio.create_task(client_loop(client, tokens, stop_at,
                                               random.Random(args.seed + i), tally))
               for i in range(args.clients)]
    samples = []
    with tqdm(total=args.seconds, unit="s", desc="soak") as bar:
        while time.time() + SAMPLE_SECONDS <= stop_at:
            await asyncio.sleep(SAMPLE_SECONDS)  # the first sample comes 10 s in, under load
            samples.append(await asyncio.to_thread(sample, server, process, start))
            bar.update(SAMPLE_SECONDS)
            bar.set_postfix(pages=samples[-1]["pages"], done=tally["completed"],
                            dropped=tally["dropped"], errors=tally["server_errors"])
    await asyncio.gather(*clients)  # each finishes the request it is in
    await client.close()
    deadline = time.time() + 120
    while True:
        final = await asyncio.to_thread(sample, server, process, start)
        idle = (final["pages"] == 0 and final["vllm:kv_cache_usage_perc"] == 0
                and final["vllm:num_requests_running"] == 0)
        if idle or time.time() > deadline:
            break
        await asyncio.sleep(1)
    return {"tally": tally, "samples": samples, "final": final, "idle_at_end": idle}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t"] for s in result["samples"]]
    fig, (rss, pages) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    rss.plot(t, [s["rss_bytes"] / 2**30 for s in result["samples"]], marker=".")
    rss.set_ylabel("server RSS (GiB)")
    rss.set_ylim(bottom=0)
    pages.plot(t, [s["lminf:ring_pages"] for s in result["samples"]], marker=".",
               label="ring pages")
    pages.plot(t, [s["lminf:pages_pinned"] for s in result["samples"]], marker=".",
               label="pinned pages")
    pages.set_ylabel("pages held (lminf /metrics)")
    pages.set_xlabel("seconds")
    pages.legend()
    tally = result["tally"]
    fig.suptitle(f"soak: {result['settings']['clients']} streaming clients, prompts 16-24 L; "
                 f"{tally['completed']} completed, {tally['dropped']} dropped, "
                 f"{tally['server_errors']} server errors", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not 1 <= args.clients <= 64 or not 10 <= args.seconds <= 3600:
        raise SystemExit("--clients must be 1..64 and --seconds 10..3600")

    serve_args = ["--attention-backend", "lminf", "--max-model-len", "1000000", "--dtype",
                  "float32", "--max-num-seqs", str(args.clients), "--enforce-eager"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    log = RESULTS / "soak_server.log"
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    with serve(MODEL_DIR, serve_args, log, env, startup_seconds=1800) as server:
        result = asyncio.run(soak(server, args))
        # read before the server is stopped: vLLM logs its own shutdown's EngineDeadError
        error_lines = [line for line in log.read_text().splitlines() if " ERROR " in line]
    result["tally"]["server_errors"] += len(error_lines)
    result["server_error_lines"] = error_lines[:20]
    result["settings"] = {**vars(args), "prompt_tokens": [16 * L, 24 * L],
                          "max_tokens": [16, 128], "drop_probability": 0.25,
                          "serve": ["vllm", "serve", str(MODEL_DIR), *serve_args],
                          "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE"),
                          "command": " ".join(sys.argv)}
    rss = [s["rss_bytes"] for s in result["samples"]]
    pages = [s["pages"] for s in result["samples"]]
    result["summary"] = {"server_errors": result["tally"]["server_errors"],
                         "rss_first_gib": rss[0] / 2**30, "rss_last_gib": rss[-1] / 2**30,
                         "rss_max_gib": max(rss) / 2**30, "pages_first": pages[0],
                         "pages_max": max(pages), "pages_last": pages[-1],
                         "pages_at_end": result["final"]["pages"],
                         "kv_cache_usage_at_end": result["final"]["vllm:kv_cache_usage_perc"]}
    path = save("soak", result)
    plot(result, path.with_suffix(".png"))
    print(path, result["summary"], result["tally"])


if __name__ == "__main__":
    main()
