"""Ray Data batch inference over lminf engines: ray.data.llm with the lminf settings filled in.

The processor is Ray's own (`ray.data.llm.build_processor`); this module only writes its
configuration, because three of its defaults do not fit lminf or the CPU build:

* `engine_kwargs` must carry `attention_backend="lminf"` and the lminf parameters under
  `additional_config["lminf"]`, where `LLM(...)` and `vllm serve` take them.
* Each replica asks Ray for `{"GPU": 1, "CPU": 1}` per tensor-parallel rank by default; on a
  CPU cluster that request never fits and the job waits forever with no error. A replica's
  resources are therefore always explicit (`CPU_REPLICA` or `GPU_REPLICA` below, or any
  bundle with custom resources).
* Engine metrics go through vLLM's `RayPrometheusStatLogger`, which needs `ray[serve]`;
  without it every replica fails at start with "RayPrometheusMetric requires Ray to be
  installed", so they are off unless asked for.

The plugin reaches Ray's actors through the `vllm.general_plugins` entry point, like any
other vLLM process: nothing here imports it.

    ray.init()  # or ray.init(address="auto") for an existing cluster
    processor = lminf_processor(model, max_model_len=1_000_000, replicas=2,
                                lminf={"n_global": 64}, replica_resources=CPU_REPLICA)
    out = processor(ray.data.from_items([{"tokenized_prompt": ids,
                                           "sampling_params": {"max_tokens": 32}}]))
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, Mapping

from lminf_vllm.config import ADDITIONAL_CONFIG_KEY

# One bundle per replica: what one engine process holds on its node. On CPU the engine's
# threads run on the cores Ray grants, and KV memory is set by kv_cache_memory_bytes.
CPU_REPLICA = {"CPU": 1}
# On a GPU cluster, one GPU per tensor-parallel rank (ray.data.llm's own default shape).
GPU_REPLICA = {"CPU": 1, "GPU": 1}


# Each node of local_cluster() holds one of these: a replica bundle that asks for it lands on a
# node of its own.
REPLICA_RESOURCE = "lminf_replica"


@contextlib.contextmanager
def local_cluster(nodes: int, cpus_per_node: int = 2) -> Iterator[Any]:
    """A Ray cluster of `nodes` nodes on this machine, connected to; shut down on exit.

    Each node is a raylet of its own (`ray.cluster_utils.Cluster`) with `cpus_per_node`
    logical CPUs and one REPLICA_RESOURCE, and pins the vLLM engines it runs to one core of
    its own (cores taken in turn), as the separate machines of a real cluster would be: left
    alone, every CPU engine binds the same first core. Ray workers inherit their raylet's
    environment, so the pin is set while each node starts. The raylets reap what a killed
    worker leaves (`kill_child_processes_on_worker_exit_with_raylet_subreaper`): a replica's
    engine processes otherwise outlive its actor.
    """
    import ray
    from ray.cluster_utils import Cluster

    cores = sorted(os.sched_getaffinity(0))
    node_env = {"RAY_kill_child_processes_on_worker_exit_with_raylet_subreaper": "1"}
    saved = {key: os.environ.get(key) for key in (*node_env, "VLLM_CPU_OMP_THREADS_BIND")}
    cluster = Cluster()
    try:
        os.environ.update(node_env)
        for node in range(nodes):
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = str(cores[node % len(cores)])
            cluster.add_node(num_cpus=cpus_per_node, resources={REPLICA_RESOURCE: 1},
                             include_dashboard=False)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    ray.init(address=cluster.address)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def lminf_processor(model: str, *, max_model_len: int, replicas: int,
                    replica_resources: Mapping[str, float],
                    lminf: Mapping[str, Any] | None = None,
                    engine_kwargs: Mapping[str, Any] | None = None,
                    batch_size: int = 16, log_engine_metrics: bool = False,
                    **processor_kwargs):
    """A ray.data.llm Processor whose `replicas` engines run lminf attention.

    model: path or name every node can read. max_model_len: the longest prompt plus output,
    far past the model's trained length if needed. replica_resources: the Ray resources of one
    tensor-parallel rank (the replica holds tensor_parallel_size of them). lminf: the plugin's
    parameters (n_global, n_local, trained_length, max_prefill_chunk_tokens). engine_kwargs:
    any other vLLM engine argument. processor_kwargs: passed on to
    `vLLMEngineProcessorConfig` (e.g. max_concurrent_batches) or `build_processor`
    (preprocess, postprocess).
    """
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    kwargs = dict(engine_kwargs or {})
    if kwargs.get("attention_backend", "lminf") != "lminf":
        raise ValueError(f"lminf_processor: engine_kwargs['attention_backend']="
                         f"{kwargs['attention_backend']!r}; leave it out (it is 'lminf')")
    if ADDITIONAL_CONFIG_KEY in kwargs.get("additional_config", {}):
        raise ValueError("lminf_processor: pass the lminf parameters as lminf={...}, not "
                         "inside engine_kwargs['additional_config']")
    additional_config = dict(kwargs.pop("additional_config", {}))
    additional_config[ADDITIONAL_CONFIG_KEY] = dict(lminf or {})
    kwargs.update(attention_backend="lminf", max_model_len=max_model_len,
                  additional_config=additional_config)

    build_kwargs = {key: processor_kwargs.pop(key)
                    for key in ("preprocess", "postprocess", "preprocess_map_kwargs",
                                "postprocess_map_kwargs") if key in processor_kwargs}
    ranks = kwargs.get("tensor_parallel_size", 1) * kwargs.get("pipeline_parallel_size", 1)
    config = vLLMEngineProcessorConfig(
        model_source=model, engine_kwargs=kwargs, batch_size=batch_size,
        # A pair (n, n) is a fixed pool; a plain n would let Ray Data start with one replica.
        concurrency=(replicas, replicas),
        placement_group_config={"bundles": [dict(replica_resources)] * ranks},
        log_engine_metrics=log_engine_metrics, **processor_kwargs)
    return build_processor(config, **build_kwargs)
