"""Run the real ``sinkserve serve`` command line around a tiny random model, for process-level tests.

``python -m tests.server.launcher serve --port N --data-dir DIR [any serve flag]`` is exactly
``python -m server.cli serve ...`` (settings, uvicorn, lifespan, signal handling, shutdown), except that
the engine the app's lifespan builds gets a tiny Llama (real SmolLM2 tokenizer, random weights) instead
of loading the embedded model. Used by the shutdown and crash-safety tests and scripts/crash_loop.py.
"""

from __future__ import annotations

import dataclasses
import sys

import server.app
from engine.engine import Engine
from engine.loader import prepare
from server.cli import main
from tests.tiny_models import tiny_chat_engine_parts

MAX_POSITIONS = 128


def tiny_engine_factory(config, loaded=None) -> Engine:
    """Stands in for ``Engine`` in ``server.app``: same config (window, data dir, ...), tiny model."""
    config = dataclasses.replace(config, evict_block=min(8, config.window), prefill_chunk=32)
    if config.sink_tokens + config.window > MAX_POSITIONS:
        raise SystemExit(f"tiny launcher: sink_tokens + window must be <= {MAX_POSITIONS}")
    model, tokenizer = tiny_chat_engine_parts(MAX_POSITIONS)
    return Engine(config, prepare(model, tokenizer, "tiny-llama", config))


if __name__ == "__main__":
    server.app.Engine = tiny_engine_factory
    sys.exit(main(sys.argv[1:]))
