"""lminf engine replicas on a real two-node Ray cluster, through ray.data.llm (docs/ray.md).

Two Ray nodes on this machine (`local_cluster`: `ray.cluster_utils.Cluster`, each node its
own raylet, object store, resource counts and CPU core) each hold one replica: a custom
resource `lminf_replica: 1` per node and per replica puts exactly one engine on each. One
Ray Data job runs long prompts (4L-16L tokens) mixed with short ones through both replicas
while one replica is killed (SIGKILL of its actor process, as the OOM killer would) once the
first row is back.
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
# The process title of ray.data.llm's engine actor.
ENGINE_TITLE = "ray::MapWorker(MapBatches(vLLMEngineStageUDF))"
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


def sampling():
    return dict(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, prompt_logprobs=0)


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


def node_pids(cluster) -> dict[int, str]:
    """raylet pid -> node id, for every node of the cluster."""
    return {node.all_processes["raylet"][0].process.pid: node.node_id
            for node in cluster.list_all_nodes()}


def live_replicas(cluster) -> dict[int, str]:
    """Engine replica (Ray actor) pid -> the id of the node that runs it.

    Read from the processes (their title and the RAY_RAYLET_PID they inherit), not from
    Ray's state API, which needs the dashboard.
    """
    raylets = node_pids(cluster)
    found = {}
    for process in psutil.process_iter(["cmdline", "status"]):
        cmdline = process.info["cmdline"] or []
        if (cmdline and cmdline[0].startswith(ENGINE_TITLE)
                and process.info["status"] != psutil.STATUS_ZOMBIE):
            try:
                raylet = int(process.environ().get("RAY_RAYLET_PID", -1))
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if raylet in raylets:
                found[process.pid] = raylets[raylet]
    return found


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
    results, killed, replicas_seen = [], None, {}
    start = time.monotonic()
    for row in processor(ray.data.from_items(rows)).iter_rows():
        results.append(row)
        replicas = live_replicas(cluster)
        replicas_seen.update(replicas)
        if killed is None:
            victim = min(replicas)
            engine_processes = psutil.Process(victim).children(recursive=True)
            os.kill(victim, signal.SIGKILL)
            killed = dict(pid=victim, node=replicas[victim], engine_processes=engine_processes,
                          rows_done=len(results), replicas=replicas)
        assert time.monotonic() - start < JOB_SECONDS, "the Ray job ran past JOB_SECONDS"
    print(f"replica killed after {killed['rows_done']} rows; replicas seen: {replicas_seen}")
    return dict(rows=results, killed=killed, replicas_seen=replicas_seen)


def test_one_replica_per_node(cluster, job):
    nodes = set(node_pids(cluster).values())
    assert len(nodes) == NODES
    replicas = job["killed"]["replicas"]
    assert sorted(replicas.values()) == sorted(nodes), f"replicas by node: {replicas}"


def running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_replica_was_killed_mid_job(cluster, job):
    killed = job["killed"]
    assert killed["rows_done"] < len(PROMPT_LENGTHS), "the kill came after the job ended"
    assert killed["pid"] not in live_replicas(cluster)
    assert killed["engine_processes"], "the killed replica had no engine process to check"
    deadline = time.monotonic() + 30
    while any(map(running, killed["engine_processes"])) and time.monotonic() < deadline:
        time.sleep(1)
    orphans = [p.pid for p in killed["engine_processes"] if running(p)]
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
        if len(prompts[i]) > 1:
            assert_close(got, prompt_logprobs(expected), f"row {i} prompt logprobs")
        else:  # a one-token prompt has nothing to predict
            assert got.size == prompt_logprobs(expected).size == 0


def cluster_processes(node_pids: set[int]) -> list[psutil.Process]:
    """The nodes' own processes (GCS, raylets, agents) and all that a raylet started, at any
    depth: Ray workers and the engines they spawn inherit RAY_RAYLET_PID."""
    found = []
    for process in psutil.process_iter():
        try:
            if (process.pid in node_pids
                    or int(process.environ().get("RAY_RAYLET_PID", -1)) in node_pids):
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def test_cluster_shuts_down_cleanly(cluster, job):
    nodes = cluster.list_all_nodes()
    assert len(nodes) == NODES
    node_pids = {info.process.pid for node in nodes
                 for infos in node.all_processes.values() for info in infos}
    before = cluster_processes(node_pids)
    assert len(before) > len(node_pids), "found no worker process of the cluster"
    ray.shutdown()
    cluster.shutdown()
    # a leaked process never exits; a loaded machine (CI beside benchmarks) has taken over
    # 60 s to reap an engine's worker, so the wait is generous
    gone, alive = psutil.wait_procs(before, timeout=240)
    assert not alive, f"still running after shutdown: {[(p.pid, p.name()) for p in alive]}"
    assert not cluster_processes(node_pids), "processes of the cluster started after shutdown"
