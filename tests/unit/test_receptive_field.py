"""The receptive-field bound (docs/design.md, "The receptive field"), on the float64 oracle.

A random multi-layer Llama (float64, DESIGN §2 attention in every layer) computes a prompt in
full, and again computing only the global prefix and the last r tokens, the keys between them
absent and every computed token at its true position. With r = R = layers · (n_local - 1) + 1
the last token's logits and every key/value a later query can see equal the full computation
to float64 rounding; at r = R - 1 the last logits differ, at r = R - 2 the state does: the
bound is tight. Also checked, per layer: exactly which computed positions are exact.
"""

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from oracle import Float64Llama
from random_llama import random_llama
from lminf_vllm.receptive_field import (first_exact_position, receptive_field_tokens,
                                        skipped_positions, tail_start)

# Both sides are float64 through the same oracle functions; only the order of the softmax
# sums differs (absent keys vs masked ones), ~1e-15. The smallest real difference seen at
# R - 1 is ~2e-5 (four layers, n_local = 2: one path along four window edges), so a change
# beyond DIFFERS is a dependence, not rounding.
FLOAT64_ATOL = 1e-12
DIFFERS = 1e-9
VOCAB = 64
# Prompt length past n_global + R, so that a middle is skipped even at r = R - 2.
EXTRA_TOKENS = 11


@dataclass(frozen=True)
class Case:
    layers: int
    n_local: int
    n_global: int
    page_size: int
    trained_length: int

    def settings(self) -> dict:
        return dict(n_global=self.n_global, n_local=self.n_local, L=self.trained_length,
                    B=self.page_size)


# n_global 0, not page-aligned and aligned; n_local from 1 to L - B + 1; every case has the
# distance clamp active (windows plus a page reach past L).
CASES = {
    "one-layer-no-global": Case(1, 5, 0, 4, 12),
    "two-layers-global-not-page-aligned": Case(2, 4, 5, 4, 8),
    "three-layers-short-window": Case(3, 3, 6, 4, 8),
    "two-layers-window-l-b-plus-1": Case(2, 9, 3, 4, 12),
    "four-layers-window-of-two": Case(4, 2, 8, 4, 8),
}
WINDOW_OF_ONE = Case(3, 1, 5, 4, 8)  # R = 1: no bound to be tight against


@dataclass
class Computation:
    positions: torch.Tensor        # [N] the positions computed, ascending
    logits: torch.Tensor           # [N, vocab]
    keys_values: list              # per layer (k, v), each [N, Hkv, D]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A random float64 Llama per layer count (hidden 32, head size 8, GQA 2)."""
    layer_counts = {case.layers for case in [*CASES.values(), WINDOW_OF_ONE]}
    return {layers: Float64Llama(random_llama(
        tmp_path_factory.mktemp(f"layers{layers}"), seed=layers, num_hidden_layers=layers,
        hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        intermediate_size=64, vocab_size=VOCAB)) for layers in layer_counts}


def prompt_for(case: Case) -> torch.Tensor:
    length = case.n_global + receptive_field_tokens(case.layers, case.n_local) + EXTRA_TOKENS
    return torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(length))


def compute(model, tokens, case: Case, skipped: range = range(0)) -> Computation:
    """The prompt with the positions in `skipped` absent (no query, no key)."""
    positions = torch.tensor([p for p in range(len(tokens)) if p not in skipped])
    logits, keys_values = model.forward(tokens, mode="lminf", positions=positions,
                                        **case.settings())
    return Computation(positions, logits, keys_values)


def difference(part, full, positions, wanted: range) -> float:
    """max |part - full| over the computed positions in `wanted`; part is indexed like
    positions, full by position."""
    rows = [i for i, p in enumerate(positions.tolist()) if p in wanted]
    assert rows, f"no computed position in {list(wanted)}"
    return float((part[rows] - full[positions[rows]]).abs().max())


def skipping(case: Case, tokens, last_tokens: int) -> range:
    """The middle skipped when the global prefix and the last `last_tokens` are computed."""
    return range(case.n_global, len(tokens) - last_tokens)


@pytest.mark.parametrize("name", [*CASES, "window-of-one"])
def test_global_prefix_plus_last_r_tokens_reproduce_the_output_and_state(models, name):
    case = CASES.get(name, WINDOW_OF_ONE)
    tokens = prompt_for(case)
    full = compute(models[case.layers], tokens, case)
    skipped = skipped_positions(len(tokens), case.n_global, case.n_local, case.layers)
    assert len(skipped) == EXTRA_TOKENS
    part = compute(models[case.layers], tokens, case, skipped)

    error = difference(part.logits, full.logits, part.positions, range(len(tokens) - 1,
                                                                       len(tokens)))
    assert error <= FLOAT64_ATOL, f"last token's logits off by {error:.2e}"
    # The state at T = len(tokens): every key/value the next query can see.
    window = range(len(tokens) - case.n_local + 1, len(tokens))
    for layer, ((k, v), (k_full, v_full)) in enumerate(zip(part.keys_values,
                                                          full.keys_values), start=1):
        for what, mine, theirs in (("k", k, k_full), ("v", v, v_full)):
            for visible in (range(case.n_global), window):
                if visible:
                    error = difference(mine, theirs, part.positions, visible)
                    assert error <= FLOAT64_ATOL, (
                        f"layer {layer} {what} at positions {visible} off by {error:.2e}")


@pytest.mark.parametrize("name", CASES)
def test_exactly_the_positions_the_bound_names_are_exact(models, name):
    """Per layer: computed position p is exact iff p >= first_exact_position (or global)."""
    case = CASES[name]
    tokens = prompt_for(case)
    full = compute(models[case.layers], tokens, case)
    skipped = skipped_positions(len(tokens), case.n_global, case.n_local, case.layers)
    part = compute(models[case.layers], tokens, case, skipped)

    # layer l's keys and values come from the hidden state after l - 1 layers; the logits
    # from the one after all of them
    checks = [(f"layer {layer} {what}", layer - 1, pair[index], full_pair[index])
              for layer, (pair, full_pair) in enumerate(zip(part.keys_values,
                                                            full.keys_values), start=1)
              for index, what in enumerate("kv")]
    checks.append(("logits", case.layers, part.logits, full.logits))
    for what, layers_applied, mine, theirs in checks:
        first_exact = first_exact_position(skipped, case.n_local, layers_applied)
        error = difference(mine, theirs, part.positions, range(first_exact, len(tokens)))
        assert error <= FLOAT64_ATOL, (
            f"{what}: positions {first_exact}..{len(tokens) - 1} off by {error:.2e}")
        if case.n_global:
            error = difference(mine, theirs, part.positions, range(case.n_global))
            assert error <= FLOAT64_ATOL, f"{what}: global prefix off by {error:.2e}"
        if first_exact > skipped.stop:  # the computed position below it must be wrong
            error = difference(mine, theirs, part.positions, range(first_exact - 1,
                                                                   first_exact))
            assert error > DIFFERS, f"{what}: position {first_exact - 1} exact, bound loose"


@pytest.mark.parametrize("name", CASES)
def test_one_token_fewer_changes_the_output_two_fewer_the_state(models, name):
    case = CASES[name]
    tokens = prompt_for(case)
    receptive_field = receptive_field_tokens(case.layers, case.n_local)
    full = compute(models[case.layers], tokens, case)
    last = range(len(tokens) - 1, len(tokens))
    window = range(len(tokens) - case.n_local + 1, len(tokens))

    short_by_one = compute(models[case.layers], tokens, case,
                           skipping(case, tokens, receptive_field - 1))
    error = difference(short_by_one.logits, full.logits, short_by_one.positions, last)
    assert error > DIFFERS, f"R - 1 tokens reproduce the last logits ({error:.2e})"
    # The next query sees keys up to n_local - 1 back, whose last layer needs one window
    # fewer than the last token's output: layers · (n_local - 1) tokens fix the state.
    state_error = max(difference(k, k_full, short_by_one.positions, window)
                      for (k, _), (k_full, _) in zip(short_by_one.keys_values,
                                                     full.keys_values))
    assert state_error <= FLOAT64_ATOL, f"R - 1 tokens: state off by {state_error:.2e}"

    if receptive_field - 2 >= case.n_local - 1:  # the window itself is still computed
        short_by_two = compute(models[case.layers], tokens, case,
                               skipping(case, tokens, receptive_field - 2))
        state_error = max(difference(k, k_full, short_by_two.positions, window)
                          for (k, _), (k_full, _) in zip(short_by_two.keys_values,
                                                         full.keys_values))
        assert state_error > DIFFERS, f"R - 2 tokens reproduce the state ({state_error:.2e})"


@pytest.mark.parametrize("prompt_tokens, n_global, n_local, layers, expected", [
    (100, 0, 5, 2, range(0, 91)),      # R = 9: no global prefix
    (100, 5, 4, 3, range(5, 90)),      # R = 10, n_global not page-aligned
    (15, 5, 4, 3, range(5, 5)),        # n_global + R = P: the two ranges meet
    (12, 5, 4, 3, range(5, 5)),        # they overlap: everything computed
    (3, 64, 4, 3, range(64, 64)),      # the prompt is all global prefix
    (50, 2, 1, 6, range(2, 49)),       # n_local = 1: R = 1, the last token alone
    (1537, 64, 256, 6, range(64, 64)),  # the tiny model: 64 + 6 · 255 + 1 = 1,595 > 1,537
    (1600, 64, 256, 6, range(64, 69)),
])
def test_skipped_positions(prompt_tokens, n_global, n_local, layers, expected):
    assert skipped_positions(prompt_tokens, n_global, n_local, layers) == expected


def test_first_exact_position_counts_one_window_per_layer():
    skipped = range(5, 90)
    assert [first_exact_position(skipped, 4, layers) for layers in range(4)] == [90, 93, 96, 99]
    assert first_exact_position(range(5, 5), 4, 3) == 0  # nothing skipped: all exact


@pytest.mark.parametrize("call", [
    lambda: receptive_field_tokens(0, 4), lambda: receptive_field_tokens(2, 0),
    lambda: skipped_positions(0, 4, 4, 2), lambda: skipped_positions(10, -1, 4, 2),
    lambda: first_exact_position(range(1, 3), 4, -1),
])
def test_bad_arguments_are_refused(call):
    with pytest.raises(ValueError, match="receptive_field: "):
        call()


@pytest.mark.parametrize("prompt_tokens, n_global, n_local, layers, page_size, expected", [
    (4096, 64, 256, 6, 16, 2560),   # the tiny model at 16L: P - R = 2565, down to a page
    (1600, 64, 256, 6, 16, 0),      # P - R = 69: the tail's window would reach the pins
    (1851, 64, 256, 6, 16, 320),    # the shortest prompt whose tail clears them: 320 - 255
    (1850, 64, 256, 6, 16, 0),      # = 65 >= G·B = 64; one token less, 304 - 255 < 64
    (200, 0, 5, 3, 4, 184),         # no global prefix: P - R = 187
    (200, 5, 5, 3, 4, 184),         # n_global not page-aligned
    (14, 5, 4, 3, 4, 0),            # nothing to skip
    (81, 64, 1, 6, 16, 80),         # n_local = 1: the window is the query itself
    (70, 64, 1, 6, 16, 0),          # P - R = 69: no whole page to skip
])
def test_tail_start(prompt_tokens, n_global, n_local, layers, page_size, expected):
    start = tail_start(prompt_tokens, n_global, n_local, layers, page_size)
    assert start == expected
    if start:  # page-aligned, at or below P - R, its windows clear of the pinned pages
        assert start % page_size == 0
        assert start <= prompt_tokens - receptive_field_tokens(layers, n_local)
        assert start - (n_local - 1) >= -(-n_global // page_size) * page_size


@pytest.mark.parametrize("path", ["reference", "cpu"])
def test_paged_tail_never_reads_a_skipped_slot(path):
    """The engine's rule on the paged cache: after a first chunk past the global prefix,
    a jump to the page-aligned tail start b, then the tail in chunks through the ring,
    every tail query sees the global prefix and [b, t] only. The cache starts as NaN, so a
    skipped slot read anywhere poisons the output; the oracle has the skipped keys absent."""
    from test_reference import PATHS, Case as PagedCase, rotation_table, step

    import oracle
    from lminf_vllm.config import LMInfConfig

    page_size, n_global, n_local, trained_length, chunk = 4, 5, 6, 12, 8
    prompt_tokens, first_chunk, start = 80, 8, 40
    heads, kv_heads, head_dim = 4, 2, 8
    config = LMInfConfig(n_global, n_local, trained_length, page_size, chunk)
    assert start - (n_local - 1) >= config.num_pinned_pages * page_size  # as tail_start keeps
    width = config.num_pinned_pages + config.num_ring_pages
    block_table = torch.randperm(width + 3)[:width][None]
    cache = torch.full((width + 3, kv_heads, page_size, 2 * head_dim), float("nan"))
    inv_freq = oracle.default_inv_freq(head_dim)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(prompt_tokens, h, head_dim, generator=generator,
                           dtype=torch.float64) for h in (heads, kv_heads, kv_heads))
    frame = lambda x, positions: oracle.rope_rotate(x, (positions % page_size)[:, None],
                                                    inv_freq)
    paged = PagedCase(page_size, n_global, n_local, trained_length, heads, kv_heads, head_dim,
                      head_dim, "neox", chunk, True, [])
    computed = [range(0, first_chunk)] + [range(s, min(s + chunk, prompt_tokens))
                                          for s in range(start, prompt_tokens, chunk)]
    outputs = []
    for chunk_range in computed:
        positions = torch.arange(chunk_range.start, chunk_range.stop)
        out, = step(config, cache, block_table, config.num_ring_pages,
                    [(0, chunk_range.stop, frame(q[positions], positions),
                      frame(k[positions], positions), v[positions])],
                    attend=PATHS[path], rotation=rotation_table(paged, inv_freq),
                    scale=head_dim ** -0.5, tail_start=np.array([start]))
        outputs.append(out)
    tail = torch.arange(start, prompt_tokens)
    present = torch.cat([torch.arange(first_chunk), tail])
    expected = oracle.lambda_attention(q[tail], k[present], v[present], tail, n_global,
                                       n_local, trained_length, page_size, inv_freq,
                                       scale=head_dim ** -0.5, key_positions=present)
    error = (torch.cat(outputs[1:]).double() - expected).abs().max()
    assert float(error) < 3e-5, f"tail off by {float(error):.2e} (NaN: a skipped slot read)"
