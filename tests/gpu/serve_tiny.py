"""``python -m tests.gpu.serve_tiny serve [serve flags]``: the real ``sinkserve serve`` (settings, uvicorn,
lifespan, routes) around a tiny random Llama over SmolLM2's tokenizer, placed on the configured device and
dtype as the loader would place the real model. For the CUDA suite's HTTP smoke test, on machines without
the embedded 538 MB model (``SINKSERVE_GPU_TOKENIZER`` names the tokenizer files, tests/gpu/conftest.py)."""

from __future__ import annotations

import sys

import server.app
from engine.engine import Engine
from engine.model.device import resolve_device, resolve_dtype
from engine.model.loader import DTYPES, prepare
from server.cli import main
from tests.gpu.conftest import chat_model, chat_tokenizer


def tiny_engine_factory(config, loaded=None) -> Engine:
    """Stands in for ``Engine`` in ``server.app``: same config, a tiny model on the configured device."""
    device = resolve_device(config.device)
    model = chat_model(max_positions=2048).to(device, DTYPES[resolve_dtype(config.dtype, device)])
    return Engine(config, prepare(model, chat_tokenizer(), "tiny-llama", config))


if __name__ == "__main__":
    server.app.Engine = tiny_engine_factory
    sys.exit(main(sys.argv[1:]))
