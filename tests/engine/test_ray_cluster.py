"""lminf engine replicas on a real two-node Ray cluster, through ray.data.llm (docs/ray.md).

Two Ray nodes on this machine (`local_cluster`: `ray.cluster_utils.Cluster`, each node its
own raylet, object store, resource counts and CPU core) each hold one replica: a custom
resource `lminf_replica: 1` per node and per replica puts exactly one engine on each. One Ray Data job runs long prompts
(4L-16L tokens) mixed with short ones through both replicas while one replica is killed
(SIGKILL of its worker process, as the OOM killer would) after the first rows come back.
Every row must come back once, with the greedy tokens of a plain in-process `LLM` with the
same engine settings and its prompt logprobs within LOGPROB_ATOL.

Every row asks for prompt logprobs: Ray Data turns an integer field that is missing in some
rows into a float in the others (pyarrow struct -> numpy), and vLLM then rejects
`prompt_logprobs=0.0` (docs/ray.md, "Prompt logprobs").
"""

import os
import signal
import time

import numpy as np
import psutil
import pytest
import ray
from ray.util.state import list_actors
from vllm import LLM, SamplingParams

from conftest import MODEL_DIR
from engine_checks import TINY_L, assert_close, engine_kwargs, prompt_logprobs
from lminf_vllm.ray_batch import REPLICA_RESOURCE, lminf_processor, local_cluster

NODES = 2
# Two replicas and the in-process reference each reserve this much KV memory; together they
# fit a 24 GiB CI machine (gpu_memory_utilization=0.3 would reserve 7 GiB each).
KV_CACHE_BYTES = 512 << 20
MAX_MODEL_LEN = 100_000
MAX_TOKENS = 6
# 4L, 8L, 16L and 10L tokens between short prompts, on both sides of a page (16) and of L.
PROMPT_LENGTHS = [4 * TINY_L, 3, 8 * TINY_L, 17, 16 * TINY_L, 255, 300, 10 * TINY_L, 1, 64]
BATCH_SIZE = 2
ENGINE_CLASS = "MapWorker(MapBatches(vLLMEngineStageUDF))"
# An engine start is 30-110 s on a 2-core machine; the killed replica restarts once.
JOB_SECONDS = 900

ENGINE_SETTINGS = {key: value for key, value in engine_kwargs(
    kv_cache_memory_bytes=KV_CACHE_BYTES, max_model_len=MAX_MODEL_LEN).items()
    if key not in ("model", "attention_backend", "max_model_len", "gpu_memory_utilization")}
LMINF_SETTINGS = {"n_global": 64, "n_local": TINY_L}


@pytest.fixture(scope="module")
def prompts(val_tokens):
    starts = np.random.default_rng(11).integers(0, len(val_tokens) - 16 * TINY_L,
                                                len(PROMPT_LENGTHS))
    return [val_tokens[s:s + n].tolist() for s, n in zip(starts, PROMPT_LENGTHS)]


def sampling(**extra):
    return dict(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, prompt_logprobs=0,
                **extra)


@pytest.fixture(scope="module")
def reference(prompts):
    llm = LLM(**engine_kwargs(kv_cache_memory_bytes=KV_CACHE_BYTES,
                              max_model_len=MAX_MODEL_LEN,
                              additional_config={"lminf": LMINF_SETTINGS}))
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(**sampling()))
    llm.llm_engine.engine_core.shutdown()
    return outputs


@pytest.fixture(scope="module")
def cluster(reference):
    # The reference engine has stopped before the cluster starts: at most two engines hold
    # memory at once. test_cluster_shuts_down_cleanly stops the cluster first; a second
    # stop is a no-op.
    with local_cluster(NODES) as cluster:
        yield cluster


def alive_replicas():
    return list_actors(filters=[("class_name", "=", ENGINE_CLASS), ("state", "=", "ALIVE")],
                       detail=True)


@pytest.fixture(scope="module")
def job(cluster, prompts):
    """Runs the dataset; kills one replica once the first row is back."""
    # Rows flow once both engines are up, so the first row back finds two live replicas.
    ray.data.DataContext.get_current().wait_for_min_actors_s = JOB_SECONDS
    processor = lminf_processor(
        str(MODEL_DIR), max_model_len=MAX_MODEL_LEN, replicas=NODES,
        replica_resources={"CPU": 1, REPLICA_RESOURCE: 1}, lminf=LMINF_SETTINGS,
        engine_kwargs=ENGINE_SETTINGS, batch_size=BATCH_SIZE,
        chat_template_stage=False, tokenize_stage=False, detokenize_stage=False)
    rows = [dict(row_id=i, tokenized_prompt=p, sampling_params=sampling())
            for i, p in enumerate(prompts)]
    results, killed = [], None
    start = time.monotonic()
    for row in processor(ray.data.from_items(rows)).iter_rows():
        results.append(row)
        if killed is None:
            replicas = alive_replicas()
            victim = replicas[0]
            engine_processes = psutil.Process(victim.pid).children(recursive=True)
            os.kill(victim.pid, signal.SIGKILL)
            killed = dict(replica=victim, engine_processes=engine_processes,
                          rows_done=len(results), replicas_alive=len(replicas))
        assert time.monotonic() - start < JOB_SECONDS, "the Ray job ran past JOB_SECONDS"
    return dict(rows=results, killed=killed,
                replicas=list_actors(filters=[("class_name", "=", ENGINE_CLASS)], detail=True))


def test_one_replica_per_node(cluster, job):
    nodes = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
    assert len(nodes) == NODES
    assert job["killed"]["replicas_alive"] == NODES
    assert {replica.node_id for replica in job["replicas"]} == nodes


def test_a_replica_was_killed_mid_job(job):
    killed = job["killed"]
    assert killed["rows_done"] < len(PROMPT_LENGTHS), "the kill came after the job ended"
    assert not psutil.pid_exists(killed["replica"].pid) or (
        psutil.Process(killed["replica"].pid).status() == psutil.STATUS_ZOMBIE)
    assert killed["engine_processes"], "the killed replica had no engine process to check"
    deadline = time.monotonic() + 30
    while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE
              for p in killed["engine_processes"]) and time.monotonic() < deadline:
        time.sleep(1)
    orphans = [p.pid for p in killed["engine_processes"]
               if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not orphans, f"the killed replica's engine processes {orphans} outlived it"


def test_every_row_comes_back_once(job):
    ids = sorted(row["row_id"] for row in job["rows"])
    assert ids == list(range(len(PROMPT_LENGTHS))), f"rows lost or duplicated: {ids}"
    assert not any(row["__inference_error__"] for row in job["rows"])


def test_outputs_equal_the_in_process_llm(job, reference, prompts):
    for row in sorted(job["rows"], key=lambda r: r["row_id"]):
        i = row["row_id"]
        expected = reference[i]
        assert list(row["prompt_token_ids"]) == prompts[i], f"row {i}: prompt changed"
        assert list(row["generated_tokens"]) == list(expected.outputs[0].token_ids), (
            f"row {i} ({len(prompts[i])} prompt tokens): greedy tokens differ")
        got = np.array([entry[token]["logprob"] for entry, token
                        in zip(row["prompt_logprobs"][1:], prompts[i][1:])])
        assert_close(got, prompt_logprobs(expected), f"row {i} prompt logprobs")


def test_cluster_shuts_down_cleanly(cluster, job):
    session_processes = [p for p in psutil.process_iter(["cmdline"])
                         if any("raylet" in part or "gcs_server" in part
                                for part in (p.info["cmdline"] or []))
                         and str(cluster.address.split(":")[-1]) in " ".join(p.info["cmdline"])]
    engines = [p for replica in job["replicas"] if psutil.pid_exists(replica.pid)
               for p in psutil.Process(replica.pid).children(recursive=True)]
    assert len(session_processes) >= NODES, "found no raylet / GCS process of this cluster"
    ray.shutdown()
    cluster.shutdown()
    gone, alive = psutil.wait_procs(session_processes + engines, timeout=60)
    assert not alive, f"still running after shutdown: {[p.pid for p in alive]}"
