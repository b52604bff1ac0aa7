"""Serving on CUDA: more concurrent sessions than cache rows (offloaded to host memory and disk, restored,
continued exactly as with rows to spare), and an HTTP smoke test through a real ``serve`` process: a
streamed chat, then a follow-up turn that continues the same session from its cache."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from engine import SamplingParams
from tests.engine.generation import reply as collect_reply
from tests.gpu.conftest import chat_engine, needs_gpu

pytestmark = needs_gpu
ROOT = Path(__file__).resolve().parents[2]
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


async def reply(engine, prompt, params=GREEDY, **kwargs):
    """(tokens, finish) of one generation that must run to ``max_tokens``."""
    tokens, finish, _ = await collect_reply(engine, prompt, params, **kwargs)
    assert finish.finish_reason == "length", finish
    return tokens, finish


def test_more_sessions_than_rows_offload_and_restore(dev, tmp_path):
    ample = chat_engine(tmp_path / "ample", dev)
    per_row = ample.scheduler.cache.bytes_per_row
    tight = chat_engine(tmp_path / "tight", dev, memory_budget_bytes=2 * per_row, host_budget_bytes=per_row)
    assert tight.scheduler.cache.rows == 2 and ample.scheduler.cache.rows > 8
    prompts = [tight.render_chat([{"role": "user", "content": f"topic {i} " * (3 + 5 * i)}])[0] for i in range(8)]

    async def run(eng):
        first = await asyncio.gather(*[reply(eng, p, session_id=f"s{i}") for i, p in enumerate(prompts)])
        follow = [p + t + eng.encode(" more")[1:] for p, (t, _) in zip(prompts, first, strict=True)]
        second = await asyncio.gather(*[reply(eng, f, session_id=f"s{i}") for i, f in enumerate(follow)])
        return first, second

    try:
        want_first, want_second = asyncio.run(run(ample))
        got_first, got_second = asyncio.run(run(tight))
        assert [t for t, _ in got_first] == [t for t, _ in want_first]
        assert [t for t, _ in got_second] == [t for t, _ in want_second], "a restored session continued differently"
        assert all(finish.usage.cached_tokens > 0 for _, finish in got_second)  # continued, not re-streamed
        assert tight.stats()["resident_cache_bytes"] <= 2 * per_row
        assert tight.scheduler.cache.k[0].device.type == dev.type
    finally:
        ample.stop()
        tight.stop()


def _serve(tmp_path: Path, dev: torch.device) -> tuple[subprocess.Popen, str]:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 (closed with the process)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.gpu.serve_tiny", "serve", "--host", "127.0.0.1", "--port", str(port),
         "--device", str(dev), "--data-dir", str(tmp_path / "sessions"), "--log-level", "info"],
        cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=log, stderr=subprocess.STDOUT,
    )
    return proc, f"http://127.0.0.1:{port}"


def test_http_streamed_chat_and_session_follow_up(dev, tmp_path):
    import httpx

    proc, url = _serve(tmp_path, dev)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "serve did not become healthy"
            time.sleep(0.2)
        ban_eos = {"0": -100, "1": -100, "2": -100}  # SmolLM2's special tokens: run to max_tokens
        messages = [{"role": "user", "content": "Tell me about lighthouses."}]
        body = {"model": "tiny-llama", "messages": messages, "max_tokens": 16, "stream": True,
                "stream_options": {"include_usage": True}, "logit_bias": ban_eos, "temperature": 0}
        text, usage = [], None
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
            assert response.status_code == 200, response.read()
            assert response.headers["content-type"].startswith("text/event-stream")
            session = response.headers["x-session-id"]
            lines = [line for line in response.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        for line in lines[:-1]:
            chunk = json.loads(line.removeprefix("data: "))
            for choice in chunk["choices"]:
                text.append(choice["delta"].get("content") or "")
            usage = chunk.get("usage") or usage
        assert usage["completion_tokens"] == 16 and "".join(text)
        follow = {"model": "tiny-llama", "max_tokens": 8, "logit_bias": ban_eos, "temperature": 0,
                  "messages": [*messages, {"role": "assistant", "content": "".join(text)},
                               {"role": "user", "content": "And who keeps them?"}]}
        again = httpx.post(f"{url}/v1/chat/completions", json=follow, headers={"X-Session-Id": session}, timeout=60)
        assert again.status_code == 200, again.text
        assert again.headers["x-session-id"] == session
        cached = again.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached >= usage["prompt_tokens"], (cached, usage)  # the first turn came from the cache
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    log = (tmp_path / "serve.log").read_text()
    assert f"on {dev}" in log, log[-2000:]  # the engine-ready line names the device it serves on
    assert proc.returncode == 0, log[-2000:]
