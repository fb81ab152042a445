"""Dense float64 evaluation of DESIGN section 2: the ground truth for every attention path.

Written straight from the formula and deliberately independent of ``lminf_vllm`` (it imports
nothing from it), so a misunderstanding in the product cannot leak into its own reference.

Contents:
  * ``rope_rotate`` / ``default_inv_freq``: RoPE in float64, neox (rotate-half) or gptj layout.
  * ``lambda_attention``: the section-2 formula, one query at a time, for small unit-test sizes.
  * ``causal_lambda_attention``: the same formula for a full causal prefill, blockwise so that
    a 4,096-token sequence fits in memory; checked against ``lambda_attention`` in
    ``tests/unit/test_oracle.py``.
  * ``Float64Llama``: a float64 Llama forward read straight from safetensors (no transformers
    model classes), giving per-token prompt log-probabilities in "dense" or "lminf" mode,
    and logits and per-layer keys/values of a prompt computed whole or at chosen positions
    only (the others absent: receptive-field prefill).
  * ``Float64HFModel``: any transformers causal LM in float64 with section-2 attention, its
    RoPE from ``served_rope`` (the table vLLM serves for the config), for the model families.
  * ``perplexity_by_segment``.
"""

import json
import math
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

ROPE_STYLES = ("neox", "gptj")

# Query block of the blockwise prefill: a [heads, 256, 4096] float64 logit matrix is 50 MB,
# so a few live copies stay far below the memory budget for 4k-token sequences.
QUERY_BLOCK_TOKENS = 256


def _float64(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float64)


def default_inv_freq(rotary_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """RoPE frequencies inv_freq[i] = 1 / theta^(2i / rotary_dim). Returns [rotary_dim // 2]."""
    if rotary_dim % 2:
        raise ValueError(f"oracle: rotary_dim={rotary_dim} must be even")
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim
    return 1.0 / theta**exponents


def rope_rotate(x, angle_positions, inv_freq, style: str = "neox") -> torch.Tensor:
    """Rotate x by RoPE at integer positions, in float64.

    x: [..., D]; the first rotary_dim = 2 * len(inv_freq) features rotate, the rest pass through.
    angle_positions: broadcastable against x.shape[:-1].
    style: "neox" pairs feature i with i + rotary_dim / 2 (HF Llama's rotate-half);
           "gptj" pairs feature 2i with 2i + 1.
    Pair i turns by angle position * inv_freq[i]:
        (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)
    so <R(a) q, R(b) k> = <R(a - b) q, k>.
    """
    if style not in ROPE_STYLES:
        raise ValueError(f"oracle: style={style!r} must be one of {ROPE_STYLES}")
    x = _float64(x)
    inv_freq = _float64(inv_freq)
    half = inv_freq.shape[0]
    rotary_dim = 2 * half
    if rotary_dim > x.shape[-1]:
        raise ValueError(f"oracle: rotary_dim={rotary_dim} exceeds the head size {x.shape[-1]}")
    angles = _float64(angle_positions)[..., None] * inv_freq
    cos, sin = angles.cos(), angles.sin()
    rotary, passthrough = x[..., :rotary_dim], x[..., rotary_dim:]
    if style == "neox":
        x1, x2 = rotary[..., :half], rotary[..., half:]
    else:
        x1, x2 = rotary[..., 0::2], rotary[..., 1::2]
    y1 = x1 * cos - x2 * sin
    y2 = x2 * cos + x1 * sin
    if style == "neox":
        rotated = torch.cat([y1, y2], dim=-1)
    else:
        rotated = torch.stack([y1, y2], dim=-1).flatten(-2)
    passthrough = passthrough.expand(*rotated.shape[:-1], passthrough.shape[-1])
    return torch.cat([rotated, passthrough], dim=-1)


def _check_heads_and_window(num_q_heads: int, num_kv_heads: int, n_local: int, dense: bool) -> int:
    """Returns the GQA group size (query heads per KV head)."""
    if num_q_heads % num_kv_heads:
        raise ValueError(
            f"oracle: {num_q_heads} query heads is not a multiple of {num_kv_heads} KV heads"
        )
    # with no local window a query past the global prefix would see no key at all
    if not dense and n_local < 1:
        raise ValueError(f"oracle: n_local={n_local} must be at least 1 (the query's own key)")
    return num_q_heads // num_kv_heads


def lambda_attention(
    q,
    k,
    v,
    query_positions,
    n_global: int,
    n_local: int,
    L: int,
    B: int,
    inv_freq,
    style: str = "neox",
    scale: float | None = None,
    dense: bool = False,
    key_positions=None,
) -> torch.Tensor:
    """LM-Infinite attention, DESIGN section 2, evaluated literally one query at a time.

    For a query at absolute position t and a key at position j <= t:
        visible(t, j)  = j < n_global  or  t - j < n_local
        distance(t, j) = min(t - j, L - (j mod B))
        logit(t, j)    = scale * < R(distance(t, j)) q_t, k_j >
    softmax over the visible keys, output = sum_j p_j v_j.
    dense=True is plain causal attention: every j <= t visible, distance t - j.

    q: [T, H, D] unrotated queries; k, v: [S, Hkv, D] unrotated; query_positions: [T]
    absolute positions. key_positions: [S] absolute positions of the keys, default 0..S-1;
    a position missing from it is a key that is absent (as in receptive-field prefill,
    where the middle of a prompt is never computed), and each query's own position must be
    present. GQA: query head h reads KV head h // (H / Hkv). scale defaults to 1 / sqrt(D).
    Returns [T, H, D] float64.
    """
    q, k, v = _float64(q), _float64(k), _float64(v)
    query_positions = torch.as_tensor(query_positions, dtype=torch.long)
    num_keys, num_kv_heads, head_size = k.shape
    num_q_heads = q.shape[1]
    group = _check_heads_and_window(num_q_heads, num_kv_heads, n_local, dense)
    j = (torch.arange(num_keys) if key_positions is None
         else torch.as_tensor(key_positions, dtype=torch.long))
    if j.shape != (num_keys,):
        raise ValueError(f"oracle: {tuple(j.shape)} key positions for {num_keys} keys")
    keyless = query_positions[~torch.isin(query_positions, j)]
    if keyless.numel():
        raise ValueError(f"oracle: query position {int(keyless[0])} has no key of its own")
    if scale is None:
        scale = head_size**-0.5

    kv_head = torch.arange(num_q_heads) // group
    k_per_q_head, v_per_q_head = k[:, kv_head], v[:, kv_head]  # [S, H, D]
    out = torch.empty_like(q)
    for i, t in enumerate(query_positions.tolist()):
        causal = j <= t
        if dense:
            visible, distance = causal, t - j
        else:
            visible = causal & ((j < n_global) | (t - j < n_local))
            distance = torch.minimum(t - j, L - j % B)
        q_at_distance = rope_rotate(
            q[i].expand(num_keys, num_q_heads, head_size), distance[:, None], inv_freq, style
        )  # [S, H, D]
        logits = scale * (q_at_distance * k_per_q_head).sum(-1)  # [S, H]
        probs = torch.softmax(logits.masked_fill(~visible[:, None], -math.inf), dim=0)
        out[i] = torch.einsum("sh,shd->hd", probs, v_per_q_head)
    return out


def causal_lambda_attention(
    q,
    k,
    v,
    n_global: int,
    n_local: int,
    L: int,
    B: int,
    inv_freq,
    style: str = "neox",
    scale: float | None = None,
    dense: bool = False,
) -> torch.Tensor:
    """``lambda_attention`` for a whole causal prefill (queries at positions 0..T-1), blockwise.

    q: [T, H, D], k, v: [T, Hkv, D], all unrotated. Returns [T, H, D] float64.

    Same formula, rearranged for speed: R(distance) only rotates q, and distance(t, j) is either
      * t - j, when t - j <= L - (j mod B): then the logit is the plain RoPE logit
        <R(t) q_t, R(j) k_j>, one matmul of rotated q against rotated k; or
      * L - (j mod B): then it is <R(L - r) q_t, k_j> with r = j mod B, which takes only B
        distinct rotations of q, each multiplied with the unrotated keys of residue r.
    Both candidate logit matrices are formed per query block and the right one selected per
    (t, j); the visibility mask and softmax are then exactly as in ``lambda_attention``.
    """
    q, k, v = _float64(q), _float64(k), _float64(v)
    num_tokens, num_q_heads, head_size = q.shape
    group = _check_heads_and_window(num_q_heads, k.shape[1], n_local, dense)
    if scale is None:
        scale = head_size**-0.5

    positions = torch.arange(num_tokens)
    q_rotated = rope_rotate(q, positions[:, None], inv_freq, style)
    k_rotated = rope_rotate(k, positions[:, None], inv_freq, style)
    # [H, T, D] with KV heads repeated to line up with their query heads (GQA)
    k_heads = k.repeat_interleave(group, dim=1).transpose(0, 1)
    k_rotated_heads = k_rotated.repeat_interleave(group, dim=1).transpose(0, 1)
    v_heads = v.repeat_interleave(group, dim=1).transpose(0, 1)

    out = torch.empty_like(q)
    for start in range(0, num_tokens, QUERY_BLOCK_TOKENS):
        stop = min(start + QUERY_BLOCK_TOKENS, num_tokens)
        t = positions[start:stop, None]  # [blk, 1]
        j = positions[None, :stop]  # [1, stop]: causality never needs later keys
        logits = q_rotated[start:stop].transpose(0, 1) @ k_rotated_heads[:, :stop].transpose(1, 2)
        visible = j <= t
        if not dense:
            clamped = torch.empty_like(logits)  # [H, blk, stop]
            for residue in range(B):
                q_at_limit = rope_rotate(q[start:stop], L - residue, inv_freq, style)
                clamped[:, :, residue::B] = (
                    q_at_limit.transpose(0, 1) @ k_heads[:, residue:stop:B].transpose(1, 2)
                )
            logits = torch.where(t - j <= L - j % B, logits, clamped)
            visible &= (j < n_global) | (t - j < n_local)
        probs = torch.softmax((scale * logits).masked_fill(~visible, -math.inf), dim=-1)
        out[start:stop] = (probs @ v_heads[:, :stop]).transpose(0, 1)
    return out


def perplexity_by_segment(logprobs, segments) -> list[float]:
    """exp(-mean log-prob) over each (start, stop) segment of prediction indices.

    Prediction i predicts token i + 1 from positions 0..i, so segment (a, b) covers the
    predictions made at query positions a..b-1. A segment reaching past the last prediction
    (e.g. (1024, 2048) on a 2048-token window, whose last prediction is at 2046) covers the
    predictions that exist.
    """
    logprobs = np.asarray(logprobs, dtype=np.float64)
    result = []
    for start, stop in segments:
        chunk = logprobs[start:stop]
        if chunk.size == 0:
            raise ValueError(
                f"oracle: segment ({start}, {stop}) holds no predictions (only {logprobs.size})"
            )
        result.append(float(np.exp(-chunk.mean())))
    return result


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


class Float64Llama:
    """Float64 forward of a HF Llama checkpoint (config.json + *.safetensors).

    Supports RMSNorm, the SiLU-gated MLP, GQA, default-type RoPE in rotate-half (neox)
    layout and tied embeddings; anything else in the config raises rather than being ignored.
    """

    def __init__(self, model_dir):
        model_dir = Path(model_dir)
        config = json.loads((model_dir / "config.json").read_text())
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise NotImplementedError(f"oracle: rope_type={rope_type!r}; only 'default' is known")
        if config.get("hidden_act", "silu") != "silu":
            raise NotImplementedError(f"oracle: hidden_act={config['hidden_act']!r}; only 'silu'")
        if config.get("attention_bias") or config.get("mlp_bias"):
            raise NotImplementedError("oracle: attention_bias / mlp_bias are not written")

        self.num_layers = config["num_hidden_layers"]
        self.num_q_heads = config["num_attention_heads"]
        self.num_kv_heads = config.get("num_key_value_heads", self.num_q_heads)
        self.head_size = config.get("head_dim") or config["hidden_size"] // self.num_q_heads
        self.rms_norm_eps = config["rms_norm_eps"]
        rope_theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
        self.inv_freq = default_inv_freq(self.head_size, rope_theta)

        weights = {}
        for shard in sorted(model_dir.glob("*.safetensors")):
            weights.update({name: w.to(torch.float64) for name, w in load_file(shard).items()})
        self.weights = weights
        self.embed_tokens = weights["model.embed_tokens.weight"]
        self.lm_head = (
            self.embed_tokens if config.get("tie_word_embeddings") else weights["lm_head.weight"]
        )

    def _layer(self, i: int, hidden: torch.Tensor, attend) -> tuple[torch.Tensor, ...]:
        """(hidden after layer i, that layer's unrotated k, v [N, Hkv, D])."""
        def w(name: str) -> torch.Tensor:
            return self.weights[f"model.layers.{i}.{name}.weight"]

        num_tokens = hidden.shape[0]

        x = _rms_norm(hidden, w("input_layernorm"), self.rms_norm_eps)
        q = (x @ w("self_attn.q_proj").T).view(num_tokens, self.num_q_heads, self.head_size)
        k = (x @ w("self_attn.k_proj").T).view(num_tokens, self.num_kv_heads, self.head_size)
        v = (x @ w("self_attn.v_proj").T).view(num_tokens, self.num_kv_heads, self.head_size)
        hidden = hidden + attend(q, k, v).reshape(num_tokens, -1) @ w("self_attn.o_proj").T

        x = _rms_norm(hidden, w("post_attention_layernorm"), self.rms_norm_eps)
        gated = torch.nn.functional.silu(x @ w("mlp.gate_proj").T) * (x @ w("mlp.up_proj").T)
        return hidden + gated @ w("mlp.down_proj").T, k, v

    def forward(
        self,
        token_ids,
        *,
        mode: str,
        n_global: int = 64,
        n_local: int = 256,
        L: int = 256,
        B: int = 16,
        positions=None,
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """(logits [N, vocab], each layer's unrotated (k, v), [N, Hkv, D]) of N tokens.

        positions: the positions computed, ascending; default every position 0..len-1. The
        tokens of the other positions are absent (no query, no key), and the computed ones
        keep their absolute positions in the mask and the distance: receptive-field prefill.
        mode "dense": plain causal attention; "lminf": DESIGN section 2 in every layer.
        """
        if mode not in ("dense", "lminf"):
            raise ValueError(f"oracle: mode={mode!r} must be 'dense' or 'lminf'")
        token_ids = torch.as_tensor(np.asarray(token_ids, dtype=np.int64))
        attention_kwargs = dict(n_global=n_global, n_local=n_local, L=L, B=B,
                                dense=mode == "dense", inv_freq=self.inv_freq, style="neox")
        if positions is None:
            def attend(q, k, v):
                return causal_lambda_attention(q, k, v, **attention_kwargs)
        else:
            positions = torch.as_tensor(positions, dtype=torch.long)
            token_ids = token_ids[positions]

            def attend(q, k, v):
                return lambda_attention(q, k, v, positions, key_positions=positions,
                                        **attention_kwargs)
        keys_values = []
        with torch.no_grad():
            hidden = self.embed_tokens[token_ids]
            for i in range(self.num_layers):
                hidden, k, v = self._layer(i, hidden, attend)
                keys_values.append((k, v))
            hidden = _rms_norm(hidden, self.weights["model.norm.weight"], self.rms_norm_eps)
            return hidden @ self.lm_head.T, keys_values

    def prompt_logprobs(self, token_ids, **settings) -> np.ndarray:
        """log p(token[i+1] | token[0..i]) for i = 0..len-2, as float64 [len - 1]; settings
        (mode, n_global, n_local, L, B) as in ``forward``, every position computed."""
        logits, _ = self.forward(token_ids, **settings)
        token_ids = torch.as_tensor(np.asarray(token_ids, dtype=np.int64))
        logprobs = torch.log_softmax(logits[:-1], dim=-1)
        return logprobs.gather(1, token_ids[1:, None])[:, 0].numpy()


def served_rope(config) -> tuple[torch.Tensor, str]:
    """(inv_freq [rotary_dim / 2], pair layout) of the RoPE vLLM applies for an HF config.

    Written from each scaling's definition, not from vLLM's or lminf's code: the angle of a
    relative distance d is d * inv_freq in every supported type, since each table is
    cos/sin of positions times fixed frequencies.
      default   1 / theta^(2i / rotary_dim)
      linear    default / factor                      (positions divided by factor)
      dynamic   default with theta * (factor * max_pos / max_trained - (factor - 1))
                ^ (rotary_dim / (rotary_dim - 2)): vLLM's table is this fixed, NTK-scaled
                base (transformers' is dynamic in the sequence length; vLLM's is served)
      llama3, yarn  the frequency blends of their papers, from transformers' rope init
    GPT-J pairs features (2i, 2i + 1) ("gptj"); every other family rotates halves ("neox").
    The rotary dimension is head_dim * partial_rotary_factor (GPT-J: config.rotary_dim).
    """
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = dict(getattr(config, "rope_parameters", None) or {})
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope_type = rope.get("rope_type", "default")
    if config.model_type == "gptj":
        return default_inv_freq(config.rotary_dim, theta), "gptj"
    partial = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    rotary_dim = int(head_dim * partial)
    if rope_type == "default":
        return default_inv_freq(rotary_dim, theta), "neox"
    if rope_type == "linear":
        return default_inv_freq(rotary_dim, theta) / rope["factor"], "neox"
    if rope_type == "dynamic":
        factor, max_pos = rope["factor"], config.max_position_embeddings
        max_trained = rope.get("max_trained_positions", max_pos)
        scaled = theta * (factor * max_pos / max_trained - (factor - 1)) ** (
            rotary_dim / (rotary_dim - 2))
        return default_inv_freq(rotary_dim, scaled), "neox"
    if rope_type in ("llama3", "yarn"):
        inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
        return inv_freq.to(torch.float64), "neox"
    raise NotImplementedError(f"oracle: rope_type={rope_type!r} is not written")


class Float64HFModel:
    """Any transformers causal LM in float64 with DESIGN §2 attention in every layer.

    The architecture (norms, MLP, biases, head layout, parallel residual) is transformers'
    own; only attention is replaced. The model runs with every position id 0, so its own
    RoPE turns nothing (cos 1, sin 0; a YaRN attention factor still scales q and k, as it
    does in vLLM) and the queries and keys reach the replacement unrotated; there
    `causal_lambda_attention` rotates them with `served_rope`, the table vLLM serves.
    """

    def __init__(self, model_dir):
        from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM

        self._attention_kwargs: dict = {}
        name = f"lminf_oracle_{id(self)}"
        AttentionInterface.register(name, self._attention)
        # GPT-J picks an attention class by implementation name: eager, then its _attn below
        if AutoConfig.from_pretrained(model_dir).model_type == "gptj":
            name = "eager"
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64,
                                                          attn_implementation=name)
        self.model.eval()
        self.inv_freq, self.style = served_rope(self.model.config)
        for module in self.model.modules():
            if type(module).__name__ == "GPTJAttention":  # GPT-J bypasses the interface
                module._attn = self._gptj_attention(module)

    def _lambda(self, query, key, value, scale):
        """query [1, H, T, D], key/value [1, Hkv, T, D] -> [1, T, H, D]."""
        heads_first = lambda x: x[0].transpose(0, 1)
        out = causal_lambda_attention(heads_first(query), heads_first(key), heads_first(value),
                                      inv_freq=self.inv_freq, style=self.style, scale=scale,
                                      **self._attention_kwargs)
        return out[None].to(query.dtype)

    def _attention(self, module, query, key, value, attention_mask, scaling=None,
                   dropout=0.0, **kwargs):
        return self._lambda(query, key, value, scaling), None

    def _gptj_attention(self, module):
        def attn(query, key, value, attention_mask=None):
            out = self._lambda(query, key, value, module.head_dim**-0.5)
            return out.transpose(1, 2), None
        return attn

    def prompt_logprobs(self, token_ids, *, mode: str, n_global: int, n_local: int, L: int,
                        B: int) -> np.ndarray:
        """log p(token[i+1] | token[0..i]) for i = 0..len-2, float64 [len - 1]; mode as in
        Float64Llama.prompt_logprobs."""
        if mode not in ("dense", "lminf"):
            raise ValueError(f"oracle: mode={mode!r} must be 'dense' or 'lminf'")
        self._attention_kwargs = dict(n_global=n_global, n_local=n_local, L=L, B=B,
                                      dense=mode == "dense")
        ids = torch.as_tensor(np.asarray(token_ids, dtype=np.int64))[None]
        with torch.no_grad():
            logits = self.model(input_ids=ids, position_ids=torch.zeros_like(ids)).logits[0]
        logprobs = torch.log_softmax(logits[:-1].double(), dim=-1)
        return logprobs.gather(1, ids[0, 1:, None])[:, 0].numpy()
