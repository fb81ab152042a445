"""Long documents through lminf engine replicas with Ray Data (docs/ray.md).

The same script runs on this machine and on an existing Ray cluster:

    python examples/ray_batch.py --replicas 1             # ray.init(): a local Ray
    ray start --head --num-cpus 2                          # or a cluster: on every node
    python examples/ray_batch.py --address auto --replicas 2          # CPU nodes
    python examples/ray_batch.py --address auto --replicas 2 --gpu    # GPU nodes

Ray Data shows its own progress (operator rows, actors, resources) while the job runs. Each
document is a row of token ids; lminf lets a prompt run far past the model's trained length.
"""

import argparse
import json
import os

import numpy as np
import ray

from lminf_vllm.ray_batch import CPU_REPLICA, GPU_REPLICA, lminf_processor


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tests/assets/tiny-llama-L256")
    parser.add_argument("--tokens", default="../shared/data/val.npy",
                        help="a .npy of token ids the documents are cut from")
    parser.add_argument("--address", default=None,
                        help='"auto" joins the running cluster; unset starts a local Ray')
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--gpu", action="store_true", help="one GPU per replica (GPU cluster)")
    parser.add_argument("--documents", type=int, default=8)
    parser.add_argument("--document-tokens", type=int, default=4096)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()

    # A local Ray's raylet starts from this process: let it reap the engine processes of a
    # replica that dies (on a cluster, set this where `ray start` runs; docs/ray.md).
    os.environ.setdefault("RAY_kill_child_processes_on_worker_exit_with_raylet_subreaper", "1")
    ray.init(address=args.address)
    if args.gpu:
        # A GPU node: vLLM sizes KV memory from gpu_memory_utilization of the GPU it holds.
        replica_resources, memory = GPU_REPLICA, dict(gpu_memory_utilization=0.9)
    else:
        # A CPU node: say how much host memory the KV cache of each replica may take.
        replica_resources, memory = CPU_REPLICA, dict(kv_cache_memory_bytes=1 << 30,
                                                      dtype="float32", enforce_eager=True)
    processor = lminf_processor(
        args.model, max_model_len=1_000_000, replicas=args.replicas,
        replica_resources=replica_resources, lminf={"n_global": 64},
        engine_kwargs=dict(max_num_seqs=8, **memory), batch_size=4,
        # Rows carry token ids, so neither tokenizing nor chat templates run. Detokenizing is a
        # stage of its own whose actor holds a CPU for the whole job: on a 2-CPU local Ray it
        # leaves no CPU to Ray Data's map tasks and the job waits forever (backpressured).
        chat_template_stage=False, tokenize_stage=False, detokenize_stage=False)

    tokens = np.load(args.tokens)
    starts = np.random.default_rng(0).integers(0, len(tokens) - args.document_tokens,
                                               args.documents)
    documents = ray.data.from_items([
        dict(doc_id=int(i), tokenized_prompt=tokens[s:s + args.document_tokens].tolist(),
             sampling_params=dict(max_tokens=args.max_tokens, temperature=0.0))
        for i, s in enumerate(starts)])
    for row in processor(documents).iter_rows():
        print(json.dumps({"doc_id": row["doc_id"], "prompt_tokens": row["num_input_tokens"],
                          "continuation_ids": list(row["generated_tokens"])}))


if __name__ == "__main__":
    main()
