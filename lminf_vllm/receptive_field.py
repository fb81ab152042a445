"""The receptive field of a Λ-masked transformer: which prompt tokens a prompt's last output
and its state depend on (docs/design.md, "The receptive field"). Pure integer math; no vLLM.

With the mask of DESIGN §2 (`visible(t, j) = j < n_global or t - j < n_local`) the only
cross-token step of a decoder is attention, and each attention layer reaches back at most
n_local - 1 tokens past the global prefix. So a prompt of P tokens can be computed as its
global prefix plus its last R = num_layers · (n_local - 1) + 1 tokens, the keys between them
absent and every computed token at its true position: the last token's output, and every key
and value a later query can see, equal those of the full computation.
"""

from __future__ import annotations


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
