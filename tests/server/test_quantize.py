"""``serve --quantize int8`` answers chat requests (it once answered every request with a 500)."""

from __future__ import annotations

import httpx

from engine.config import EngineConfig
from engine.engine import Engine
from server.app import create_app
from server.settings import Settings
from tests.server.conftest import LiveServer
from tests.tiny_models import tiny_chat_engine_parts


def test_int8_chat_answers_200(tmp_path):
    model, tokenizer = tiny_chat_engine_parts()
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    config = EngineConfig(model=str(tmp_path / "tiny"), sink_tokens=4, window=60, evict_block=8, device="cpu",
                          dtype="float32", quantize="int8", data_dir=tmp_path / "sessions")
    engine = Engine(config).start()
    live = LiveServer(create_app(Settings(), engine=engine)).start()
    try:
        body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 5, "temperature": 0,
                "logit_bias": {str(t): -100 for t in engine.loaded.eos_token_ids}}
        reply = httpx.post(f"{live.url}/v1/chat/completions", json=body, timeout=60)
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] == 5
    finally:
        live.stop()
        engine.stop()
