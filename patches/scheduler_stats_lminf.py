"""Carry the ring counters from the EngineCore to the API server inside SchedulerStats.

The lminf series (lminf_vllm/metrics.py) are counted by the KV manager, in the EngineCore
process; /metrics is served by the API server. vLLM already sends a SchedulerStats with
the EngineCore's outputs every step, and its `vllm.stat_logger_plugins` loggers receive it
in the API server, but the dataclass has no slot for a plugin: msgspec encodes and decodes
its declared fields only. This patch

* declares one more field on SchedulerStats, `lminf: dict[str, int] | None = None` (in
  every process, so that both the EngineCore's encoder and the API server's decoder know it);
* wraps Scheduler.make_stats to fill it with the counters of the engine's lminf KV cache
  groups (`metrics.combine`); it stays None for an engine without lminf layers.

Reading the counters is a handful of int copies per step, done where vLLM builds its own
stats, so the engine loop does no extra waiting and the API server's stat logger
(lminf_vllm/stat_logger.py) does the Prometheus work.
"""

import dataclasses

from ._patch import CPU_0_32, CUDA_0_32, CUDA_0_33, Patch, carries_mark, mark_applied

NAME = "scheduler_stats_lminf"
TARGET = "vllm.v1.core.sched.scheduler:Scheduler.make_stats"
STATS = "vllm.v1.metrics.stats:SchedulerStats"
FIELD = "lminf"


def _declare_field(stats_class) -> None:
    """Add `lminf: dict[str, int] | None = None` to an existing dataclass, in place.

    Re-running @dataclass on the class cannot do it (fields with a default_factory have no
    class attribute left to re-read), so the Field record is built as @dataclass builds it.
    """
    if FIELD in stats_class.__dataclass_fields__:
        return
    record = dataclasses.field(default=None)
    record.name = FIELD
    record.type = dict[str, int] | None
    record._field_type = dataclasses._FIELD  # what dataclasses.fields() (and msgspec) read
    stats_class.__dataclass_fields__[FIELD] = record
    stats_class.__annotations__[FIELD] = record.type
    setattr(stats_class, FIELD, None)


def ring_counters_of(kv_cache_manager) -> dict[str, int] | None:
    """The engine's lminf counters, combined over its lminf KV cache groups (or None)."""
    from dataclasses import asdict

    from lminf_vllm import metrics, sessions
    from lminf_vllm.kv_cache import lminf_managers

    counters = metrics.combine(manager.counters
                               for manager in lminf_managers(kv_cache_manager))
    if counters is not None:
        store = sessions.store_of(kv_cache_manager)
        counters.update(asdict(store.counters if store is not None
                               else sessions.StoreCounters()))
    return counters


def _install() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.metrics.stats import SchedulerStats

    _declare_field(SchedulerStats)
    make_stats = Scheduler.make_stats

    def make_stats_with_ring_counters(self, *args, **kwargs):
        stats = make_stats(self, *args, **kwargs)
        if stats is not None:
            setattr(stats, FIELD, ring_counters_of(self.kv_cache_manager))
        return stats

    Scheduler.make_stats = mark_applied(make_stats_with_ring_counters, NAME)


PATCH = Patch(
    name=NAME,
    target=TARGET,
    what="SchedulerStats gains a field `lminf` (dict of the ring counters), filled by "
         "Scheduler.make_stats from the engine's lminf KV managers",
    why="the counters live in the EngineCore and /metrics in the API server; SchedulerStats "
        "is what vLLM sends between them every step, and msgspec drops undeclared fields",
    upstream="none yet: SchedulerStats has no extension slot for plugins in vLLM 0.32",
    remove_when="SchedulerStats carries plugin-defined stats to the stat logger plugins",
    # the same source in all three builds (read from the CUDA wheels by check-wheels)
    fingerprints={build: {TARGET: "8963d2ab6518f994", STATS: "da041187f2917719"}
                  for build in (CPU_0_32, CUDA_0_32, CUDA_0_33)},
    install=_install,
    installed=carries_mark(TARGET, NAME),
)
