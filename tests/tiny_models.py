"""Tiny random-initialised models of each supported family, built from a config in milliseconds."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    GemmaConfig,
    GptOssConfig,
    LlamaConfig,
    MistralConfig,
    OlmoConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

COMMON = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)

FAMILIES = {
    "llama": lambda: LlamaConfig(**COMMON),
    "mistral": lambda: MistralConfig(**COMMON, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**COMMON),
    "qwen3": lambda: Qwen3Config(**COMMON, head_dim=16),
    "phi3": lambda: Phi3Config(**COMMON, pad_token_id=0),
    "gemma": lambda: GemmaConfig(**COMMON, head_dim=16),
    # learned per-head attention sinks (gpt-oss): transformers' own eager attention keeps them
    "gpt_oss": lambda: GptOssConfig(
        **{**COMMON, "intermediate_size": 64}, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
        sliding_window=128, layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
}
EAGER_ONLY = {"gpt_oss"}

# variants of the families above whose owned steps need their own checks (tests/engine/test_families_owned.py)
VARIANTS = {
    # Llama 3.1's frequency-dependent RoPE scaling, its bands placed inside the tiny head's 8 frequencies
    "llama3": lambda: LlamaConfig(**COMMON, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    # Qwen2.5's layout (biased q/k/v, tied embeddings)
    "qwen2_5": lambda: Qwen2Config(**{**COMMON, "tie_word_embeddings": True}),
    # Phi-3.5 / Phi-4-mini: longrope (short factors within its original positions) over half of each head
    "phi3_longrope": lambda: Phi3Config(**COMMON, pad_token_id=0, original_max_position_embeddings=128,
                                        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                                         "partial_rotary_factor": 0.5,
                                                         "short_factor": [1.0, 1.5, 2.0, 4.0],
                                                         "long_factor": [2.0, 4.0, 8.0, 16.0]}),
    # a family no owned step covers: it decodes through transformers' forward
    "olmo": lambda: OlmoConfig(**COMMON),
}


def tiny_model(family: str = "llama", dtype: torch.dtype = torch.float32, seed: int = 0, attn: str = "sdpa"):
    """A random model of ``family``; weights scaled up so attention is far from uniform."""
    torch.manual_seed(seed)
    config = (FAMILIES | VARIANTS)[family]()
    config._attn_implementation = "eager" if family in EAGER_ONLY else attn
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("sinks"):
                p.normal_(0.0, 2.0)  # learned sinks that matter
            if "proj" in name and p.dim() == 2:
                p.mul_(4.0)
            elif "lm_head" in name:
                p.mul_(16.0)  # logits of order 10, so absolute tolerances mean something
    return model.eval()


def tiny_chat_engine_parts(max_positions: int = 128, seed: int = 0):
    """A tiny Llama with the embedded model's real tokenizer and chat template (vocab 49152)."""
    from engine.config import EngineConfig
    from engine.model.loader import load_tokenizer

    tokenizer = load_tokenizer(None, EngineConfig().cache_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(**{**COMMON, "vocab_size": len(tokenizer), "max_position_embeddings": max_positions})
    config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer


def tiny_engine(tmp_path, sink_tokens: int = 4, window: int = 60, max_positions: int = 128, **overrides):
    """A started Engine around a tiny model: fast enough for server and session tests."""
    from engine.config import EngineConfig
    from engine.engine import Engine
    from engine.model.loader import prepare

    model, tokenizer = tiny_chat_engine_parts(max_positions)
    config = EngineConfig(
        sink_tokens=sink_tokens, window=window, evict_block=8, prefill_chunk=32,
        data_dir=tmp_path / "sessions", **overrides,
    )
    return Engine(config, prepare(model, tokenizer, "tiny-llama", config)).start()


def tiny_chat_family_parts(family: str, max_positions: int = 128, seed: int = 0):
    """A tiny random model of ``family`` (``FAMILIES`` or ``VARIANTS``) over the embedded model's real
    tokenizer and chat template (vocab 49152)."""
    from engine.config import EngineConfig
    from engine.model.loader import load_tokenizer

    tokenizer = load_tokenizer(None, EngineConfig().cache_dir)
    torch.manual_seed(seed)
    config = (FAMILIES | VARIANTS)[family]()
    config.vocab_size, config.max_position_embeddings = len(tokenizer), max_positions
    config._attn_implementation = "eager" if family in EAGER_ONLY else "sdpa"
    model = AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer


def tiny_family_engine(tmp_path, family: str, sink_tokens: int = 4, window: int = 60, max_positions: int = 128,
                       **overrides):
    """A started Engine around a tiny model of ``family`` with the embedded tokenizer."""
    from engine.config import EngineConfig
    from engine.engine import Engine
    from engine.model.loader import prepare

    model, tokenizer = tiny_chat_family_parts(family, max_positions)
    config = EngineConfig(
        sink_tokens=sink_tokens, window=window, evict_block=8, prefill_chunk=32,
        data_dir=tmp_path / "sessions", **overrides,
    )
    return Engine(config, prepare(model, tokenizer, f"tiny-{family}", config)).start()
