"""LMInfConfig: the plugin's parameters, their defaults from the model, and validation.

Users set the parameters the vLLM way, through ``additional_config``:

    LLM(model, attention_backend="lminf",
        additional_config={"lminf": {"n_global": 64, "n_local": 256}})
    vllm serve MODEL --attention-backend lminf \
        --additional-config '{"lminf": {"n_global": 64}}'

The page size B is vLLM's block size (``--block-size``). This module imports nothing from
vLLM at module level, so the pure math (rope frame, attention) can depend on it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Mapping

ADDITIONAL_CONFIG_KEY = "lminf"
ALLOWED_KEYS = ("n_global", "n_local", "trained_length", "max_prefill_chunk_tokens",
                "attention_impl", "receptive_field_prefill", "stream_states",
                "stream_idle_timeout_s", "continuation")
# Kept stream states (lminf_vllm/sessions.py): how many at most, and how long one may sit
# unused; each holds at most G + R pages of the block pool.
DEFAULT_STREAM_STATES = 16
DEFAULT_STREAM_IDLE_TIMEOUT_S = 600
# Which attention path runs: "auto" (the Triton kernels on CUDA, the CPU path elsewhere),
# "reference" (the PyTorch reference on any device), "triton" (the kernels on any device;
# on the CPU only under the Triton interpreter, TRITON_INTERPRET=1).
ATTENTION_IMPLS = ("auto", "reference", "triton")

DEFAULT_N_GLOBAL = 64
# The CPU build defaults to 128-token pages; for a short trained length that would make
# n_local <= L - B + 1 tiny, so below this bound we pick a page size from L instead.
MAX_AUTO_PAGE_SIZE = 128
MIN_AUTO_PAGE_SIZE = 16
# An automatic page keeps at least this many pages inside the trained length, so that the
# window distances stay exact for n_local up to L - L/16.
AUTO_PAGES_PER_TRAINED_LENGTH = 16

# RoPE variants whose cos/sin table is a fixed function of position: the per-page query
# rotation can look its angles up in the model's own table. Position-dependent tables
# (longrope switches table past the original length) or multi-axis RoPE (mrope) cannot.
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


class LMInfConfigError(ValueError):
    """A bad lminf parameter or an unsupported model; the message names what to change."""


@dataclass(frozen=True)
class LMInfConfig:
    """The Λ-attention parameters (DESIGN §2 names in brackets).

    n_global [n_global]: tokens at the start of the stream every query sees.
    n_local [n_local]: the local window, in tokens (the query itself included).
    trained_length [L]: the distance limit; RoPE never sees a relative distance beyond it.
    page_size [B]: vLLM's block size; keys are stored rotated by their offset in the page.
    max_prefill_chunk_tokens: the largest prefill chunk one request gets in one step; the
        ring of pages must hold n_local plus this.
    receptive_field_layers: the attention layers n of receptive-field prefill (a prompt
        without prompt logprobs computes its global prefix and last n·(n_local - 1) + 1
        tokens: lminf_vllm/receptive_field.py); 0 when it is off.
    stream_states: the most stream states (sessions and, with continuation, finished
        requests) kept between requests (lminf_vllm/sessions.py); 0 keeps none.
    stream_idle_timeout_s: a kept state unused this long is evicted.
    continuation: keep every finished request's state, for transparent continuation of
        clients that resend the whole history (off: only sessions are kept).
    """

    n_global: int
    n_local: int
    trained_length: int
    page_size: int
    max_prefill_chunk_tokens: int
    attention_impl: str = "auto"
    receptive_field_layers: int = 0
    stream_states: int = DEFAULT_STREAM_STATES
    stream_idle_timeout_s: float = DEFAULT_STREAM_IDLE_TIMEOUT_S
    continuation: bool = False

    def __post_init__(self) -> None:
        _check_int("page_size (--block-size)", self.page_size, 1, None)
        _check_int("trained_length", self.trained_length, self.page_size, None,
                   hint="L must hold at least one page: raise trained_length or lower "
                        "--block-size")
        _check_int("n_global", self.n_global, 0, None)
        _check_int("n_local", self.n_local, 1, self.trained_length,
                   hint="the window cannot exceed the distance limit L")
        _check_int("max_prefill_chunk_tokens", self.max_prefill_chunk_tokens, 1, None)
        _check_int("receptive_field_layers", self.receptive_field_layers, 0, None)
        _check_int("stream_states", self.stream_states, 0, None)
        timeout = self.stream_idle_timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise LMInfConfigError(
                f"lminf: stream_idle_timeout_s={timeout!r} must be a number of seconds > 0")
        if not isinstance(self.continuation, bool):
            raise LMInfConfigError(
                f"lminf: continuation={self.continuation!r} must be true or false")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise LMInfConfigError(
                f"lminf: attention_impl={self.attention_impl!r} is not one of "
                f"{list(ATTENTION_IMPLS)}")

    @property
    def num_pinned_pages(self) -> int:
        """G = ceil(n_global / B): pages pinned for the global prefix (DESIGN §3)."""
        return -(-self.n_global // self.page_size)

    @property
    def num_ring_pages(self) -> int:
        """R: ring pages covering n_local plus the largest chunk (DESIGN §3).

        A chunk of c queries starting at s reads keys s - n_local + 1 .. s + c - 1, a span of
        n_local + c - 1 tokens, which touches at most ceil((n_local + c - 1) / B) + 1 pages.
        """
        span = self.n_local + self.max_prefill_chunk_tokens - 1
        return -(-span // self.page_size) + 1

    @property
    def max_exact_window(self) -> int:
        """n_local <= L - B + 1 keeps every in-window distance exact (DESIGN §2)."""
        return self.trained_length - self.page_size + 1


def _check_int(name: str, value: Any, low: int, high: int | None, hint: str = "") -> None:
    allowed = f"[{low}, {high}]" if high is not None else f">= {low}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise LMInfConfigError(
            f"lminf: {name}={value!r} must be an integer {allowed}")
    if value < low or (high is not None and value > high):
        raise LMInfConfigError(
            f"lminf: {name}={value} is outside the allowed range {allowed}"
            + (f"; {hint}" if hint else ""))


def auto_page_size(trained_length: int) -> int:
    """The page size chosen when the user did not set --block-size.

    Quality depends on it: every window distance is exact only for n_local <= L - B + 1, so
    B stays at most L / 16 (and a power of two, which the kernels tile well), between 16
    and 128 tokens.
    """
    target = max(MIN_AUTO_PAGE_SIZE, trained_length // AUTO_PAGES_PER_TRAINED_LENGTH)
    page_size = 1 << int(math.floor(math.log2(target)))
    return max(MIN_AUTO_PAGE_SIZE, min(MAX_AUTO_PAGE_SIZE, page_size))


def user_parameters(additional_config: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``{"lminf": {...}}`` part of vLLM's additional_config."""
    section = (additional_config or {}).get(ADDITIONAL_CONFIG_KEY) or {}
    if not isinstance(section, Mapping):
        raise LMInfConfigError(
            f"lminf: additional_config['{ADDITIONAL_CONFIG_KEY}'] must be a mapping such as "
            f'{{"n_global": 64}}, got {section!r}')
    return dict(section)


def rope_parameters(hf_config: Any) -> list[dict[str, Any]]:
    """The model's RoPE parameter dicts (one per layer type when nested)."""
    params = getattr(hf_config, "rope_parameters", None)
    if not isinstance(params, Mapping) or not params:
        # GPT-J states its RoPE as rotary_dim alone; vLLM serves it with the default table.
        if getattr(hf_config, "rotary_dim", None) and getattr(hf_config, "rotary", True):
            return [{"rope_type": "default"}]
        return []
    if all(isinstance(v, Mapping) for v in params.values()):
        return [dict(v) for v in params.values() if v]
    return [dict(params)]


def unsupported_model_reason(hf_config: Any, sliding_window: int | None) -> str | None:
    """Why LM-Infinite cannot serve this model, or None when it can."""
    if getattr(hf_config, "alibi", False) or \
            getattr(hf_config, "position_embedding_type", None) == "alibi":
        return "the model uses ALiBi, not RoPE"
    params = rope_parameters(hf_config)
    if not params:
        return "the model has no RoPE parameters (LM-Infinite needs rotary positions)"
    for p in params:
        rope_type = p.get("rope_type", p.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            return (f"RoPE type {rope_type!r} is not supported "
                    f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
        if "mrope_section" in p:
            return "multi-axis RoPE (mrope) is not supported"
    if sliding_window is not None:
        return (f"the model has its own sliding window ({sliding_window} tokens), which "
                "conflicts with the Λ window")
    return None


def trained_length(parameters: Mapping[str, Any], hf_config: Any) -> int:
    """L: the user's trained_length, else the model's (default_trained_length)."""
    return parameters.get("trained_length", default_trained_length(hf_config))


def default_trained_length(hf_config: Any) -> int:
    """L: the model's original trained length (before any RoPE scaling)."""
    for p in rope_parameters(hf_config):
        original = p.get("original_max_position_embeddings")
        if original:
            return int(original)
    original = getattr(hf_config, "original_max_position_embeddings", None)
    if original:
        return int(original)
    return int(hf_config.max_position_embeddings)


def build_config(parameters: Mapping[str, Any], *, page_size: int, hf_config: Any,
                 max_num_batched_tokens: int, sliding_window: int | None = None,
                 receptive_field_layers: int = 0) -> LMInfConfig:
    """The validated config for one model; raises LMInfConfigError naming the problem.

    receptive_field_layers: the model's attention layers where the engine can skip (see
    `receptive_field_layers`); the user's receptive_field_prefill=false turns it to 0."""
    unknown = sorted(set(parameters) - set(ALLOWED_KEYS))
    if unknown:
        raise LMInfConfigError(
            f"lminf: unknown parameter(s) {unknown} in additional_config['lminf']; "
            f"allowed: {list(ALLOWED_KEYS)}")
    reason = unsupported_model_reason(hf_config, sliding_window)
    if reason:
        raise LMInfConfigError(f"lminf: unsupported model ({reason})")
    distance_limit = trained_length(parameters, hf_config)
    n_local = parameters.get("n_local", distance_limit)
    return LMInfConfig(
        n_global=parameters.get("n_global", DEFAULT_N_GLOBAL),
        n_local=n_local,
        trained_length=distance_limit,
        page_size=page_size,
        max_prefill_chunk_tokens=parameters.get(
            "max_prefill_chunk_tokens",
            default_prefill_chunk_tokens(n_local, page_size, max_num_batched_tokens)),
        attention_impl=parameters.get("attention_impl", "auto"),
        receptive_field_layers=(receptive_field_layers
                                if receptive_field_prefill(parameters) else 0),
        stream_states=parameters.get("stream_states", DEFAULT_STREAM_STATES),
        stream_idle_timeout_s=parameters.get("stream_idle_timeout_s",
                                             DEFAULT_STREAM_IDLE_TIMEOUT_S),
        continuation=parameters.get("continuation", False),
    )


def receptive_field_prefill(parameters: Mapping[str, Any]) -> bool:
    """The user's switch for receptive-field prefill: on unless receptive_field_prefill is
    false (then every prompt token is computed)."""
    value = parameters.get("receptive_field_prefill", True)
    if not isinstance(value, bool):
        raise LMInfConfigError(
            f"lminf: receptive_field_prefill={value!r} must be true or false")
    return value


def receptive_field_layers(vllm_config: Any) -> int:
    """The attention layers receptive-field prefill counts, or 0 where the engine cannot
    skip: model runner v2 (its metadata builder has no per-request prompt lengths yet), and
    models where something besides attention mixes positions (hybrid, attention-free)."""
    model_config = vllm_config.model_config
    if (vllm_config.use_v2_model_runner or model_config.is_hybrid
            or model_config.is_attention_free):
        return 0
    return model_config.get_total_num_hidden_layers()


def default_prefill_chunk_tokens(n_local: int, page_size: int,
                                 max_num_batched_tokens: int) -> int:
    """The per-request prefill chunk cap when the user sets none.

    The ring must hold n_local plus one chunk, so a chunk of n_local tokens (at least one
    page) keeps the ring at about twice the window, while a prefill still runs in chunks as
    long as the window. The scheduler never gives a request more than the batch budget.
    """
    return max(1, min(max_num_batched_tokens, max(n_local, page_size)))


def triton_interpreter_on() -> bool:
    """Whether Triton runs kernels in its interpreter (on CPU tensors): TRITON_INTERPRET=1,
    Triton's own switch, read by Triton when it is first imported."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def from_vllm_config(vllm_config: Any) -> LMInfConfig:
    """The config of a running engine (every process has the same vllm_config)."""
    model_config = vllm_config.model_config
    return build_config(
        user_parameters(vllm_config.additional_config),
        page_size=vllm_config.cache_config.block_size,
        hf_config=model_config.hf_text_config,
        max_num_batched_tokens=vllm_config.scheduler_config.max_num_batched_tokens,
        sliding_window=model_config.get_sliding_window(),
        receptive_field_layers=receptive_field_layers(vllm_config),
    )
