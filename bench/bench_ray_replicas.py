"""Ray Data throughput with 1 and 2 lminf engine replicas, side by side in one run.

A two-node Ray cluster on this machine (lminf_vllm.ray_batch.local_cluster: one
`lminf_replica` resource and one CPU core per node) runs the same dataset through
lminf_processor with 1 and then 2 replicas. Ray Data waits for every replica's engine before it sends rows
(DataContext.wait_for_min_actors_s), and the rates are taken over the engines' busy window:

    window      = max(last_token_ts) - min(queued_ts) over all rows (one CLOCK_MONOTONIC:
                  every engine runs on this machine)
    rows/s      = rows / window
    tokens/s    = (prompt tokens + generated tokens) / window

The job's wall time, engine start included, is recorded beside it.

    python bench/bench_ray_replicas.py --rows 16 --prompt-tokens 2048 --max-tokens 32
"""

import argparse
import json
import time

import ray

from common import MODEL_DIR, save, val_tokens
from lminf_vllm.ray_batch import REPLICA_RESOURCE, lminf_processor, local_cluster

ENGINE_START_SECONDS = 600


def run_job(replicas: int, rows: list[dict], engine_kwargs: dict, max_model_len: int) -> dict:
    processor = lminf_processor(
        str(MODEL_DIR), max_model_len=max_model_len, replicas=replicas,
        replica_resources={"CPU": 1, REPLICA_RESOURCE: 1}, lminf={"n_global": 64},
        engine_kwargs=engine_kwargs, batch_size=4,
        chat_template_stage=False, tokenize_stage=False, detokenize_stage=False)
    start = time.monotonic()
    out = processor(ray.data.from_items(rows)).take_all()
    wall = time.monotonic() - start
    window = (max(r["metrics"]["last_token_ts"] for r in out)
              - min(r["metrics"]["queued_ts"] for r in out))
    tokens = sum(r["num_input_tokens"] + r["num_generated_tokens"] for r in out)
    return dict(replicas=replicas, rows=len(out), tokens=tokens, window_s=window,
                rows_per_s=len(out) / window, tokens_per_s=tokens / window,
                wall_s_with_engine_start=wall)


def plot(result: dict, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    labels = [f"{r['replicas']} replica{'s' * (r['replicas'] > 1)}" for r in runs]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, key, title in zip(axes, ("rows_per_s", "tokens_per_s"), ("rows/s", "tokens/s")):
        ax.bar(labels, [r[key] for r in runs], color=["#777", "#2a6"])
        ax.set_title(title)
    s = result["settings"]
    fig.suptitle(f"lminf via ray.data.llm, {s['rows']} rows x {s['prompt_tokens']} prompt + "
                 f"{s['max_tokens']} tokens, {result['machine']['cores']} shared cores",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=2048)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--kv-cache-bytes", type=int, default=512 << 20)
    args = parser.parse_args()

    tokens = val_tokens()
    rows = [dict(row_id=i, tokenized_prompt=tokens[s:s + args.prompt_tokens].tolist(),
                 sampling_params=dict(max_tokens=args.max_tokens, temperature=0.0,
                                      ignore_eos=True))
            for i, s in enumerate(range(0, args.rows * 7919, 7919))]
    engine_kwargs = dict(dtype="float32", enforce_eager=True, max_num_seqs=8, seed=0,
                         kv_cache_memory_bytes=args.kv_cache_bytes)
    max_model_len = args.prompt_tokens + args.max_tokens

    with local_cluster(nodes=2):
        ray.data.DataContext.get_current().wait_for_min_actors_s = ENGINE_START_SECONDS
        runs = [run_job(replicas, rows, engine_kwargs, max_model_len) for replicas in (1, 2)]
    result = dict(
        command="python bench/bench_ray_replicas.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        settings=dict(vars(args), nodes=2, engine_kwargs=engine_kwargs,
                      max_model_len=max_model_len, ray=ray.__version__),
        runs=runs, speedup_tokens_per_s=runs[1]["tokens_per_s"] / runs[0]["tokens_per_s"])
    path = save("ray_replicas", result)
    plot(json.loads(path.read_text()), path.with_suffix(".png"))  # with the machine facts
    for r in runs:
        print(f"{r['replicas']} replica(s): {r['rows_per_s']:.3f} rows/s, "
              f"{r['tokens_per_s']:.0f} tokens/s over {r['window_s']:.1f} s "
              f"(wall {r['wall_s_with_engine_start']:.1f} s with engine start)")
    print(f"2 vs 1 replicas: x{result['speedup_tokens_per_s']:.2f} tokens/s -> {path}")


if __name__ == "__main__":
    main()
