"""A native sinkserve cluster as a child process: ``scripts/cluster.sh`` (redis-server, N replicas, HAProxy).

``ClusterProcess(state_dir, replicas=3, tiny=True).start()`` runs the script on free loopback ports and
waits for its ``cluster: ready:`` line; ``kill_replica`` / ``hold_down`` / ``bring_back`` drive the
faults (the script restarts a replica that exits unless ``<state_dir>/<name>.down`` exists); ``stop()``
sends SIGTERM (the script stops HAProxy, the replicas, then Redis), ``kill()`` SIGKILLs the whole group.
Used by tests/cluster and scripts/bench_cluster.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from bench.serve_process import TINY_WINDOW, free_port

ROOT = Path(__file__).resolve().parents[1]


class ClusterProcess:
    def __init__(self, state_dir: Path, replicas: int = 2, tiny: bool = True, serve_args: tuple[str, ...] = (),
                 env: dict[str, str] | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.replicas = replicas
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        base = free_port()
        self.replica_ports = {f"replica{i + 1}": base + i for i in range(replicas)}
        self.redis_port = free_port()
        module = "bench.tiny_server" if tiny else "server.cli"
        extra = ("--window", TINY_WINDOW) if tiny else ()
        self.cmd = [str(ROOT / "scripts/cluster.sh"), "--replicas", str(replicas), "--port", str(self.port),
                    "--replica-base", str(base), "--redis-port", str(self.redis_port),
                    "--state-dir", str(self.state_dir), "--serve-cmd", f"{sys.executable} -m {module} serve",
                    "--", *extra, "--log-level", "warning", *serve_args]
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        if tiny:
            self.env.setdefault("OMP_NUM_THREADS", "1")
        self.proc: subprocess.Popen | None = None
        self.output: list[str] = []
        self._lock = threading.Lock()
        self._reader: threading.Thread | None = None

    def start(self, timeout: float = 600.0) -> ClusterProcess:
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=self.env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self._reader = threading.Thread(target=self._read, name="cluster-output", daemon=True)
        self._reader.start()
        if not self.wait_for("cluster: ready:", timeout):
            self.kill()
            raise RuntimeError("the cluster did not start:\n" + "".join(self.output))
        return self

    def wait_for(self, text: str, timeout: float) -> bool:
        """Wait until a line of the script's output contains ``text`` (True) or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if any(text in line for line in self.output):
                    return True
            if time.monotonic() >= deadline or (self._reader and not self._reader.is_alive()):
                with self._lock:
                    return any(text in line for line in self.output)
            time.sleep(0.05)

    def _read(self) -> None:
        for line in self.proc.stdout:  # a thread: select() would miss lines already in the file's buffer
            with self._lock:
                self.output.append(line)

    def pid(self, replica: str) -> int:
        return int((self.state_dir / f"{replica}.pid").read_text())

    def kill_replica(self, replica: str, sig: int = signal.SIGKILL) -> None:
        """Signal one replica (the script restarts it unless it is held down)."""
        os.kill(self.pid(replica), sig)

    def hold_down(self, replica: str) -> None:
        """Take a replica out: the script will not restart it until ``bring_back``."""
        (self.state_dir / f"{replica}.down").touch()
        self.kill_replica(replica, signal.SIGTERM)

    def bring_back(self, replica: str, timeout: float = 600.0) -> None:
        """Let the script restart a held-down replica; wait until it answers /health."""
        (self.state_dir / f"{replica}.down").unlink(missing_ok=True)
        self.wait_healthy(replica, timeout)

    def wait_healthy(self, replica: str, timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{self.replica_ports[replica]}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{replica} did not become healthy")

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM to the script: it stops everything it started; returns its exit status."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode if self.proc else 0

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def __enter__(self) -> ClusterProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        if self.stop() is None:
            self.kill()
