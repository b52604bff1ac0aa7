"""``scripts/cluster.sh`` (``./sinkserve.sh cluster``) end to end: redis-server, two tiny-model replicas
and HAProxy on loopback; requests route through HAProxy with affinity, a killed replica's conversations
move to the other one and it is restarted, SIGTERM stops everything."""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections import defaultdict

import httpx
import pytest

from bench.cluster_process import ClusterProcess

pytestmark = pytest.mark.skipif(
    shutil.which("haproxy") is None or shutil.which("redis-server") is None,
    reason="haproxy and redis-server not installed (apt-get install haproxy redis-server)",
)
BAN_SPECIAL = {"0": -100, "1": -100, "2": -100}  # SmolLM2's <|endoftext|>, <|im_start|>, <|im_end|>


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = ClusterProcess(tmp_path_factory.mktemp("cluster"), replicas=2, tiny=True,
                       serve_args=("--graceful-timeout", "2")).start(timeout=240)
    yield c
    c.kill()


@pytest.fixture(scope="module")
def model(cluster) -> str:
    return httpx.get(f"{cluster.url}/v1/models", timeout=30).json()["data"][0]["id"]


def chat(cluster, model, messages, headers=None, max_tokens=2) -> httpx.Response:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "logit_bias": BAN_SPECIAL}
    response = httpx.post(f"{cluster.url}/v1/chat/completions", json=body, headers=headers or {}, timeout=60)
    assert response.status_code == 200, response.text
    return response


def test_session_id_always_lands_on_one_replica(cluster, model):
    seen = defaultdict(set)
    for round_ in range(2):
        for i in range(12):
            sid = f"conv-{i}"
            r = chat(cluster, model, [{"role": "user", "content": f"turn {round_} of {i}"}],
                     headers={"X-Session-Id": sid})
            seen[sid].add(r.headers["x-sinkserve-replica"])
    assert all(len(replicas) == 1 for replicas in seen.values()), seen
    assert set().union(*seen.values()) == {"replica1", "replica2"}  # 12 keys hash onto both replicas


def test_stateless_history_keeps_its_replica(cluster, model):
    """A stateless client resends the history; the first user message after the system prompt routes it."""
    placed = defaultdict(set)
    for i in range(8):
        history = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": f"topic {i}"}]
        for turn in range(3):
            r = chat(cluster, model, history)
            placed[i].add(r.headers["x-sinkserve-replica"])
            history += [{"role": "assistant", "content": r.json()["choices"][0]["message"]["content"]},
                        {"role": "user", "content": f"and then {turn}?"}]
    assert all(len(replicas) == 1 for replicas in placed.values()), placed
    assert len(set().union(*placed.values())) == 2


def test_returned_session_id_stays_on_the_replica_that_created_it(cluster, model):
    for i in range(6):
        first = chat(cluster, model, [{"role": "user", "content": f"start {i}"}])
        again = chat(cluster, model, [{"role": "user", "content": "next"}],
                     headers={"X-Session-Id": first.headers["x-session-id"]})
        assert again.headers["x-sinkserve-replica"] == first.headers["x-sinkserve-replica"]


def test_killed_replica_moves_its_conversations_and_is_restarted(cluster, model):
    by_replica = defaultdict(list)
    for i in range(8):
        sid = f"kill-{i}"
        by_replica[chat(cluster, model, [{"role": "user", "content": "x"}],
                        headers={"X-Session-Id": sid}).headers["x-sinkserve-replica"]].append(sid)
    victim = "replica1" if by_replica["replica1"] else "replica2"
    survivor = "replica2" if victim == "replica1" else "replica1"
    cluster.kill_replica(victim)
    for sid in by_replica[victim]:  # served at once by the survivor (HAProxy redispatches)
        r = chat(cluster, model, [{"role": "user", "content": "after the kill"}], headers={"X-Session-Id": sid})
        assert r.headers["x-sinkserve-replica"] == survivor
    assert cluster.wait_for(f"{victim} exited; restarting it", 10), "".join(cluster.output)
    cluster.wait_healthy(victim, timeout=120)
    time.sleep(5)  # two health checks: HAProxy marks it up again
    for sid in by_replica[victim]:  # stick table: moved conversations do not move back
        r = chat(cluster, model, [{"role": "user", "content": "after the restart"}], headers={"X-Session-Id": sid})
        assert r.headers["x-sinkserve-replica"] == survivor


def test_sigterm_stops_every_process(cluster):
    pids = [cluster.pid(name) for name in cluster.replica_ports]
    assert cluster.stop() == 143
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    for port in (cluster.port, *cluster.replica_ports.values()):
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still open"
