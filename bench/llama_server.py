"""llama.cpp's own ``llama-server`` as a child process on a free port of 127.0.0.1: the reference of ``bench api``.

``LlamaServer(binary, gguf, parallel=16, slot_tokens=8192, threads=2).start()`` runs

    llama-server -m GGUF --host 127.0.0.1 --port PORT -np PARALLEL -cb -c PARALLEL*SLOT_TOKENS -t THREADS
                 -tb THREADS [extra flags]

waits until ``GET /health`` answers 200 (it answers 503 while the model loads) and is stopped with
``stop()`` (SIGTERM, then SIGKILL). ``-np`` slots decode together (continuous batching, ``-cb``); each
slot holds ``-c / -np`` positions (the KV cache is split per slot unless ``-kvu`` is among the extra
flags), so ``slot_tokens`` must hold the longest conversation plus its reply: :func:`slot_tokens_for`.
Every slot keeps its last prompt (``cache_prompt``, on by default) and a request goes to the idle slot
whose prompt it shares most with, so a client that resends its history reuses the slot's cache; the
server reports how many prompt tokens it reused (``timings.cache_n`` and
``usage.prompt_tokens_details.cached_tokens`` of the last streamed chunk).

The binary is built from the llama.cpp vendored in the ``llama-cpp-python`` sdist:
``scripts/build_llama_server.sh``.
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

from bench.serve_process import Launched, free_port, spawn, wait_healthy

log = logging.getLogger(__name__)

SLOT_MARGIN = 256  # positions a slot keeps beyond the longest prompt and its reply (chat template, turns)


def slot_tokens_for(longest_prompt: int, max_tokens: int, *, minimum: int = 2048) -> int:
    """Positions a slot needs for a ``longest_prompt``-token prompt and ``max_tokens`` of reply, rounded
    up to a multiple of 1,024."""
    need = max(minimum, longest_prompt + max_tokens + SLOT_MARGIN)
    return -(-need // 1024) * 1024


def llama_server_args(binary: str | Path, gguf: str | Path, *, port: int, parallel: int, slot_tokens: int,
                      threads: int, extra: list[str] | None = None) -> list[str]:
    """The command line of a ``llama-server`` with ``parallel`` continuously batched slots of
    ``slot_tokens`` positions each, ``threads`` threads for decode and prompt batches, on 127.0.0.1."""
    if parallel < 1 or slot_tokens < 1 or threads < 1:
        raise ValueError("parallel, slot_tokens and threads must be positive")
    return [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
            "-np", str(parallel), "-cb", "-c", str(parallel * slot_tokens),
            "-t", str(threads), "-tb", str(threads), *(extra or [])]


def llama_server_version(binary: str | Path) -> str | None:
    """What ``llama-server --version`` says (its build number and commit), None if it says nothing."""
    try:
        done = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = [line.strip() for line in (done.stdout + done.stderr).splitlines() if line.strip().startswith("version")]
    return lines[0] if lines else None


class LlamaServer(Launched):
    """``llama-server`` as a child process (see the module docstring); a context manager too."""

    def __init__(self, binary: str | Path, gguf: str | Path, *, parallel: int, slot_tokens: int, threads: int,
                 extra: list[str] | None = None, log_path: Path | None = None) -> None:
        self.binary = Path(binary)
        if not self.binary.is_file():
            raise FileNotFoundError(f"no llama-server binary at {self.binary} (scripts/build_llama_server.sh)")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.parallel, self.slot_tokens, self.threads = parallel, slot_tokens, threads
        self.cmd = llama_server_args(self.binary, gguf, port=self.port, parallel=parallel, slot_tokens=slot_tokens,
                                     threads=threads, extra=extra)
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 300.0) -> LlamaServer:
        """Start the process and wait until ``/health`` answers 200 (RuntimeError if it exits or times out)."""
        log.info("starting %s", " ".join(self.cmd))
        self.proc = spawn(self.cmd, self.log_path, stdin=subprocess.DEVNULL)
        if wait_healthy(self.proc, self.url, timeout, "llama-server", self.log_path, poll_s=0.1):
            return self
        self.stop()
        raise RuntimeError(f"llama-server did not become healthy in {timeout:.0f} s")


    def __enter__(self) -> LlamaServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
