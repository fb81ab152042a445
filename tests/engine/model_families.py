"""Small random-weight checkpoints of every RoPE family vLLM serves, made from configs.

Each family differs from Llama in a way that reaches attention or RoPE: qkv bias (Qwen2),
Mistral's config and model class, a head size decoupled from the hidden size (Gemma), fused
qkv and gate/up projections (Phi-3), partial rotary in rotate-half layout (StableLM), partial
interleaved rotary (GPT-J), and the scaled RoPE tables vLLM builds (linear, dynamic NTK,
YaRN, llama3). All share a trained length of TRAINED_LENGTH tokens, so the prompts of the
test reach ~4.7 L in a few hundred tokens. Weights are drawn with a larger spread than the
families' defaults so that attention is sharp: a wrong distance, mask or table then moves
log-probabilities far past the float32 tolerance (the test checks that it would).
"""

from dataclasses import dataclass, field
from pathlib import Path

import torch

TRAINED_LENGTH = 64
VOCAB_SIZE = 512
# Weight spread: logits of order 1-5 with hidden size 128.
INITIALIZER_RANGE = 0.1

_COMMON = dict(vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=256,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=TRAINED_LENGTH, initializer_range=INITIALIZER_RANGE,
               tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=1)


@dataclass(frozen=True)
class Family:
    """One row of the README support table."""

    name: str
    model_type: str            # transformers' config model_type
    rotary: str                # how the family's RoPE is laid out
    scaling: str               # the rope_type of its table
    config: dict = field(default_factory=dict)

    def trained_length(self) -> int:
        """L as a reader of the config would state it: the original length of a scaled
        table (llama3, YaRN), else max_position_embeddings."""
        rope = self.config.get("rope_parameters", {})
        return rope.get("original_max_position_embeddings",
                        self.config.get("max_position_embeddings", TRAINED_LENGTH))


def _scaled_llama(rope_type: str, **rope) -> Family:
    # Scaled models state the extended length; L is the original one.
    extended = dict(max_position_embeddings=4 * TRAINED_LENGTH) \
        if "original_max_position_embeddings" in rope else {}
    return Family(f"llama, {rope_type} RoPE", "llama", "rotate-half, full", rope_type,
                  dict(rope_parameters={"rope_type": rope_type, "rope_theta": 10000.0, **rope},
                       **extended))


FAMILIES = [
    Family("llama", "llama", "rotate-half, full", "default"),
    Family("qwen2 (qkv bias)", "qwen2", "rotate-half, full", "default",
           dict(use_sliding_window=False, rope_parameters={"rope_type": "default",
                                                           "rope_theta": 1_000_000.0})),
    Family("mistral", "mistral", "rotate-half, full", "default", dict(sliding_window=None)),
    Family("gemma (head 64 x 4 heads on hidden 128)", "gemma", "rotate-half, full",
           "default", dict(head_dim=64, hidden_activation="gelu_pytorch_tanh")),
    # Phi3Config defaults original_max_position_embeddings to 4,096; a model trained at L
    # states it, as the real Phi-3 configs do.
    Family("phi3 (fused qkv)", "phi3", "rotate-half, full", "default",
           dict(sliding_window=None, original_max_position_embeddings=TRAINED_LENGTH)),
    Family("stablelm (partial rotary 0.25)", "stablelm", "rotate-half, 8 of 32 dims",
           "default", dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                            "partial_rotary_factor": 0.25})),
    Family("gpt-j (partial rotary 16 of 32)", "gptj", "interleaved, 16 of 32 dims", "default",
           dict(n_embd=128, n_layer=2, n_head=4, n_positions=TRAINED_LENGTH, rotary_dim=16,
                n_inner=256)),
    _scaled_llama("linear", factor=2.0),
    _scaled_llama("dynamic", factor=2.0),
    _scaled_llama("yarn", factor=4.0, original_max_position_embeddings=TRAINED_LENGTH),
    _scaled_llama("llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
                  original_max_position_embeddings=TRAINED_LENGTH),
]


def make_checkpoint(family: Family, directory: Path, seed: int = 0) -> Path:
    """Save a random-weight model of the family (config + safetensors, no tokenizer)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = dict(_COMMON)
    if family.model_type == "gptj":  # GPT-J names its sizes its own way
        settings = {k: v for k, v in settings.items()
                    if k in ("vocab_size", "initializer_range", "tie_word_embeddings",
                             "bos_token_id", "eos_token_id", "pad_token_id")}
    settings.update(family.config)
    config = AutoConfig.for_model(family.model_type, **settings)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(directory)
    return directory
