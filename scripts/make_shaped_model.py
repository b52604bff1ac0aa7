"""A random-weight model with a real family's shapes, written as a Hugging Face directory: for timing a
family's decode step (``sinkserve bench decode --model DIR``) without downloading its weights.

``python scripts/make_shaped_model.py qwen3-0.6b OUT`` builds Qwen3-0.6B's architecture from a transformers
config (hidden 1024, 28 layers, 16 query and 8 key/value heads of 128, MLP 3072, tied embeddings, its RoPE
base and norm epsilon) at run time, with the embedded model's tokenizer and chat template (so its
vocabulary, 49,152 entries, is the tokenizer's rather than Qwen's 151,936), random weights, and saves it
with that tokenizer into ``OUT``. ``llama-3.2-1b`` gives Llama-3.2-1B's shapes (with its ``llama3`` RoPE
scaling). ``--layers N`` keeps only N layers (smoke runs). The answers are gibberish; the cost per token
is the real shapes' (but for the smaller vocabulary's output projection).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

log = logging.getLogger("make_shaped_model")

SHAPES = {
    # Qwen/Qwen3-0.6B's config.json
    "qwen3-0.6b": lambda: Qwen3Config(
        hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
        intermediate_size=3072, tie_word_embeddings=True, max_position_embeddings=40960, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, hidden_act="silu",
    ),
    # meta-llama/Llama-3.2-1B's config.json
    "llama-3.2-1b": lambda: LlamaConfig(
        hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
        intermediate_size=8192, tie_word_embeddings=True, max_position_embeddings=131072, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        hidden_act="silu",
    ),
}


def make_shaped_model(shape: str, out: Path, layers: int | None = None, seed: int = 0,
                      dtype: torch.dtype = torch.float32) -> Path:
    """Write a random model of ``shape`` (a key of ``SHAPES``) with the embedded tokenizer into ``out``."""
    from engine.config import EngineConfig
    from engine.model.loader import load_tokenizer

    tokenizer = load_tokenizer(None, EngineConfig().cache_dir)
    config = SHAPES[shape]()
    config.vocab_size = len(tokenizer)
    if layers is not None:
        config.num_hidden_layers = layers
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:layers]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    log.info("wrote %s: %s shapes, %d layers, %.0fM parameters, vocab %d", out, shape, config.num_hidden_layers,
             params / 1e6, config.vocab_size)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("out", type=Path, help="the folder to write the model into")
    parser.add_argument("--layers", type=int, default=None, help="keep only this many layers")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    make_shaped_model(args.shape, args.out, layers=args.layers, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
