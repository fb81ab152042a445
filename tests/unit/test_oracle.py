"""Self-test of tests/oracle.py: the oracle is only ground truth if it is checked on its own terms.

Checks are metamorphic (RoPE algebra, lminf collapsing to dense when nothing is masked or
clamped), a hand-computed case of the distance clamp, and the float64 Llama against
transformers' own implementation.
"""

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

# tests/ is not a package; put it on the path so the oracle imports the same way from any rootdir.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from oracle import (  # noqa: E402
    Float64HFModel,
    Float64Llama,
    causal_lambda_attention,
    default_inv_freq,
    lambda_attention,
    perplexity_by_segment,
    rope_rotate,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = REPO_ROOT / "tests/assets/tiny-llama-L256"
# held-out tokens live in shared/, which sits beside the checkout (here and in CI)
VAL_TOKENS = REPO_ROOT.parent / "shared/data/val.npy"

# Every comparison below is float64 against float64 except the transformers one, so
# re-association error (~1e-15 per op) is the only expected difference.
FLOAT64_ATOL = 1e-10


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _assert_close(actual, expected, atol, what):
    diff = (torch.as_tensor(actual) - torch.as_tensor(expected)).abs()
    worst = float(diff.max())
    index = tuple(int(i) for i in np.unravel_index(int(diff.argmax()), tuple(diff.shape)))
    assert worst <= atol, f"{what}: max |diff| {worst:.3e} > {atol:.0e} at index {index}"


# ---------------------------------------------------------------- RoPE


@pytest.mark.parametrize("style", ["neox", "gptj"])
def test_rope_rotations_compose_and_preserve_norm(style):
    # head 24, rotary 16: the 8 trailing features must pass through untouched
    x = _randn(5, 3, 24)
    inv_freq = default_inv_freq(16, theta=500.0)
    a = torch.tensor([0, 1, 7, 255, 4095])[:, None]
    b = torch.tensor([3, -2, 0, 1, 100])[:, None]

    twice = rope_rotate(rope_rotate(x, a, inv_freq, style), b, inv_freq, style)
    once = rope_rotate(x, a + b, inv_freq, style)
    _assert_close(twice, once, FLOAT64_ATOL, "R(b) R(a) vs R(a+b)")
    rotated = rope_rotate(x, a, inv_freq, style)
    _assert_close(rotated.norm(dim=-1), x.norm(dim=-1), FLOAT64_ATOL, "norm")
    assert torch.equal(rotated[..., 16:], x[..., 16:]), "features past rotary_dim must not rotate"


@pytest.mark.parametrize("style", ["neox", "gptj"])
def test_rope_logit_depends_only_on_relative_position(style):
    # the identity the blockwise prefill relies on: <R(a) q, R(b) k> = <R(a - b) q, k>
    q, k = _randn(64, seed=1), _randn(64, seed=2)
    inv_freq = default_inv_freq(64)
    for a, b in [(0, 0), (9, 3), (300, 44), (4095, 4000)]:
        lhs = rope_rotate(q, a, inv_freq, style) @ rope_rotate(k, b, inv_freq, style)
        rhs = rope_rotate(q, a - b, inv_freq, style) @ k
        assert abs(float(lhs - rhs)) < FLOAT64_ATOL, (style, a, b)


def test_rope_gptj_equals_neox_after_permutation():
    rotary_dim, half = 16, 8
    x_neox = _randn(4, 20)
    # gptj feature 2i holds neox feature i, gptj feature 2i+1 holds neox feature i + half
    neox_of_gptj = torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).flatten()
    to_gptj = torch.cat([neox_of_gptj, torch.arange(rotary_dim, 20)])
    positions = torch.tensor([0, 5, 77, 1000])
    inv_freq = default_inv_freq(rotary_dim)

    neox = rope_rotate(x_neox, positions, inv_freq, "neox")
    gptj = rope_rotate(x_neox[:, to_gptj], positions, inv_freq, "gptj")
    _assert_close(gptj, neox[:, to_gptj], FLOAT64_ATOL, "gptj vs permuted neox")


# ---------------------------------------------------------------- attention


def test_distance_clamp_by_hand():
    # B=4, L=6, n_global=2, n_local=3, one query at t=9: visible keys and their distances,
    # worked out by hand from DESIGN section 2:
    #   j=0 global, min(9, 6 - 0) = 6      j=1 global, min(8, 6 - 1) = 5  (both clamped)
    #   j=7 local,  min(2, 6 - 3) = 2      j=8 local,  min(1, 6 - 0) = 1      j=9: 0
    # keys 2..6 are outside both the global prefix and the window.
    distance_by_key = {0: 6, 1: 5, 7: 2, 8: 1, 9: 0}
    omega = 0.3  # D = 2: one rotary pair, so R(d) is a plain 2-D rotation by d * omega
    q = (0.7, -1.1)
    keys = [(math.cos(j), math.sin(2 * j)) for j in range(10)]
    values = [(j + 1.0, 100.0 * j) for j in range(10)]  # large for masked keys, so a leak shows

    logits = {}
    for j, d in distance_by_key.items():
        c, s = math.cos(d * omega), math.sin(d * omega)
        q_rot = (q[0] * c - q[1] * s, q[1] * c + q[0] * s)
        logits[j] = (q_rot[0] * keys[j][0] + q_rot[1] * keys[j][1]) / math.sqrt(2)
    norm = sum(math.exp(x) for x in logits.values())
    expected = [sum(math.exp(logits[j]) / norm * values[j][c] for j in logits) for c in range(2)]

    out = lambda_attention(
        torch.tensor(q, dtype=torch.float64).view(1, 1, 2),
        torch.tensor(keys, dtype=torch.float64).view(10, 1, 2),
        torch.tensor(values, dtype=torch.float64).view(10, 1, 2),
        query_positions=[9],
        n_global=2,
        n_local=3,
        L=6,
        B=4,
        inv_freq=torch.tensor([omega], dtype=torch.float64),
    )
    expected = torch.tensor(expected, dtype=torch.float64)
    _assert_close(out.view(2), expected, FLOAT64_ATOL, "hand case")


@pytest.mark.parametrize("num_kv_heads", [6, 2], ids=["mha", "gqa3"])
def test_lambda_attention_is_dense_when_nothing_is_masked_or_clamped(num_kv_heads):
    num_keys = 70
    q = _randn(num_keys, 6, 16, seed=3)
    k = _randn(num_keys, num_kv_heads, 16, seed=4)
    v = _randn(num_keys, num_kv_heads, 16, seed=5)
    positions = torch.tensor([0, 1, 3, 4, 5, 31, 32, 33, 69])
    common = dict(inv_freq=default_inv_freq(16), n_global=5, B=4)
    lminf = lambda_attention(q[positions], k, v, positions, n_local=num_keys, L=num_keys, **common)
    dense = lambda_attention(q[positions], k, v, positions, n_local=1, L=1, dense=True, **common)
    _assert_close(lminf, dense, FLOAT64_ATOL, "lminf with n_local, L >= S vs dense")


@pytest.mark.parametrize(
    "num_tokens, n_global, n_local, L, B, dense",
    [
        (37, 3, 5, 9, 4, False),  # n_global not page-aligned; far keys clamped
        (37, 0, 7, 6, 4, False),  # no global prefix; n_local > L - B + 1, so local keys clamp too
        (37, 8, 6, 9, 4, False),  # n_local = L - B + 1: local distances exact
        (300, 64, 100, 128, 16, False),  # crosses a query-block boundary
        (300, 64, 100, 128, 16, True),
    ],
)
@pytest.mark.parametrize("style", ["neox", "gptj"])
def test_blockwise_prefill_matches_literal_formula(
    num_tokens, n_global, n_local, L, B, dense, style
):
    q = _randn(num_tokens, 6, 16, seed=6)
    k = _randn(num_tokens, 2, 16, seed=7)
    v = _randn(num_tokens, 2, 16, seed=8)
    params = dict(n_global=n_global, n_local=n_local, L=L, B=B, dense=dense, style=style)
    params["inv_freq"] = default_inv_freq(16)
    literal = lambda_attention(q, k, v, torch.arange(num_tokens), **params)
    blockwise = causal_lambda_attention(q, k, v, **params)
    _assert_close(blockwise, literal, FLOAT64_ATOL, f"blockwise vs literal {params}")


def test_perplexity_by_segment():
    logprobs = np.log([0.5, 0.5, 0.25, 0.25, 0.125])
    assert perplexity_by_segment(logprobs, [(0, 2), (2, 4), (4, 8)]) == pytest.approx([2, 4, 8])
    with pytest.raises(ValueError, match="no predictions"):
        perplexity_by_segment(logprobs, [(5, 8)])


# ---------------------------------------------------------------- float64 Llama


@pytest.fixture(scope="module")
def llama():
    return Float64Llama(MODEL_DIR)


@pytest.fixture(scope="module")
def val_tokens():
    return np.load(VAL_TOKENS).astype(np.int64)


def test_float64_llama_matches_transformers(llama, val_tokens, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM

    tokens = val_tokens[:256]
    model = AutoModelForCausalLM.from_pretrained(
        MODEL_DIR, dtype=torch.float32, attn_implementation="eager", local_files_only=True
    )
    ids = torch.as_tensor(tokens)[None]
    with torch.no_grad():
        logits = model(ids).logits[0, :-1].double()
    reference = torch.log_softmax(logits, dim=-1).gather(1, ids[0, 1:, None])[:, 0]
    # transformers runs float32 (the model README saw 1.9e-4 on this window); 1e-3 leaves
    # room for BLAS differences while still catching any real mistake (those are O(0.1)).
    _assert_close(llama.prompt_logprobs(tokens, mode="dense"), reference, 1e-3, "vs transformers")


def test_float64_llama_lminf_is_dense_when_window_covers_sequence(llama, val_tokens):
    tokens = val_tokens[:300]
    lminf = llama.prompt_logprobs(tokens, mode="lminf", n_global=64, n_local=300, L=512, B=16)
    dense = llama.prompt_logprobs(tokens, mode="dense")
    _assert_close(lminf, dense, FLOAT64_ATOL, "lminf (n_local, L >= seq) vs dense")


@pytest.mark.parametrize("mode", ["dense", "lminf"])
def test_transformers_oracle_matches_the_hand_written_llama(llama, val_tokens, mode):
    """The family oracle (transformers' architecture, attention replaced, RoPE from
    served_rope) and the hand-written Llama forward are two independent float64 readings
    of the same model and formula, past L (lminf) and dense. transformers' RMSNorm computes
    in float32 whatever the model's dtype (measured: 2.2e-6 at 600 tokens), so the budget is
    1e-5: still 20x below the engine tests' float32 tolerance, and any real mistake is O(0.1)."""
    tokens = val_tokens[:400]
    window = dict(n_global=64, n_local=256, L=256, B=16)
    family_oracle = Float64HFModel(MODEL_DIR).prompt_logprobs(tokens, mode=mode, **window)
    _assert_close(family_oracle, llama.prompt_logprobs(tokens, mode=mode, **window),
                  1e-5, f"transformers oracle vs Float64Llama ({mode})")
