"""Issue 15's acceptance on the native cluster (scripts/cluster.sh: redis-server, two replicas sharing one
data directory, HAProxy), end to end through HTTP.

A stateless conversation (resending its history) and a named one (``X-Session-Id``) talk through
HAProxy; each turn after the first reuses >= 90% of the previous prompt from the cache. The replica
serving the named one is SIGKILLed; its next turn is served by the other replica from the shared store
(>= 80% cached) with the same greedy reply as a reference run of the same conversation that no fault
touched (run first, under another API key so the two never share sessions). The killed replica
restarts: a turn sent to it loads the newer version (not its stale file), and the next turn sent back
to the other replica, whose copy is now the stale one, reloads too. Then Redis goes down: replicas keep
serving their local sessions and say so in /health and /metrics.

The tiny random model by default (about 30 s). The same run with the embedded model is marked slow and
adds a minute or more to tests/cluster on a small CPU (66 s on 2 cores), so it runs only when asked:
``SINKSERVE_CLUSTER_EMBEDDED=1 .venv/bin/python -m pytest tests/cluster/test_cluster_failover.py -k embedded``.
"""

from __future__ import annotations

import os
import shutil
import time

import httpx
import pytest
import redis

from bench.cluster_process import ClusterProcess

pytestmark = pytest.mark.skipif(
    shutil.which("haproxy") is None or shutil.which("redis-server") is None,
    reason="haproxy and redis-server not installed (apt-get install haproxy redis-server)",
)
BAN_SPECIAL = {"0": -100, "1": -100, "2": -100}  # SmolLM2's <|endoftext|>, <|im_start|>, <|im_end|>
KEYS = ("key-reference", "key-test")
TURNS_BEFORE_KILL = 6


EMBEDDED = pytest.mark.skipif(
    os.environ.get("SINKSERVE_CLUSTER_EMBEDDED") != "1",
    reason="the embedded-model cluster run takes a minute or more: SINKSERVE_CLUSTER_EMBEDDED=1 runs it",
)


@pytest.fixture(scope="module", params=[True, pytest.param(False, marks=[pytest.mark.slow, EMBEDDED])],
                ids=["tiny", "embedded"])
def cluster(request, tmp_path_factory):
    args = ["--graceful-timeout", "2", "--api-key", KEYS[0], "--api-key", KEYS[1]]
    if not request.param:
        args += ["--threads", "1"]  # two replicas on a small CPU
    c = ClusterProcess(tmp_path_factory.mktemp("failover"), replicas=2, tiny=request.param,
                       serve_args=tuple(args)).start(timeout=900)
    yield c
    c.kill()


class Conversation:
    def __init__(self, base_url: str, key: str, session_id: str | None, topic: str) -> None:
        self.base_url, self.key, self.session_id, self.topic = base_url, key, session_id, topic
        self.model = httpx.get(f"{base_url}/v1/models", headers={"Authorization": f"Bearer {key}"},
                               timeout=30).json()["data"][0]["id"]
        self.messages: list[dict] = []
        self.previous_prompt = 0

    def say(self, turn: int, url: str | None = None) -> dict:
        """One turn (through HAProxy unless ``url`` names a replica); the reply, usage and headers."""
        self.messages.append({"role": "user", "content": f"{self.topic}: question {turn}, and then?"})
        headers = {"Authorization": f"Bearer {self.key}"}
        if self.session_id:
            headers["X-Session-Id"] = self.session_id
        body = {"model": self.model, "messages": self.messages, "max_tokens": 8, "temperature": 0,
                "logit_bias": BAN_SPECIAL}
        response = httpx.post(f"{url or self.base_url}/v1/chat/completions", json=body, headers=headers, timeout=120)
        assert response.status_code == 200, response.text
        data = response.json()
        reply = data["choices"][0]["message"]["content"]
        self.messages.append({"role": "assistant", "content": reply})
        previous, self.previous_prompt = self.previous_prompt, data["usage"]["prompt_tokens"]
        return {"reply": reply, "cached": data["usage"]["prompt_tokens_details"]["cached_tokens"],
                "previous": previous, "replica": response.headers["x-sinkserve-replica"],
                "source": response.headers.get("x-sinkserve-session-source"), "turn": turn}


def conversations(cluster, key: str) -> dict[str, Conversation]:
    return {"stateless": Conversation(cluster.url, key, None, "stateless lighthouses"),
            "named": Conversation(cluster.url, key, f"named-{key}", "named lighthouses")}


def replica_url(cluster, name: str) -> str:
    return f"http://127.0.0.1:{cluster.replica_ports[name]}"


def test_failover_resumes_from_the_shared_store(cluster):
    # the reference: both conversations, every turn, no fault
    reference = conversations(cluster, KEYS[0])
    expected = {kind: [conv.say(turn)["reply"] for turn in range(1, TURNS_BEFORE_KILL + 4)]
                for kind, conv in reference.items()}

    test = conversations(cluster, KEYS[1])
    served: dict[str, list[dict]] = {kind: [] for kind in test}
    for turn in range(1, TURNS_BEFORE_KILL + 1):
        for kind, conv in test.items():
            served[kind].append(conv.say(turn))
    for kind, turns in served.items():
        assert len({t["replica"] for t in turns}) == 1, (kind, turns)  # affinity
        for t in turns:
            assert t["reply"] == expected[kind][t["turn"] - 1], (kind, t)
        for t in turns[1:]:
            assert t["cached"] >= 0.9 * t["previous"], (kind, t)
            assert t["source"] == "local", (kind, t)

    # SIGKILL the replica serving the named conversation; its next turn goes through HAProxy elsewhere
    named = test["named"]
    victim = served["named"][-1]["replica"]
    survivor = next(name for name in cluster.replica_ports if name != victim)
    cluster.kill_replica(victim)
    turn = TURNS_BEFORE_KILL + 1
    moved = named.say(turn)
    assert moved["replica"] == survivor, moved
    assert moved["source"] == "shared", moved
    assert moved["cached"] >= 0.8 * moved["previous"], moved
    assert moved["reply"] == expected["named"][turn - 1], moved

    # the victim restarts; sent to it, the conversation loads the newer version, not its stale file
    assert cluster.wait_for(f"{victim} exited; restarting it", 10), "".join(cluster.output)
    cluster.wait_healthy(victim, timeout=600)
    back = named.say(turn + 1, url=replica_url(cluster, victim))
    assert back["replica"] == victim and back["source"] == "shared", back
    assert back["cached"] >= 0.8 * back["previous"], back
    assert back["reply"] == expected["named"][turn], back
    # now the survivor's copy is the stale one: it reloads as well
    again = named.say(turn + 2, url=replica_url(cluster, survivor))
    assert again["replica"] == survivor and again["source"] == "shared", again
    assert again["reply"] == expected["named"][turn + 1], again
    # the stateless conversation answers as without the fault, from a cache wherever it is served (if it
    # was on the victim too, its next turn resumed from the shared store)
    last = served["stateless"][-1]["replica"]
    for t in range(turn, turn + 3):
        result = test["stateless"].say(t)
        assert result["reply"] == expected["stateless"][t - 1], result
        assert result["cached"] >= 0.8 * result["previous"], result
        assert result["source"] == ("local" if result["replica"] == last else "shared"), (last, result)
        last = result["replica"]


def test_redis_down_replicas_serve_local_sessions_and_say_so(cluster):
    conv = Conversation(cluster.url, KEYS[1], "redis-down", "redis down")
    first = conv.say(1)
    redis.Redis(port=cluster.redis_port).shutdown(nosave=True)
    deadline = time.monotonic() + 10
    for name in cluster.replica_ports:
        while True:
            health = httpx.get(f"{replica_url(cluster, name)}/health", timeout=5)
            assert health.status_code == 200, health.text
            if health.json().get("session_store") == "down" or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert health.json()["session_store"] == "down", health.text
        metrics = httpx.get(f"{replica_url(cluster, name)}/metrics", timeout=5).text
        assert "sinkserve_session_store_up 0.0" in metrics
    second = conv.say(2)
    assert second["replica"] == first["replica"] and second["source"] == "local", second
    assert second["cached"] >= 0.9 * second["previous"], second
    metrics = httpx.get(f"{replica_url(cluster, second['replica'])}/metrics", timeout=5).text
    assert 'sinkserve_session_requests_total{source="local"}' in metrics
