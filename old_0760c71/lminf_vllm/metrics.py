"""Ring counters for Prometheus: pages pinned, ring pages, pages overwritten, tokens past L.

The KV manager (EngineCore) keeps `RingCounters` as plain host ints, updated with O(1)
integer arithmetic per request per step from values it already has (no device sync, no
lists walked). Once per scheduler step it hands them to `publish`, which moves them into
prometheus_client series:

    lminf_pages_pinned                     gauge    pinned pages held by live requests
    lminf_ring_pages                       gauge    ring pages held by live requests
    lminf_pages_overwritten_total          counter  ring pages reused in place (a page of
                                                    the stream evicted without freeing)
    lminf_tokens_past_trained_length_total counter  KV slots written at positions >= L
                                                    (a preempted request's recompute counts
                                                    again)

The series live in the EngineCore process. They reach vLLM's /metrics when the server is
started with PROMETHEUS_MULTIPROC_DIR set (VLLM_NOTES §7 (a)); the gauges then sum over
processes ("livesum").
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RingCounters:
    """One KV cache group's counters (host ints)."""

    pages_pinned: int = 0
    ring_pages: int = 0
    pages_overwritten: int = 0
    tokens_past_trained_length: int = 0
    # the four values above as of the last `publish`
    last_published: tuple[int, int, int, int] = (0, 0, 0, 0)

    def on_stream_growth(self, pages_before: int, pages_after: int, tokens_before: int,
                         tokens_after: int, pages_per_request: int,
                         trained_length: int) -> None:
        """A request's stream grew from tokens_before to tokens_after (pages likewise)."""
        self.pages_overwritten += (max(pages_after - pages_per_request, 0)
                                   - max(pages_before - pages_per_request, 0))
        self.tokens_past_trained_length += (max(tokens_after - trained_length, 0)
                                            - max(tokens_before - trained_length, 0))

    def on_blocks_held(self, blocks_before: int, blocks_after: int,
                       num_pinned_pages: int) -> None:
        """A request's held blocks changed (claimed, or all freed)."""
        pinned_before = min(blocks_before, num_pinned_pages)
        pinned_after = min(blocks_after, num_pinned_pages)
        self.pages_pinned += pinned_after - pinned_before
        self.ring_pages += (blocks_after - pinned_after) - (blocks_before - pinned_before)


_series: dict | None = None  # prometheus_client's registry is per process too
_NAMES = ("pages_pinned", "ring_pages", "pages_overwritten", "tokens_past_trained_length")


def _get_series() -> dict:
    global _series
    if _series is None:
        from prometheus_client import Counter, Gauge

        _series = dict(
            pages_pinned=Gauge("lminf_pages_pinned",
                               "KV pages pinned for the global prefix, live requests",
                               multiprocess_mode="livesum"),
            ring_pages=Gauge("lminf_ring_pages", "KV ring pages held by live requests",
                             multiprocess_mode="livesum"),
            pages_overwritten=Counter("lminf_pages_overwritten",
                                      "Ring pages overwritten in place (evicted, not freed)"),
            tokens_past_trained_length=Counter(
                "lminf_tokens_past_trained_length",
                "KV slots written at positions at or past the trained length L"),
        )
    return _series


def publish(counters: RingCounters) -> None:
    """Add what changed in `counters` since its last publish to the Prometheus series.

    Every KV manager publishes its own counters; the series hold the sum over managers.
    """
    series = _get_series()
    current = tuple(getattr(counters, name) for name in _NAMES)
    for name, now, before in zip(_NAMES, current, counters.last_published):
        if now != before:
            series[name].inc(now - before)
    counters.last_published = current
