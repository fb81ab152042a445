"""Llama checkpoints with random weights, made from the tiny model's config with overrides."""

import json
import shutil

import torch
from safetensors.torch import save_file

from conftest import MODEL_DIR

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def random_llama(directory, seed=0, **config_overrides):
    """A Llama checkpoint with random weights in directory: config.json (the tiny model's,
    with config_overrides), its tokenizer, one float32 safetensors. Returns directory."""
    config = json.loads((MODEL_DIR / "config.json").read_text())
    config.update(config_overrides, dtype="float32")
    (directory / "config.json").write_text(json.dumps(config))
    for name in TOKENIZER_FILES:
        shutil.copy(MODEL_DIR / name, directory / name)
    generator = torch.Generator().manual_seed(seed)
    hidden, heads, kv_heads, head_dim, mlp = (config[k] for k in (
        "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
        "intermediate_size"))

    def weight(*shape):
        return torch.randn(*shape, generator=generator) / shape[-1] ** 0.5

    weights = {"model.embed_tokens.weight": weight(config["vocab_size"], hidden),
               "model.norm.weight": torch.ones(hidden)}
    for i in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{i}."
        weights.update({
            prefix + "input_layernorm.weight": torch.ones(hidden),
            prefix + "post_attention_layernorm.weight": torch.ones(hidden),
            prefix + "self_attn.q_proj.weight": weight(heads * head_dim, hidden),
            prefix + "self_attn.k_proj.weight": weight(kv_heads * head_dim, hidden),
            prefix + "self_attn.v_proj.weight": weight(kv_heads * head_dim, hidden),
            prefix + "self_attn.o_proj.weight": weight(hidden, heads * head_dim),
            prefix + "mlp.gate_proj.weight": weight(mlp, hidden),
            prefix + "mlp.up_proj.weight": weight(mlp, hidden),
            prefix + "mlp.down_proj.weight": weight(hidden, mlp),
        })
    save_file(weights, directory / "model.safetensors")
    return directory
