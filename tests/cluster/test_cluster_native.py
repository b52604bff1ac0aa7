"""``scripts/cluster.sh`` (``./sinkserve.sh cluster``) end to end: redis-server, two tiny-model replicas
and HAProxy on loopback; requests route through HAProxy with affinity, a killed replica's conversations
move to the other one and it is restarted, SIGTERM stops everything."""

from __future__ import annotations

import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import httpx
import pytest

from tests.cluster.redis_process import free_port

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(
    shutil.which("haproxy") is None or shutil.which("redis-server") is None,
    reason="haproxy and redis-server not installed (apt-get install haproxy redis-server)",
)
BAN_SPECIAL = {"0": -100, "1": -100, "2": -100}  # SmolLM2's <|endoftext|>, <|im_start|>, <|im_end|>


class Cluster:
    def __init__(self, state_dir: Path, replicas: int = 2) -> None:
        self.port = free_port()
        self.state_dir = state_dir
        self.url = f"http://127.0.0.1:{self.port}"
        base = free_port()
        self.replica_ports = [base + i for i in range(replicas)]
        self.cmd = [str(ROOT / "scripts/cluster.sh"), "--replicas", str(replicas), "--port", str(self.port),
                    "--replica-base", str(base), "--redis-port", str(free_port()), "--state-dir", str(state_dir),
                    "--serve-cmd", f"{sys.executable} -m bench.tiny_server serve",
                    "--", "--window", "100", "--log-level", "warning"]
        self.proc: subprocess.Popen | None = None
        self.output: list[str] = []

    def start(self, timeout: float = 240.0) -> Cluster:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        if not self.wait_for("cluster: ready:", timeout):
            self.kill()
            raise RuntimeError("cluster did not start:\n" + "".join(self.output))
        return self

    def wait_for(self, text: str, timeout: float) -> bool:
        """Read the script's output until a line contains ``text``."""
        if any(text in line for line in self.output):
            return True
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sel.select(timeout=0.5):
                line = self.proc.stdout.readline()
                if not line:
                    return False
                self.output.append(line)
                if text in line:
                    return True
        return False

    def replica_pid(self, name: str) -> int:
        return int((self.state_dir / f"{name}.pid").read_text())

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("cluster")).start()
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
    os.kill(cluster.replica_pid(victim), signal.SIGKILL)
    for sid in by_replica[victim]:  # served at once by the survivor (HAProxy redispatches)
        r = chat(cluster, model, [{"role": "user", "content": "after the kill"}], headers={"X-Session-Id": sid})
        assert r.headers["x-sinkserve-replica"] == survivor
    assert cluster.wait_for(f"{victim} exited; restarting it", 10)
    port = cluster.replica_ports[int(victim[-1]) - 1]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    else:
        pytest.fail(f"{victim} was not restarted")
    time.sleep(5)  # two health checks: HAProxy marks it up again
    for sid in by_replica[victim]:  # stick table: moved conversations do not move back
        r = chat(cluster, model, [{"role": "user", "content": "after the restart"}], headers={"X-Session-Id": sid})
        assert r.headers["x-sinkserve-replica"] == survivor


def test_sigterm_stops_every_process(cluster):
    pids = [cluster.replica_pid(f"replica{i}") for i in (1, 2)]
    cluster.proc.send_signal(signal.SIGTERM)
    assert cluster.proc.wait(timeout=60) == 143
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    for port in (cluster.port, *cluster.replica_ports):
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still open"
