"""Which threads run PyTorch's OpenMP kernels: the engine's setup runs on a thread of its own that has ended
when ``Engine.start`` returns, so the worker is the only long-lived thread with an OpenMP team (see
``Engine.start``: with more OpenMP helper threads than CPUs, libgomp's teams sleep between kernels)."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest

from engine.config import EngineConfig
from engine.engine import Engine

ROOT = Path(__file__).resolve().parents[2]


def test_setup_runs_on_a_thread_that_has_ended(monkeypatch):
    seen = []

    def setup(self):
        seen.append(threading.current_thread())

    monkeypatch.setattr(Engine, "_start", setup)
    engine = Engine(EngineConfig())
    assert engine.start() is engine
    assert len(seen) == 1
    assert seen[0] is not threading.current_thread()
    assert not seen[0].is_alive()


def test_load_runs_on_a_thread_that_has_ended(monkeypatch):
    """Loading alone too (the benches load once and hand the model to each engine they start): the caller's
    thread must not keep an OpenMP team of its own beside the worker's."""
    from engine.model import loader
    seen = []

    def body(config, *options):
        seen.append(threading.current_thread())
        return "loaded"

    monkeypatch.setattr(loader, "_load", body)
    assert loader.load(EngineConfig()) == "loaded"
    assert len(seen) == 1 and seen[0] is not threading.current_thread() and not seen[0].is_alive()


def test_a_failed_setup_raises_in_the_caller(monkeypatch):
    def setup(self):
        raise RuntimeError("no model here")

    monkeypatch.setattr(Engine, "_start", setup)
    with pytest.raises(RuntimeError, match="no model here"):
        Engine(EngineConfig()).start()


# The embedded model started as the server starts it (from a thread that lives on: asyncio.to_thread's
# executor), then a greedy reply: the process's voluntary context switches per decode step. With a second
# OpenMP team alive (the setup's, on the starting thread) they were 240-280 a step on a 2-core host, one
# futex sleep and wake-up per kernel; with the worker's team alone, a few (the hand-off of each token).
SWITCHES = """
import asyncio, resource
from concurrent.futures import ThreadPoolExecutor
from engine.config import EngineConfig
from engine.engine import Engine
from engine.scheduling.sampling import SamplingParams

engine = Engine(EngineConfig(threads=2, data_dir={data_dir!r}))
starter = ThreadPoolExecutor(1)  # kept: its thread lives on, as the server's loader thread does
starter.submit(engine.start).result()
counters = engine.scheduler.counters

async def reply():
    generation = await engine.generate(engine.encode("Tell me a story."),
                                       SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True), api_key="t")
    async for _ in generation:
        pass

asyncio.run(reply())  # warm-up
switches, steps = resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw, counters["decode_steps"]
asyncio.run(reply())
print((resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw - switches) / (counters["decode_steps"] - steps))
engine.stop()
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="libgomp's teams: Linux")
def test_decode_steps_do_not_sleep_between_kernels(tmp_path):
    result = subprocess.run([sys.executable, "-c", SWITCHES.format(data_dir=str(tmp_path))], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    per_step = float(result.stdout.strip().splitlines()[-1])
    assert per_step < 40, f"{per_step:.0f} voluntary context switches a decode step"
