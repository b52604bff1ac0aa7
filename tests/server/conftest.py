"""Fixtures: one tiny engine for the session, a real uvicorn server on 127.0.0.1, clients for it."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest
import uvicorn

from server.app import create_app
from server.settings import Settings
from tests.tiny_models import tiny_engine

KEY_A, KEY_B = "key-a", "key-b"


class LiveServer:
    """uvicorn in a background thread on a free port; ``stop()`` asks it to exit and joins it."""

    def __init__(self, app) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()


@pytest.fixture(scope="session")
def engine(tmp_path_factory):
    eng = tiny_engine(tmp_path_factory.mktemp("engine"))
    yield eng
    eng.stop()


@pytest.fixture(scope="session")
def eos_bias(engine) -> dict[str, float]:
    """A logit_bias that bans every end-of-sequence token, so generations run to max_tokens."""
    return {str(t): -100 for t in engine.loaded.eos_token_ids}


@pytest.fixture(scope="session")
def live(engine):
    """The shared server: authentication on with two keys, default limits."""
    server = LiveServer(create_app(Settings(api_keys=[KEY_A, KEY_B]), engine=engine)).start()
    yield server
    server.stop()


@pytest.fixture
def http(live):
    with httpx.Client(base_url=live.url, headers={"Authorization": f"Bearer {KEY_A}"}, timeout=60) as client:
        yield client


@pytest.fixture
def sdk(live):
    from openai import OpenAI

    return OpenAI(base_url=f"{live.url}/v1", api_key=KEY_A, max_retries=0)


@pytest.fixture
def async_sdk(live):
    from openai import AsyncOpenAI

    return AsyncOpenAI(base_url=f"{live.url}/v1", api_key=KEY_A, max_retries=0)


@pytest.fixture(scope="session")
def embedded_server(tmp_path_factory):
    """One real ``serve`` of the embedded model for the slow client tests (loading it takes ~45 s)."""
    from bench.serve_process import ServerProcess

    with ServerProcess(tmp_path_factory.mktemp("embedded")) as server:
        yield server


@pytest.fixture
def embedded_client(embedded_server):
    from openai import OpenAI

    return OpenAI(base_url=f"{embedded_server.url}/v1", api_key="unused", max_retries=0, timeout=300)
