"""``sinkserve serve`` around a tiny random model: smoke runs of the load benchmark, process-level tests.

``python -m bench.tiny_server serve --port N --data-dir DIR [any serve flag]`` is exactly
``python -m server.cli serve ...`` (settings, uvicorn, lifespan, signal handling, shutdown), except that
the app's engine factory builds a tiny Llama (the embedded model's real tokenizer and chat template,
random weights, 128 positions) instead of loading the embedded model. Its answers are gibberish, fast.
Started through :class:`bench.serve_process.ServerProcess` with ``tiny=True``.
"""

from __future__ import annotations

import dataclasses
import sys

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from bench.load import BAN_SPECIAL  # noqa: F401 (the tests' and scripts' logit_bias against special tokens)
from engine.config import EngineConfig
from engine.engine import Engine
from engine.model.loader import load_tokenizer, prepare

MAX_POSITIONS = 128


def tiny_chat_model(tokenizer, max_positions: int = MAX_POSITIONS, seed: int = 0):
    """A random 2-layer Llama over ``tokenizer``'s vocabulary (the shapes of tests/tiny_models.py)."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                         tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def tiny_engine_factory(config: EngineConfig) -> Engine:
    """An engine factory for ``create_app``: the served config (window, data dir, ...), the tiny model."""
    config = dataclasses.replace(config, evict_block=min(8, config.window), prefill_chunk=32)
    if config.sink_tokens + config.window > MAX_POSITIONS:
        raise SystemExit(f"tiny server: sink_tokens + window must be <= {MAX_POSITIONS}")
    tokenizer = load_tokenizer(None, config.cache_dir)
    return Engine(config, prepare(tiny_chat_model(tokenizer), tokenizer, "tiny-llama", config))


if __name__ == "__main__":
    from server.cli import main

    sys.exit(main(sys.argv[1:], engine_factory=tiny_engine_factory))
