"""Ring counters: what the KV manager counts, how managers combine, the series they become.

The KV manager (EngineCore) keeps `RingCounters` as plain host ints, updated with O(1)
integer arithmetic per request when it claims blocks, grows a stream or frees a request
(no device sync, no lists walked). patches/scheduler_stats_lminf.py copies them into the
SchedulerStats that the EngineCore already sends with its outputs every step; the stat
logger in the API server (lminf_vllm/stat_logger.py) turns them into the series below.
Pure bookkeeping: nothing here imports vLLM or prometheus_client.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable


@dataclass
class RingCounters:
    """One KV cache group's counters (host ints)."""

    pages_pinned: int = 0
    ring_pages: int = 0
    ring_pages_overwritten: int = 0
    tokens_past_trained_length: int = 0
    requests_past_trained_length: int = 0
    prompt_tokens_skipped: int = 0  # receptive-field prefill (patches/receptive_field_prefill)
    recompute_tokens: int = 0  # computed again by requests resumed after preemption
    recompute_tokens_skipped: int = 0  # of their streams, not computed again (same patch)

    def on_stream_growth(self, pages_before: int, pages_after: int, tokens_before: int,
                         tokens_after: int, pages_per_request: int,
                         trained_length: int) -> None:
        """A request's stream grew from tokens_before to tokens_after (pages likewise)."""
        self.ring_pages_overwritten += (max(pages_after - pages_per_request, 0)
                                        - max(pages_before - pages_per_request, 0))
        self.tokens_past_trained_length += (max(tokens_after - trained_length, 0)
                                            - max(tokens_before - trained_length, 0))
        self.requests_past_trained_length += (int(tokens_after > trained_length)
                                              - int(tokens_before > trained_length))

    def on_stream_end(self, tokens: int, trained_length: int) -> None:
        """A request of `tokens` tokens freed its blocks (finished, aborted or preempted)."""
        self.requests_past_trained_length -= int(tokens > trained_length)

    def on_blocks_held(self, blocks_before: int, blocks_after: int,
                       num_pinned_pages: int) -> None:
        """A request's held blocks changed (claimed, or all freed)."""
        pinned_before = min(blocks_before, num_pinned_pages)
        pinned_after = min(blocks_after, num_pinned_pages)
        self.pages_pinned += pinned_after - pinned_before
        self.ring_pages += (blocks_after - pinned_after) - (blocks_before - pinned_before)


@dataclass(frozen=True)
class Series:
    """One Prometheus series fed from a RingCounters field."""

    field: str
    name: str
    kind: str  # "gauge" (a level) or "counter" (a running total)
    help: str


SERIES: tuple[Series, ...] = (
    Series("pages_pinned", "lminf:pages_pinned", "gauge",
           "KV pages pinned for the global prefix (G per request), live requests"),
    Series("ring_pages", "lminf:ring_pages", "gauge",
           "KV ring pages held by live requests (at most R per request)"),
    Series("ring_pages_overwritten", "lminf:ring_pages_overwritten", "counter",
           "Ring pages reused in place: pages of the stream evicted without a free"),
    Series("tokens_past_trained_length", "lminf:tokens_past_trained_length", "counter",
           "KV slots written at positions at or past the trained length L"),
    Series("requests_past_trained_length", "lminf:requests_past_trained_length", "gauge",
           "Live requests whose stream is longer than the trained length L"),
    Series("prompt_tokens_skipped", "lminf:prompt_tokens_skipped", "counter",
           "Prompt tokens never computed by receptive-field prefill (outside the global "
           "prefix and the last n_layers * (n_local - 1) + 1 tokens)"),
    # the stream-state store (lminf_vllm/sessions.py: StoreCounters)
    Series("sessions_held", "lminf:sessions_held", "gauge",
           "Sessions whose state (G + R pages) is kept between requests"),
    Series("stream_states_held", "lminf:stream_states_held", "gauge",
           "Stream states kept between requests (sessions and finished streams)"),
    Series("stream_state_pages", "lminf:stream_state_pages", "gauge",
           "KV pages held by kept stream states"),
    Series("stream_states_evicted", "lminf:stream_states_evicted", "counter",
           "Kept stream states evicted (memory pressure, the cap, the idle timeout)"),
    Series("sessions_evicted", "lminf:sessions_evicted", "counter",
           "Sessions whose kept state was evicted (their next request is refused: resend "
           "the full stream)"),
    Series("stream_tokens_adopted", "lminf:stream_tokens_adopted", "counter",
           "Tokens requests did not recompute because they continued a kept state"),
    Series("recompute_tokens", "lminf:recompute_tokens", "counter",
           "Tokens computed again to resume requests after preemption (their global "
           "prefix and last n_layers * (n_local - 1) + 1 tokens, or the whole stream with "
           "receptive-field prefill off)"),
    Series("recompute_tokens_skipped", "lminf:recompute_tokens_skipped", "counter",
           "Tokens of preempted requests' streams that their recovery did not compute "
           "again"),
)

# Page counts are per KV cache group (each group claims its own blocks), so they add up over
# groups; every group sees the same token streams, so stream counts are taken once.
_PER_GROUP_FIELDS = ("pages_pinned", "ring_pages", "ring_pages_overwritten")


def combine(groups: Iterable[RingCounters]) -> dict[str, int] | None:
    """The engine's counters over its lminf KV cache groups; None when it has none."""
    values = [asdict(counters) for counters in groups]
    if not values:
        return None
    return {name: (sum if name in _PER_GROUP_FIELDS else max)(v[name] for v in values)
            for name in values[0]}
