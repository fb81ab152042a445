"""The lminf series on the API server's /metrics: a `vllm.stat_logger_plugins` logger.

vLLM's AsyncLLM (what `vllm serve` runs) loads the loggers of that entry-point group in
the API server and calls `record` with the SchedulerStats that arrive with every
EngineCore output. patches/scheduler_stats_lminf.py puts the ring counters into
`SchedulerStats.lminf`; this logger moves them into prometheus_client series
(lminf_vllm/metrics.py: SERIES), labelled like vLLM's own (`model_name`, `engine`). They
live in the API server's process, so they are on /metrics with or without
PROMETHEUS_MULTIPROC_DIR. On an engine that does not select lminf it creates nothing.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, Counter, Gauge
from vllm.v1.metrics.loggers import AggregateStatLoggerBase

import lminf_vllm
from lminf_vllm import metrics

LABELS = ("model_name", "engine")


def _unregister_series() -> None:
    """Drop series a previous logger in this process registered (as vLLM does for its own)."""
    names = {series.name for series in metrics.SERIES}
    for collector in list(REGISTRY._collector_to_names):
        if getattr(collector, "_name", None) in names:
            REGISTRY.unregister(collector)


def make_series(model_name: str, engine_indexes: list[int]) -> dict[str, dict[int, object]]:
    """field -> engine index -> the labelled prometheus_client child."""
    _unregister_series()
    children = {}
    for series in metrics.SERIES:
        if series.kind == "gauge":
            # only this process writes them: in multiprocess mode keep its latest value
            family = Gauge(series.name, series.help, LABELS, multiprocess_mode="mostrecent")
        else:
            family = Counter(series.name, series.help, LABELS)
        children[series.field] = {i: family.labels(model_name, str(i))
                                  for i in engine_indexes}
    return children


class LMInfStatLogger(AggregateStatLoggerBase):
    """Sets the lminf gauges and advances the counters from each engine's totals."""

    def __init__(self, vllm_config, engine_indexes: list[int] | None = None) -> None:
        engine_indexes = list(engine_indexes or [0])
        self.enabled = lminf_vllm.is_selected(vllm_config)
        self.series = (make_series(vllm_config.model_config.served_model_name,
                                   engine_indexes) if self.enabled else {})
        # engine index -> the counter totals already added to the series
        self.totals_seen = {i: {s.field: 0 for s in metrics.SERIES if s.kind == "counter"}
                            for i in engine_indexes}

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None,
               engine_idx: int = 0) -> None:
        counters = getattr(scheduler_stats, "lminf", None)
        if not self.enabled or counters is None:
            return
        seen = self.totals_seen[engine_idx]
        for series in metrics.SERIES:
            child = self.series[series.field][engine_idx]
            value = counters[series.field]
            if series.kind == "gauge":
                child.set(value)
            elif value > seen[series.field]:
                child.inc(value - seen[series.field])
                seen[series.field] = value

    def log_engine_initialized(self) -> None:
        pass
