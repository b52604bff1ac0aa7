"""One ``sinkserve serve`` process on a free port of 127.0.0.1: the launcher of the benchmarks and the tests.

``ServerProcess(data_dir, *flags).start()`` runs ``python -m server.cli serve`` (or, ``tiny=True``,
``python -m bench.tiny_server serve``: the same command line around a tiny random model) with the
interpreter running this code, waits for ``GET /health`` to answer 200, and is stopped with
``stop()`` (SIGTERM: graceful shutdown, sessions persisted) or ``kill()`` (SIGKILL: nothing runs).
Only installed modules are used, so it works from a wheel as well as from a checkout.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

TINY_WINDOW = "100"  # the tiny model has 128 positions: sinks + window must fit


def free_port() -> int:
    """A TCP port of 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def process_memory_mb(pid: int) -> dict[str, float] | None:
    """A process's resident memory now and its peak so far (MB, from /proc; None where there is none)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    try:
        return {"rss": int(fields["VmRSS"].split()[0]) / 1024, "peak": int(fields["VmHWM"].split()[0]) / 1024}
    except (KeyError, ValueError):
        return None


class Launched:
    """A server process a benchmark started (``proc``): its memory, a graceful stop, a kill."""

    proc: subprocess.Popen | None = None

    def memory_mb(self) -> dict[str, float] | None:
        """Its resident memory now and its peak so far (MB, from /proc; None where there is none)."""
        return process_memory_mb(self.proc.pid) if self.proc else None

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (a graceful shutdown: sinkserve persists its sessions); SIGKILL if it has not exited after ``timeout``."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        """SIGKILL: no shutdown hook runs (crash tests)."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


class ServerProcess(Launched):
    """``sinkserve serve`` (``tiny``: around the tiny model) as a child process; a context manager too."""

    def __init__(self, data_dir: Path, *flags: str, tiny: bool = False, keys: list[str] | None = None,
                 env: dict[str, str] | None = None, log_path: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = Path(data_dir)
        self.tiny = tiny
        module = "bench.tiny_server" if tiny else "server.cli"
        extra = ["--window", TINY_WINDOW] if tiny else []  # later flags win: a caller's --window overrides
        self.cmd = [sys.executable, "-m", module, "serve", "--host", "127.0.0.1", "--port", str(self.port),
                    "--data-dir", str(data_dir), "--log-level", "warning", *extra, *flags]
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        if tiny:
            self.env.setdefault("OMP_NUM_THREADS", "1")
        if keys:
            self.env["SINKSERVE_API_KEYS"] = ",".join(keys)
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 300.0) -> ServerProcess:
        """Start the process and wait until ``/health`` answers 200 (RuntimeError if it exits or times out)."""
        self.proc = spawn(self.cmd, self.log_path, env=self.env)
        if wait_healthy(self.proc, self.url, timeout, "the server", self.log_path, poll_s=0.05):
            return self
        self.kill()
        raise RuntimeError("the server did not become healthy")

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def spawn(cmd: list[str], log_path: Path | None, env: dict | None = None, **popen) -> subprocess.Popen:
    """``cmd`` started with its output appended to ``log_path`` (discarded without one)."""
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 (the child owns it)
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, **popen)
    if log_path:
        out.close()  # the child holds its own descriptor
    return proc


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float, name: str, log_path: Path | None,
                 poll_s: float) -> bool:
    """Whether ``url``'s ``/health`` answered 200 within ``timeout`` s; RuntimeError if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode} while starting"
                               + (f" (log: {log_path})" if log_path else ""))
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        time.sleep(poll_s)
    return False
