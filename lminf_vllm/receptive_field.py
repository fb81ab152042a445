"""The receptive field of a Λ-masked transformer: which prompt tokens a prompt's last output
and its state depend on (docs/design.md, "The receptive field"). Pure integer math; no vLLM.

With the mask of DESIGN §2 (`visible(t, j) = j < n_global or t - j < n_local`) the only
cross-token step of a decoder is attention, and each attention layer reaches back at most
n_local - 1 tokens past the global prefix. So a prompt of P tokens can be computed as its
global prefix plus its last R = num_layers · (n_local - 1) + 1 tokens, the keys between them
absent and every computed token at its true position: the last token's output, and every key
and value a later query can see, equal those of the full computation.

`tail_start` is how the engine uses it: the start of a page-aligned computed tail, which the
scheduler jumps to once the global prefix is computed and below which the tail's queries
list no page.
"""

from __future__ import annotations

from lminf_vllm.config import LMInfConfig


def _check_positive(name: str, value: int, minimum: int) -> None:
    if not isinstance(value, int) or value < minimum:
        raise ValueError(f"receptive_field: {name}={value!r} must be an integer >= {minimum}")


def receptive_field_tokens(num_layers: int, n_local: int) -> int:
    """R = num_layers · (n_local - 1) + 1: how many trailing prompt tokens (with the global
    prefix) fix the last token's output exactly; R - 1 do not, in general."""
    _check_positive("num_layers", num_layers, 1)
    _check_positive("n_local", n_local, 1)
    return num_layers * (n_local - 1) + 1


def skipped_positions(prompt_tokens: int, n_global: int, n_local: int,
                      num_layers: int) -> range:
    """The positions of a prompt that need not be computed: range(n_global, P - R).

    Empty when the global prefix [0, n_global) and the last R tokens [P - R, P) meet or
    overlap (then everything is computed). The mask is token-exact, so n_global need not be
    a multiple of the page size: the tokens of the last pinned page past n_global are
    ordinary local tokens and may be skipped.
    """
    _check_positive("prompt_tokens", prompt_tokens, 1)
    _check_positive("n_global", n_global, 0)
    last_window_start = prompt_tokens - receptive_field_tokens(num_layers, n_local)
    return range(n_global, max(n_global, last_window_start))


def first_exact_position(skipped: range, n_local: int, layers_applied: int) -> int:
    """The smallest position past a skipped range whose hidden state after `layers_applied`
    attention layers equals the full computation's: skipped.stop + layers · (n_local - 1).

    The global prefix is always exact (its queries see only earlier global tokens); the
    computed tokens in [skipped.stop, first exact position) are not, since their windows
    reached absent keys at some layer. The keys and values of attention layer l (1-based)
    are computed from the hidden state after l - 1 layers. With nothing skipped every
    position is exact (returns 0).
    """
    _check_positive("n_local", n_local, 1)
    _check_positive("layers_applied", layers_applied, 0)
    if not skipped:
        return 0
    return skipped.stop + layers_applied * (n_local - 1)


def tail_start(prompt_tokens: int, n_global: int, n_local: int, num_layers: int,
               page_size: int) -> int:
    """Where the computed tail of a prompt starts in the engine, or 0 when nothing is skipped.

    The last page boundary b at or below P - R, so the tail is whole pages and its queries
    can leave out every page below b instead of masking keys. Kept only when no window of
    the tail reaches the pinned pages (b - (n_local - 1) >= G·B): their keys past n_global
    are local keys, which the tail must not see (a page-level rule cannot drop them), and
    nor can a skip that short save much.

    Whatever is computed below b (the global prefix, and a first chunk that may run past
    it), queries at t >= b see only the global prefix and [b, t]: the theorem of
    docs/design.md with s = b, so the last token's output and the state are exact.
    """
    _check_positive("page_size", page_size, 1)
    skipped = skipped_positions(prompt_tokens, n_global, n_local, num_layers)
    start = skipped.stop - skipped.stop % page_size
    pinned_tokens = -(-n_global // page_size) * page_size
    skips_something = start > n_global
    return start if skips_something and start - (n_local - 1) >= pinned_tokens else 0


def request_tail_start(config: LMInfConfig, stream_tokens: int,
                       needs_every_output: bool) -> int:
    """`tail_start` for one request of an engine, or 0 where it computes every token: the
    engine has receptive-field prefill off (config.receptive_field_layers == 0), or the
    request reads the output of every prompt token (prompt logprobs, pooling).

    stream_tokens is what the request computes up to: its prompt, or, for a request
    resumed after preemption, its prompt and the output so far (the stream it rebuilds).
    The scheduler (which jumps) and the metadata builder (which plans) both decide here."""
    if needs_every_output or not config.receptive_field_layers:
        return 0
    return tail_start(stream_tokens, config.n_global, config.n_local,
                      config.receptive_field_layers, config.page_size)
