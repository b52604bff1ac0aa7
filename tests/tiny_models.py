"""Tiny random-initialised models of each supported family, built from a config in milliseconds."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    GptOssConfig,
    LlamaConfig,
    MistralConfig,
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

GEMMA3_ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
               "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0}}

FAMILIES = {
    "llama": lambda: LlamaConfig(**COMMON),
    "mistral": lambda: MistralConfig(**COMMON, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**COMMON),
    "qwen3": lambda: Qwen3Config(**COMMON, head_dim=16),
    "phi3": lambda: Phi3Config(**COMMON, pad_token_id=0),
    "gemma": lambda: GemmaConfig(**COMMON, head_dim=16),
    # hybrid attention: sliding layers of 32 interleaved with full ones; soft-capped attention and logits
    # (Gemma 2), per-head q/k norms and a local RoPE base for the sliding layers (Gemma 3)
    "gemma2": lambda: Gemma2Config(
        **{**COMMON, "num_hidden_layers": 3}, head_dim=16, sliding_window=32, query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        attn_logit_softcapping=8.0, final_logit_softcapping=12.0,
    ),
    "gemma3": lambda: Gemma3TextConfig(
        **{**COMMON, "num_hidden_layers": 3}, head_dim=16, sliding_window=32, query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], final_logit_softcapping=12.0,
        rope_parameters=GEMMA3_ROPE,
    ),
    # sliding layers only: streamed through the sink cache it must equal the model's own forward over the
    # whole text (each layer sees the last 32 tokens, which the cache's window holds)
    "gemma3_sliding": lambda: Gemma3TextConfig(
        **COMMON, head_dim=16, sliding_window=32, query_pre_attn_scalar=24,
        layer_types=["sliding_attention"] * 2, rope_parameters=GEMMA3_ROPE,
    ),
    # learned per-head attention sinks (gpt-oss): transformers' own eager attention keeps them
    "gpt_oss": lambda: GptOssConfig(
        **{**COMMON, "intermediate_size": 64}, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
        sliding_window=128, layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
    # gpt-oss with sliding layers of 32 interleaved with a full one
    "gpt_oss_sliding": lambda: GptOssConfig(
        **{**COMMON, "intermediate_size": 64, "num_hidden_layers": 3}, head_dim=16, num_local_experts=4,
        num_experts_per_tok=2, sliding_window=32,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
}
EAGER_ONLY = {"gpt_oss", "gpt_oss_sliding", "gemma2"}  # soft-capping and learned sinks: eager attention only


def tiny_model(family: str = "llama", dtype: torch.dtype = torch.float32, seed: int = 0, attn: str = "sdpa"):
    """A random model of ``family``; weights scaled up so attention is far from uniform."""
    torch.manual_seed(seed)
    config = FAMILIES[family]()
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


def tiny_family_engine(tmp_path, family: str, sink_tokens: int = 4, window: int = 60, seed: int = 0,
                       **overrides):
    """A started Engine around a tiny random model of ``family`` (tests/tiny_models.py ``FAMILIES``) with the
    embedded model's real tokenizer and chat template."""
    from engine.config import EngineConfig
    from engine.engine import Engine
    from engine.model.loader import load_tokenizer, prepare

    engine_config = EngineConfig(sink_tokens=sink_tokens, window=window, evict_block=8, prefill_chunk=32,
                                 data_dir=tmp_path / "sessions", **overrides)
    tokenizer = load_tokenizer(None, engine_config.cache_dir)
    torch.manual_seed(seed)
    config = FAMILIES[family]()
    config.vocab_size = len(tokenizer)
    config._attn_implementation = "eager" if family in EAGER_ONLY else "sdpa"
    model = AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return Engine(engine_config, prepare(model, tokenizer, f"tiny-{family}", engine_config)).start()


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
