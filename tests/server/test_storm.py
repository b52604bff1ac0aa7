"""Disconnect storm: 200 streaming clients that drop at random points leave no work, busy session or leak."""

from __future__ import annotations

import asyncio
import random
import time

import httpx
import pytest

from server.app import create_app
from server.settings import Settings
from tests.server.conftest import LiveServer
from tests.tiny_models import tiny_engine

CLIENTS = 200
PARALLEL = 40  # client-side concurrency; the server's limits are set above it


def rss_kib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@pytest.fixture(scope="module")
def storm_server(tmp_path_factory):
    engine = tiny_engine(tmp_path_factory.mktemp("storm"), threads=1, max_queue=1024, max_resident_sessions=16)
    settings = Settings(max_concurrent_per_key=CLIENTS, max_tokens_cap=64)
    server = LiveServer(create_app(settings, engine=engine)).start()
    yield server, engine
    server.stop()
    engine.stop()


async def one_client(client: httpx.AsyncClient, rng: random.Random, ban: dict, gate: asyncio.Semaphore) -> str:
    body = {"messages": [{"role": "user", "content": f"storm {rng.random()}"}], "max_tokens": 64,
            "stream": True, "logit_bias": ban}
    drop_after = rng.choice([0, 0, 1, 2, 3, 5, 8, None])  # data lines before leaving; None: read to the end
    async with gate:
        try:
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    return f"status {response.status_code}"
                if drop_after == 0:
                    return "dropped"
                seen = 0
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        seen += 1
                        if drop_after is not None and seen >= drop_after:
                            return "dropped"
                return "finished"
        except httpx.TransportError as exc:
            return f"transport {type(exc).__name__}"


async def storm(url: str, ban: dict) -> list[str]:
    rng = random.Random(1234)
    gate = asyncio.Semaphore(PARALLEL)
    limits = httpx.Limits(max_connections=PARALLEL, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        return await asyncio.gather(*(one_client(client, rng, ban, gate) for _ in range(CLIENTS)))


def test_disconnect_storm(storm_server):
    server, engine = storm_server
    ban = {str(t): -100 for t in engine.loaded.eos_token_ids}
    with httpx.Client(base_url=server.url, timeout=30) as http:  # warm up, then the baseline
        assert http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                       "max_tokens": 2}).status_code == 200
    before = rss_kib()
    started = time.monotonic()
    outcomes = asyncio.run(storm(server.url, ban))
    storm_s = time.monotonic() - started
    assert len(outcomes) == CLIENTS
    unexpected = [o for o in outcomes if o not in ("dropped", "finished")]
    assert not unexpected, unexpected[:5]
    assert outcomes.count("dropped") > CLIENTS // 2

    # within a second of the last client leaving, the engine goes quiet
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline and (engine.stats()["running"] or engine.stats()["waiting"]):
        time.sleep(0.02)
    stats = engine.stats()
    assert stats["running"] == 0 and stats["waiting"] == 0, stats
    generated = stats["generated_tokens"]
    time.sleep(0.3)
    assert engine.stats()["generated_tokens"] == generated, "tokens are still being generated"
    busy = [s.id for s in list(engine.scheduler.store.sessions.values()) if s.busy]
    assert not busy, busy
    assert not server.server.config.app.state.limiter.active, "concurrency slots were not released"

    with httpx.Client(base_url=server.url, timeout=30) as http:
        response = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "after"}],
                                                           "max_tokens": 2})
        assert response.status_code == 200 and response.json()["choices"][0]["finish_reason"]
    grown_mib = (rss_kib() - before) / 1024
    assert grown_mib < 150, f"RSS grew by {grown_mib:.0f} MiB during the storm ({storm_s:.1f} s)"
