"""What a client sees: decode speed and time to first token through the OpenAI-compatible HTTP API, and the
aggregate throughput of concurrent streaming clients, optionally against another OpenAI-compatible server.

Every request is a streamed ``POST /v1/chat/completions`` (httpx, as the ``openai`` SDK sends it) of a short
chat prompt, distinct per request (``[round.clients.i]`` and a line of the shipped text), greedy
(``temperature`` 0), ``max_tokens`` (128) tokens, no other field, so any OpenAI-compatible server takes it.
Measured per request: time to first token (TTFT: request sent to first content chunk) and the decode rate
between the first and the last content chunk (``(chunks - 1) / (last - first)``; every server compared
here streams one chunk per token). Per client count ``c`` (1, 2, 4, 8, 16), ``c`` clients send at once:
aggregate tokens/s = all content chunks over the wall time from the first request to the last finish
(prefill included), plus the mean per-stream decode rate and TTFT. The single-stream figures are those of
``c = 1``.

``other_url`` (``--other-url``): the same requests against another server (e.g. ``python -m
llama_cpp.server --model X.gguf --n_threads 2``, see docs/performance.md), the targets interleaved within each
round (their order alternating from round to round) so a slow spell of a shared machine does not land on
one of them; medians over the rounds are reported, and the ratios sinkserve / other. Without ``url``,
``sinkserve serve`` is started on a free port of 127.0.0.1 (:class:`bench.serve_process.ServerProcess`,
default settings).

Report (``api.json``): per target and client count the medians and every round; ``ratios``; with a
server started here, its resident memory after the rounds and its peak (``targets.sinkserve.memory_mb``).
A target that exposes sinkserve's decode counters on ``/metrics`` also gets, per client count, what its
decode steps took meanwhile as the server counts them (``server_step_ms``, ``server_forward_ms``,
``server_rows_per_step``): next to the client's gap between tokens, where that gap goes.
"""

from __future__ import annotations

import asyncio
import logging
import random
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from bench.common import DEFAULT_TEXT, markdown_table, metric_value, sse_chunks, write_report
from bench.serve_process import ServerProcess

log = logging.getLogger(__name__)

CLIENTS = (1, 2, 4, 8, 16)
QUICK_CLIENTS = (1, 4)
METRICS = ("aggregate_tokens_per_s", "stream_decode_tokens_per_s", "ttft_ms")
SERVER_METRICS = ("server_step_ms", "server_forward_ms", "server_rows_per_step")  # sinkserve only


def _prompts(seed: int = 0):
    lines = [line.strip() for line in DEFAULT_TEXT.read_text(encoding="utf-8").splitlines() if len(line.strip()) > 30]
    random.Random(seed).shuffle(lines)
    for index in range(10**9):
        yield f"Continue this passage with a long story of your own: {lines[index % len(lines)]}"


async def _model_id(client: httpx.AsyncClient, url: str) -> str | None:
    """The first model the server lists (llama.cpp's server names its model file), None if it lists none."""
    try:
        response = await client.get(f"{url}/v1/models", timeout=30)
        data = response.json().get("data") or []
        return data[0]["id"] if data else None
    except (httpx.HTTPError, ValueError, KeyError):
        return None


async def stream_once(client: httpx.AsyncClient, url: str, model: str | None, prompt: str, max_tokens: int) -> dict:
    """One streamed chat completion; its timings (seconds, ``perf_counter``) and content chunk count."""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0.0,
            "stream": True}
    if model:
        body["model"] = model
    start = time.perf_counter()
    stamps: list[float] = []
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{url} answered {response.status_code}: {(await response.aread())[:300]!r}")
        async for chunk in sse_chunks(response):
            if "error" in chunk:
                raise RuntimeError(f"{url} streamed an error: {chunk['error']}")
            if any((c.get("delta") or {}).get("content") for c in chunk.get("choices") or []):
                stamps.append(time.perf_counter())
    end = time.perf_counter()
    return {"start": start, "end": end, "chunks": len(stamps), "first": stamps[0] if stamps else None,
            "last": stamps[-1] if stamps else None,
            "decode_tokens_per_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 2 else None}


DECODE_COUNTERS = ("decode_steps", "decode_rows", "decode_forward_seconds", "decode_seconds")


async def decode_counters(client: httpx.AsyncClient, url: str) -> dict[str, float] | None:
    """sinkserve's decode-step counters from ``/metrics`` (None for a server without them)."""
    try:
        text = (await client.get(f"{url}/metrics", timeout=30)).text
    except httpx.HTTPError:
        return None
    found = {key: metric_value(text, f"sinkserve_{key}_total") for key in DECODE_COUNTERS}
    return found if None not in found.values() else None


def server_step(before: dict | None, after: dict | None) -> dict:
    """What the server's decode steps took between two readings of its counters: ms per step (the whole
    step, and its forward pass) and rows per step; empty when the server has no such counters."""
    if not before or not after or after["decode_steps"] <= before["decode_steps"]:
        return {}
    steps = after["decode_steps"] - before["decode_steps"]
    return {"server_step_ms": 1e3 * (after["decode_seconds"] - before["decode_seconds"]) / steps,
            "server_forward_ms": 1e3 * (after["decode_forward_seconds"] - before["decode_forward_seconds"]) / steps,
            "server_rows_per_step": (after["decode_rows"] - before["decode_rows"]) / steps}


async def clients_at_once(client: httpx.AsyncClient, url: str, model: str | None, prompts, count: int,
                          max_tokens: int) -> dict:
    """``count`` streaming clients at once: aggregate tokens/s, mean per-stream decode rate and TTFT (and,
    from a sinkserve server, its decode steps meanwhile: :func:`server_step`)."""
    before = await decode_counters(client, url)
    runs = await asyncio.gather(*(stream_once(client, url, model, next(prompts), max_tokens) for _ in range(count)))
    after = await decode_counters(client, url) if before else None
    begin, end = min(r["start"] for r in runs), max(r["end"] for r in runs)
    rates = [r["decode_tokens_per_s"] for r in runs if r["decode_tokens_per_s"]]
    ttfts = [r["first"] - r["start"] for r in runs if r["first"] is not None]
    return {"chunks": sum(r["chunks"] for r in runs), "wall_s": end - begin,
            "aggregate_tokens_per_s": sum(r["chunks"] for r in runs) / (end - begin),
            "stream_decode_tokens_per_s": statistics.fmean(rates) if rates else None,
            "ttft_ms": 1e3 * statistics.fmean(ttfts) if ttfts else None, **server_step(before, after)}


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


async def measure_api_async(targets: dict[str, str], *, clients=CLIENTS, rounds: int = 3,
                            max_tokens: int = 128) -> dict:
    """Run the workload against each of ``targets`` (name -> base URL), interleaved, ``rounds`` times."""
    clients = sorted(set(int(c) for c in clients))
    prompts = _prompts()
    limits = httpx.Limits(max_connections=max(clients) * 2 + 4, max_keepalive_connections=max(clients) * 2 + 4)
    measured = {name: {c: [] for c in clients} for name in targets}
    started = time.perf_counter()
    async with httpx.AsyncClient(limits=limits) as client:
        models = {name: await _model_id(client, url) for name, url in targets.items()}
        for name, url in targets.items():  # warm-up: first requests load kernels and caches
            await stream_once(client, url, models[name], next(prompts), 8)
        for index in range(rounds):
            order = list(targets) if index % 2 == 0 else list(reversed(targets))
            for name in order:
                for count in clients:
                    result = await clients_at_once(client, targets[name], models[name], prompts, count, max_tokens)
                    measured[name][count].append(result)
                    log.info("round %d, %s, %2d clients: %.1f tokens/s aggregate, %.1f tokens/s a stream, TTFT %.0f ms",
                             index + 1, name, count, result["aggregate_tokens_per_s"],
                             result["stream_decode_tokens_per_s"] or float("nan"), result["ttft_ms"] or float("nan"))
    results = {name: [{"clients": c, **{m: _median([r.get(m) for r in runs]) for m in METRICS + SERVER_METRICS},
                       "per_round": runs}
                      for c, runs in by_count.items()] for name, by_count in measured.items()}
    report = {
        "suite": "api",
        "targets": {name: {"url": url, "model": models[name]} for name, url in targets.items()},
        "settings": {"clients": clients, "rounds": rounds, "max_tokens": max_tokens, "temperature": 0.0},
        "results": results,
        "seconds": time.perf_counter() - started,
        "notes": ["Medians over the rounds (targets interleaved, order alternating). Single stream = 1 client: "
                  "decode tokens/s between its first and last content chunk, TTFT from request to first chunk. "
                  "Aggregate tokens/s: all content chunks over the wall time of the c clients (prefill included)."],
    }
    names = list(targets)
    if len(names) == 2:
        ours, other = names

        def at(name: str, count: int, metric: str):
            return next((r[metric] for r in results[name] if r["clients"] == count), None)

        report["ratios"] = {f"{metric} at {c}": _ratio(at(ours, c, metric), at(other, c, metric))
                            for c in clients for metric in METRICS}
    return report


def _ratio(a, b):
    return a / b if a is not None and b else None


def table(report: dict) -> str:
    rows = []
    for name, results in report["results"].items():
        for r in results:
            rows.append([name, r["clients"], r["stream_decode_tokens_per_s"], r["ttft_ms"], r["aggregate_tokens_per_s"]])
    text = markdown_table(["server", "clients", "decode tokens/s a stream", "TTFT ms", "aggregate tokens/s"], rows)
    steps = [[name, r["clients"], 1e3 / r["stream_decode_tokens_per_s"] if r["stream_decode_tokens_per_s"] else None,
              r["server_step_ms"], r["server_forward_ms"], r["server_rows_per_step"]]
             for name, results in report["results"].items() for r in results if r.get("server_step_ms")]
    if steps:  # where a client's gap between tokens goes, as the server counts its decode steps
        text += "\n" + markdown_table(["server", "clients", "client gap ms", "server step ms", "forward ms",
                                       "rows a step"], steps)
    if report.get("ratios"):
        ours, other = list(report["results"])
        ratios = [[c, report["ratios"][f"stream_decode_tokens_per_s at {c}"], report["ratios"][f"ttft_ms at {c}"],
                   report["ratios"][f"aggregate_tokens_per_s at {c}"]] for c in report["settings"]["clients"]]
        text += "\n" + markdown_table([f"{ours} / {other}: clients", "decode a stream", "TTFT",
                                       "aggregate tokens/s"], ratios)
    memory = report.get("targets", {}).get("sinkserve", {}).get("memory_mb")
    if memory:
        text += f"\nsinkserve's resident memory after the rounds: {memory['rss']:.0f} MB (peak {memory['peak']:.0f} MB)\n"
    return text


def run_api(out_dir, *, url: str | None = None, other_url: str | None = None, quick: bool = False,
            clients=None, rounds: int | None = None, max_tokens: int | None = None, tiny: bool = False,
            serve_flags: list[str] | None = None, serve_env: dict[str, str] | None = None) -> dict:
    """Measure ``url`` (or a ``sinkserve serve`` started here) and ``other_url``; write OUT/api.json/.md."""
    logging.getLogger("httpx").setLevel(logging.WARNING)
    clients = clients or (QUICK_CLIENTS if quick else CLIENTS)
    rounds = rounds or (1 if quick else 3)
    max_tokens = max_tokens or (32 if quick else 128)

    def measure(sinkserve_url: str) -> dict:
        targets = {"sinkserve": sinkserve_url.rstrip("/")}
        if other_url:
            targets["other"] = other_url.rstrip("/")
        return asyncio.run(measure_api_async(targets, clients=clients, rounds=rounds, max_tokens=max_tokens))

    if url is not None:
        report = measure(url)
    else:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="sinkserve-api-") as data_dir, \
                ServerProcess(Path(data_dir), *(serve_flags or []), tiny=tiny, env=serve_env,
                              log_path=out / "api-server.log") as server:
            report = measure(server.url)
            # what the server holds after every round (its sessions included), and its peak (at start-up)
            report["targets"]["sinkserve"]["memory_mb"] = server.memory_mb()
        report["targets"]["sinkserve"]["started"] = "bench.tiny_server (tiny random model)" if tiny else "sinkserve serve"
    report["files"] = write_report(out_dir, "api", report, table(report), None)
    return report
