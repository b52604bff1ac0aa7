"""Shared helpers of the benchmark suites: history tokens, timers, memory readings and report files.

Nothing here measures by itself; the suites (``decode``, ``followup``, ``concurrency``, ``memory``,
``llamacpp``) compare sinkserve with the baselines of StreamingLLM (arXiv 2309.17453, section 4.5: dense
attention and the sliding window with re-computation).
"""

from __future__ import annotations

import json
import logging
import platform
import resource
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import torch

from engine.config import EngineConfig
from engine.evaluate.ppl import DEFAULT_TEXT, encode_text
from engine.model.loader import LoadedModel, load

log = logging.getLogger(__name__)



# ----- inputs --------------------------------------------------------------------------------------------
def history_ids(tokenizer, tokens: int, offset: int = 0) -> list[int]:
    """``tokens`` token ids of the shipped text, starting ``offset`` tokens in, repeated if it runs out."""
    base = _text_ids(tokenizer, tokens + offset)
    if not base:
        raise ValueError("the benchmark text encodes to no tokens")
    out: list[int] = []
    start = offset % len(base)
    while len(out) < tokens:
        out.extend(base[start:])
        start = 0
    return out[:tokens]


_TEXT_CACHE: dict[int, tuple[int, list[int]]] = {}  # id(tokenizer) -> (characters encoded, ids)


def _text_ids(tokenizer, tokens: int) -> list[int]:
    """At least ``tokens`` ids of the text (all of it if it has fewer), encoding only the prefix needed."""
    text = DEFAULT_TEXT.read_text(encoding="utf-8")
    chars, ids = _TEXT_CACHE.get(id(tokenizer), (0, []))
    if len(ids) >= tokens + 16 or chars >= len(text):
        return ids
    chars = max(chars * 2, tokens * 5 + 256)
    while True:
        ids = encode_text(tokenizer, text[:chars])
        if chars >= len(text) or len(ids) >= tokens + 16:
            break
        chars *= 2
    if chars < len(text):
        ids = ids[:-8]  # the cut may have split a word: drop the last tokens
    _TEXT_CACHE[id(tokenizer)] = (min(chars, len(text)), ids)
    return ids


def engine_config(args_or_none=None, **overrides) -> EngineConfig:
    """The engine configuration of a benchmark run (model, device, dtype, threads from the CLI)."""
    fields = {}
    if args_or_none is not None:
        for name in ("model", "device", "dtype", "threads", "quantize", "compile"):
            value = getattr(args_or_none, name, None)
            if value is not None:
                fields[name] = value
    fields.update(overrides)
    return EngineConfig(**fields)


def load_model(config: EngineConfig) -> LoadedModel:
    if config.threads:
        torch.set_num_threads(config.threads)
    started = time.perf_counter()
    loaded = load(config)
    log.info("loaded %s on %s (%s) in %.1f s, %d torch threads", loaded.name, loaded.device, config.dtype,
             time.perf_counter() - started, torch.get_num_threads())
    return loaded


# ----- clocks and memory ---------------------------------------------------------------------------------
def sync(device: torch.device | str) -> None:
    """Wait for queued GPU work so wall-clock timings mean something (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """``with Timer(device) as t: ...`` then ``t.seconds`` (synchronising the device at both ends)."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = device
        self.seconds = 0.0

    def __enter__(self) -> Timer:
        sync(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        sync(self.device)
        self.seconds = time.perf_counter() - self._start


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if platform.system() == "Darwin" else peak * 1024)


def current_rss_bytes() -> int:
    """The process's resident set size now (``VmRSS`` of /proc/self/status), or 0 where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def available_memory_bytes() -> int | None:
    """``MemAvailable`` of /proc/meminfo, or None where there is none."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def environment(loaded: LoadedModel | None, config: EngineConfig | None) -> dict:
    """What the numbers were taken on: model, device, dtype, threads, torch version, CPU/GPU name."""
    device = loaded.device if loaded is not None else torch.device("cpu")
    env = {
        "model": loaded.name if loaded is not None else None,
        "device": str(device),
        "dtype": str(loaded.dtype).removeprefix("torch.") if loaded is not None else None,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    if config is not None:
        env["sink_tokens"], env["window"] = config.sink_tokens, config.window
        env["quantize"], env["compile"] = config.quantize, config.compile
    if loaded is not None:
        env["quantize_in_effect"] = loaded.quantize
    return env


# ----- reports -------------------------------------------------------------------------------------------
def metric_value(text: str, name: str) -> float | None:
    """The value of the first sample of metric ``name`` in a Prometheus text exposition (``/metrics``), None
    if it is absent or not a number."""
    for line in text.splitlines():
        if line.startswith(name) and (len(line) == len(name) or line[len(name)] in " {"):
            try:
                return float(line.rsplit(" ", 1)[1])
            except ValueError:
                return None
    return None


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    def cell(value) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_report(out_dir: str | Path, suite: str, report: dict, table: str,
                 plot: Callable[[dict, Path], None] | None) -> dict:
    """Write ``<suite>.json``, ``<suite>.md`` and (with ``plot``) ``<suite>.png``; return the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{suite}.json", "md": out / f"{suite}.md"}
    paths["json"].write_text(json.dumps(report, indent=2, default=str) + "\n")
    notes = report.get("notes") or []
    paths["md"].write_text(f"# {suite}\n\n" + table + "".join(f"\n- {n}" for n in notes) + ("\n" if notes else ""))
    if plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        paths["png"] = out / f"{suite}.png"
        plot(report, paths["png"])
    log.info("%s benchmark written to %s\n%s", suite, out, table)
    return {k: str(v) for k, v in paths.items()}


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, ax, path) -> None:
    """The common finish of a single-axis benchmark plot: legend, grid, write, close."""
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


async def sse_chunks(response) -> AsyncIterator[dict]:
    """The JSON chunks of an OpenAI server-sent event stream (an ``httpx`` streaming response), up to
    ``[DONE]``; comment and ping lines are skipped, malformed JSON raises ``json.JSONDecodeError``."""
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)
