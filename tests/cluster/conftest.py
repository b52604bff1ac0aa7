"""Fixtures for the cluster tests: a real redis-server per test module."""

from __future__ import annotations

import pytest

from tests.cluster.redis_process import REDIS_SERVER, RedisProcess


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    if REDIS_SERVER is None:
        pytest.skip("redis-server not installed (apt-get install redis-server)")
    server = RedisProcess(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()
