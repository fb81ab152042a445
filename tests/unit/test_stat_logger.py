"""The API server's side of the lminf series: SchedulerStats.lminf -> prometheus_client."""

from types import SimpleNamespace

from prometheus_client import REGISTRY
from vllm.v1.metrics.stats import SchedulerStats

import lminf_vllm
from lminf_vllm import metrics
from lminf_vllm.stat_logger import LMInfStatLogger

lminf_vllm.register()  # declares SchedulerStats.lminf (patches/scheduler_stats_lminf.py)


def engine_config(backend: str):
    return SimpleNamespace(attention_config=SimpleNamespace(backend=SimpleNamespace(name=backend)),
                           model_config=SimpleNamespace(served_model_name="tiny"))


def stats_with(**counters) -> SchedulerStats:
    stats = SchedulerStats()
    stats.lminf = {s.field: 0 for s in metrics.SERIES} | counters
    return stats


def sample(name: str, engine: int):
    return REGISTRY.get_sample_value(name, {"model_name": "tiny", "engine": str(engine)})


def test_gauges_follow_and_counters_advance_per_engine():
    logger = LMInfStatLogger(engine_config("LMINF"), engine_indexes=[0, 1])
    logger.record(stats_with(ring_pages=17, ring_pages_overwritten=5,
                             tokens_past_trained_length=300), None, engine_idx=0)
    logger.record(stats_with(ring_pages=3, tokens_past_trained_length=7), None, engine_idx=1)
    logger.record(stats_with(ring_pages=0, ring_pages_overwritten=9,
                             tokens_past_trained_length=310), None, engine_idx=0)
    logger.record(SchedulerStats(), None, engine_idx=1)  # stats without counters change nothing
    assert sample("lminf:ring_pages", 0) == 0 and sample("lminf:ring_pages", 1) == 3
    assert sample("lminf:ring_pages_overwritten_total", 0) == 9
    assert sample("lminf:tokens_past_trained_length_total", 0) == 310
    assert sample("lminf:tokens_past_trained_length_total", 1) == 7
    # a second logger in the same process (a restarted engine client) starts its series afresh
    LMInfStatLogger(engine_config("LMINF"), engine_indexes=[0])
    assert sample("lminf:ring_pages_overwritten_total", 0) == 0


def test_an_engine_without_lminf_gets_no_series():
    LMInfStatLogger(engine_config("LMINF"), engine_indexes=[0])
    logger = LMInfStatLogger(engine_config("CPU_ATTN"), engine_indexes=[0])
    logger.record(stats_with(ring_pages=17), None, engine_idx=0)
    assert sample("lminf:ring_pages", 0) == 0
