"""What a client sees: decode speed, aggregate throughput of concurrent streaming clients and time to first
token through the OpenAI-compatible HTTP API, against llama.cpp's own ``llama-server`` and any other
OpenAI-compatible server.

Every request is a streamed ``POST /v1/chat/completions`` (httpx, as the ``openai`` SDK sends it), greedy
(``temperature`` 0), ``max_tokens`` (128) tokens, so any OpenAI-compatible server takes it; every user
message it sends first opens with a nonce (``[3f9c0a1b2d4e]``), so no earlier request's cache helps a
fresh prompt on either side. Measured per request: time to first token (TTFT: request sent to first
content chunk) and the decode rate between the first and the last content chunk (``(chunks - 1) / (last -
first)``; every server compared here streams one chunk per token). The items of a round:

- clients: per client count ``c`` (1, 2, 4, 8, 16; with ``llama-server`` 1, 8, 16), ``c`` clients send a
  short prompt each at once: aggregate tokens/s = all content chunks over the wall time from the first
  request to the last finish (prefill included), plus the mean per-stream decode rate and TTFT. The
  single-stream figures are those of ``c = 1``.
- ``fresh N``: TTFT of one fresh prompt of ~N tokens (2,000 and 6,000) of the shipped text.
- ``follow-up N``: a ~N-token (6,000) conversation of :data:`CONVERSATION_TURNS` user turns of the shipped
  text, each sent with the whole history so far (stateless resend, as chat clients do; the replies are the
  server's own, :data:`REPLY_TOKENS` tokens), then a short question: its TTFT, with what the server says
  it reused (``usage.prompt_tokens_details.cached_tokens``; ``llama-server`` also ``timings.cache_n``).
  sinkserve finds the conversation's session by token prefix; ``llama-server`` reuses the prompt its slot
  kept from the previous turn.

Targets: sinkserve (``url``, or without it ``sinkserve serve`` started on a free port of 127.0.0.1 by
:class:`bench.serve_process.ServerProcess`, default settings); ``llama-server`` (``llama_server``:
its binary, started here by :class:`bench.llama_server.LlamaServer` on the same GGUF with ``-np`` the
largest client count, ``-cb``, slots that hold the longest prompt, the same threads); ``other``
(``other_url``, e.g. ``python -m llama_cpp.server --model X.gguf --n_threads 2``). Each item runs on
every target in turn, their order alternating from round to round, so a slow spell of a shared machine
does not land on one of them; medians over the rounds are reported.

Report (``api.json``, ``api.md``): per target the medians and every round; ``ratios`` sinkserve / the
reference (``llama-server`` if started, else ``other``) and ``ratios_by_target`` for each other target
(TTFT ratios below 1: sinkserve answers sooner); the machine (CPU model, its avx2 / avx512f / avx512_bf16
/ amx flags, cores, threads) and the date; the resident memory of the servers started here after the
rounds and their peak (``targets.<name>.memory_mb``). A target that exposes sinkserve's decode counters
on ``/metrics`` also gets, per client count, what its decode steps took meanwhile as the server counts
them (``server_step_ms``, ``server_forward_ms``, ``server_rows_per_step``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import platform
import random
import secrets
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from bench.common import DEFAULT_TEXT, history_ids, markdown_table, metric_value, sse_chunks, write_report
from bench.serve_process import ServerProcess

log = logging.getLogger(__name__)

CLIENTS = (1, 2, 4, 8, 16)
QUICK_CLIENTS = (1, 4)
LLAMA_SERVER_CLIENTS = (1, 8, 16)  # the comparison with llama-server -np 16 -cb
TTFT_TOKENS = (2000, 6000)
QUICK_TTFT_TOKENS = (500,)
CONVERSATION_TOKENS = 6000
QUICK_CONVERSATION_TOKENS = 1500
CONVERSATION_TURNS = 3
REPLY_TOKENS = 16  # each earlier turn's reply
QUESTION = "Now summarise, in two short sentences, what happened in the text above and who spoke last?"
METRICS = ("aggregate_tokens_per_s", "stream_decode_tokens_per_s", "ttft_ms")
SERVER_METRICS = ("server_step_ms", "server_forward_ms", "server_rows_per_step")  # sinkserve only
TTFT_FIELDS = ("ttft_ms", "prompt_tokens", "cached_tokens", "history_prompt_tokens", "server_cache_n",
               "server_prompt_ms", "decode_tokens_per_s")
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile")
LLAMA_SERVER = "llama-server"


def nonce() -> str:
    """A fresh tag that opens a user message, so no server has its prompt cached."""
    return f"[{secrets.token_hex(6)}]"


def _prompts(seed: int = 0):
    lines = [line.strip() for line in DEFAULT_TEXT.read_text(encoding="utf-8").splitlines() if len(line.strip()) > 30]
    random.Random(seed).shuffle(lines)
    for index in range(10**9):
        yield f"{nonce()} Continue this passage with a long story of your own: {lines[index % len(lines)]}"


class PromptText:
    """User messages of a given size in tokens, cut from the shipped text (each call further into it)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.offset = 0

    def text(self, tokens: int) -> str:
        ids = history_ids(self.tokenizer, tokens, offset=self.offset)
        self.offset += tokens
        return self.tokenizer.decode(ids)

    def conversation(self, tokens: int, turns: int = CONVERSATION_TURNS) -> list[str]:
        """``turns`` user messages of ~``tokens`` tokens in all, consecutive stretches of the text."""
        if turns < 1 or tokens < turns:
            raise ValueError("a conversation needs at least one turn and a token a turn")
        return [self.text(tokens // turns + (1 if i < tokens % turns else 0)) for i in range(turns)]


def with_nonce(turns: list[str]) -> list[str]:
    """The user turns of a conversation (or a single prompt), the first opening with a fresh nonce."""
    return [f"{nonce()} {turns[0]}", *turns[1:]]


async def _model_id(client: httpx.AsyncClient, url: str) -> str | None:
    """The first model the server lists (llama.cpp's server names its model file), None if it lists none."""
    try:
        response = await client.get(f"{url}/v1/models", timeout=30)
        data = response.json().get("data") or []
        return data[0]["id"] if data else None
    except (httpx.HTTPError, ValueError, KeyError):
        return None


def _body(messages: list[dict], model: str | None, max_tokens: int, usage: bool) -> dict:
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0.0, "stream": True}
    if usage:
        body["stream_options"] = {"include_usage": True}
    if model:
        body["model"] = model
    return body


async def stream_once(client: httpx.AsyncClient, url: str, model: str | None, prompt: str | list[dict],
                      max_tokens: int, *, usage: bool = False) -> dict:
    """One streamed chat completion of ``prompt`` (a user message, or the messages); its timings (seconds,
    ``perf_counter``), content chunk count and text, and (``usage``: asked for) the server's usage and
    ``timings`` of its last chunk."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    start = time.perf_counter()
    stamps: list[float] = []
    text: list[str] = []
    extra: dict = {}
    async with client.stream("POST", f"{url}/v1/chat/completions", json=_body(messages, model, max_tokens, usage),
                             timeout=900) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{url} answered {response.status_code}: {(await response.aread())[:300]!r}")
        async for chunk in sse_chunks(response):
            if "error" in chunk:
                raise RuntimeError(f"{url} streamed an error: {chunk['error']}")
            content = "".join((c.get("delta") or {}).get("content") or "" for c in chunk.get("choices") or [])
            if content:
                stamps.append(time.perf_counter())
                text.append(content)
            for key in ("usage", "timings"):
                if chunk.get(key):
                    extra[key] = chunk[key]
    end = time.perf_counter()
    return {"start": start, "end": end, "chunks": len(stamps), "first": stamps[0] if stamps else None,
            "last": stamps[-1] if stamps else None, "text": "".join(text), **extra,
            "decode_tokens_per_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 2 else None}


async def supports_usage(client: httpx.AsyncClient, url: str, model: str | None) -> bool:
    """Whether the server takes ``stream_options.include_usage`` (a warm-up request either way)."""
    try:
        await stream_once(client, url, model, f"{nonce()} Say hello.", 8, usage=True)
        return True
    except RuntimeError as exc:
        if " answered 4" not in str(exc):
            raise
        log.info("%s refuses stream_options (%s); its prompts' cached tokens are not recorded", url, exc)
        await stream_once(client, url, model, f"{nonce()} Say hello.", 8)
        return False


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


def ttft_row(run: dict) -> dict:
    """The TTFT item's record of one streamed request: TTFT, prompt and reused tokens as the server says."""
    usage, timings = run.get("usage") or {}, run.get("timings") or {}
    return {"ttft_ms": 1e3 * (run["first"] - run["start"]) if run["first"] is not None else None,
            "prompt_tokens": usage.get("prompt_tokens"),
            "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens"),
            "server_cache_n": timings.get("cache_n"), "server_prompt_ms": timings.get("prompt_ms"),
            "chunks": run["chunks"], "decode_tokens_per_s": run["decode_tokens_per_s"]}


async def followup_turn(client: httpx.AsyncClient, url: str, model: str | None, turns: list[str], max_tokens: int,
                        *, usage: bool, reply_tokens: int = REPLY_TOKENS, question: str = QUESTION) -> dict:
    """Send the conversation's user ``turns`` one by one, each with the whole history so far and the
    server's own replies, then ``question``: the follow-up's :func:`ttft_row`, and the history's size."""
    messages: list[dict] = []
    history = None
    for content in turns:
        messages.append({"role": "user", "content": content})
        history = await stream_once(client, url, model, messages, reply_tokens, usage=usage)
        messages.append({"role": "assistant", "content": history["text"]})
    messages.append({"role": "user", "content": question})
    row = ttft_row(await stream_once(client, url, model, messages, max_tokens, usage=usage))
    row["history_prompt_tokens"] = (history.get("usage") or {}).get("prompt_tokens") if history else None
    return row


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _ratio(a, b):
    return a / b if a is not None and b else None


def ttft_items(ttft_tokens, conversation_tokens: int) -> list[tuple[str, str, int]]:
    """The TTFT items of a round: (name, kind, tokens), fresh prompts first."""
    items = [(f"fresh {n}", "fresh", n) for n in ttft_tokens]
    if conversation_tokens:
        items.append((f"follow-up {conversation_tokens}", "follow-up", conversation_tokens))
    return items


def ratios(report: dict, ours: str, other: str) -> dict:
    """``ours`` / ``other`` for every metric at every client count and every TTFT item."""
    def at(name: str, count: int, metric: str):
        return next((r[metric] for r in report["results"][name] if r["clients"] == count), None)

    out = {f"{metric} at {c}": _ratio(at(ours, c, metric), at(other, c, metric))
           for c in report["settings"]["clients"] for metric in METRICS}
    for item, by_target in report.get("ttft", {}).items():
        out[f"ttft_ms {item}"] = _ratio((by_target.get(ours) or {}).get("ttft_ms"),
                                        (by_target.get(other) or {}).get("ttft_ms"))
    return out


async def ttft_item(client: httpx.AsyncClient, url: str, model: str | None, kind: str, body: list[str],
                    max_tokens: int, usage: bool) -> dict:
    """One TTFT item on one target: a fresh prompt (``body[0]``) or a conversation's follow-up (``body``:
    its user turns), the first user message opening with a nonce of its own."""
    content = with_nonce(body)
    if kind == "fresh":
        return ttft_row(await stream_once(client, url, model, content[0], max_tokens, usage=usage))
    return await followup_turn(client, url, model, content, max_tokens, usage=usage)


async def measure_api_async(targets: dict[str, str], *, clients=CLIENTS, rounds: int = 3, max_tokens: int = 128,
                            ttft_tokens=(), conversation_tokens: int = 0, tokenizer=None,
                            reference: str | None = None) -> dict:
    """Run the workload against each of ``targets`` (name -> base URL; sinkserve first), every item on each
    target in turn, ``rounds`` times; ``ttft_tokens`` / ``conversation_tokens`` need ``tokenizer``."""
    clients = sorted(set(int(c) for c in clients))
    items = ttft_items(ttft_tokens, conversation_tokens)
    if items and tokenizer is None:
        raise ValueError("the TTFT items need a tokenizer to size their prompts")
    text = PromptText(tokenizer) if items else None
    prompts = _prompts()
    limits = httpx.Limits(max_connections=max(clients) * 2 + 4, max_keepalive_connections=max(clients) * 2 + 4)
    measured = {name: {c: [] for c in clients} for name in targets}
    timed = {item: {name: [] for name in targets} for item, _, _ in items}
    started = time.perf_counter()
    async with httpx.AsyncClient(limits=limits) as client:
        models = {name: await _model_id(client, url) for name, url in targets.items()}
        # warm-up (first requests load kernels and caches), and whether the server reports usage when streaming
        usage = {name: await supports_usage(client, url, models[name]) for name, url in targets.items()}
        for index in range(rounds):
            order = list(targets) if index % 2 == 0 else list(reversed(targets))
            for count in clients:
                for name in order:
                    result = await clients_at_once(client, targets[name], models[name], prompts, count, max_tokens)
                    measured[name][count].append(result)
                    log.info("round %d, %s, %2d clients: %.1f tokens/s aggregate, %.1f tokens/s a stream, TTFT %.0f ms",
                             index + 1, name, count, result["aggregate_tokens_per_s"],
                             result["stream_decode_tokens_per_s"] or float("nan"), result["ttft_ms"] or float("nan"))
            for item, kind, tokens in items:
                body = [text.text(tokens)] if kind == "fresh" else text.conversation(tokens)
                for name in order:  # the same text on every target
                    row = await ttft_item(client, targets[name], models[name], kind, body, max_tokens, usage[name])
                    timed[item][name].append(row)
                    log.info("round %d, %s, %s: TTFT %.0f ms, %s of %s prompt tokens cached", index + 1, name, item,
                             row["ttft_ms"] or float("nan"), row["cached_tokens"], row["prompt_tokens"])
    report = {
        "suite": "api",
        "targets": {name: {"url": url, "model": models[name], "usage": usage[name]} for name, url in targets.items()},
        "settings": {"clients": clients, "rounds": rounds, "max_tokens": max_tokens, "temperature": 0.0,
                     "ttft_tokens": list(ttft_tokens), "conversation_tokens": conversation_tokens,
                     "conversation_turns": CONVERSATION_TURNS, "reply_tokens": REPLY_TOKENS},
        **summarise(measured, timed),
        "seconds": time.perf_counter() - started,
        "notes": NOTES,
    }
    names = list(targets)
    if len(names) > 1:
        reference = reference if reference in names[1:] else names[1]
        report["reference"] = reference
        report["ratios"] = ratios(report, names[0], reference)
        report["ratios_by_target"] = {other: ratios(report, names[0], other) for other in names[1:]}
    return report


NOTES = ["Medians over the rounds (every item on each target in turn, order alternating). Single stream = 1 "
         "client: decode tokens/s between its first and last content chunk, TTFT from request to first chunk. "
         "Aggregate tokens/s: all content chunks over the wall time of the c clients (prefill included).",
         "TTFT items: user messages open with a nonce, so no earlier request's cache helps. A follow-up resends "
         f"its conversation ({CONVERSATION_TURNS} user turns with the server's own {REPLY_TOKENS}-token replies) "
         "and a short question; cached = prompt tokens the server says it reused (llama-server: its slot's "
         "prompt cache; sinkserve: the session found by token prefix, of which it keeps the sinks and the "
         "window)."]


def summarise(measured: dict, timed: dict) -> dict:
    """The report's ``results`` (per target and client count) and ``ttft`` (per item and target): medians
    over the rounds, and every round."""
    results = {name: [{"clients": c, **{m: _median([r.get(m) for r in runs]) for m in METRICS + SERVER_METRICS},
                       "per_round": runs}
                      for c, runs in by_count.items()] for name, by_count in measured.items()}
    ttft = {item: {name: {**{f: _median([r.get(f) for r in rows]) for f in TTFT_FIELDS}, "per_round": rows}
                   for name, rows in by_target.items()} for item, by_target in timed.items()}
    return {"results": results, "ttft": ttft}


def machine(threads: int | None, cpuinfo: str | None = None) -> dict:
    """The CPU the numbers were taken on (model, the flags that pick kernels, cores), threads and date;
    ``cpuinfo``: the text of /proc/cpuinfo (read when None)."""
    info = cpuinfo
    if info is None:
        try:
            info = Path("/proc/cpuinfo").read_text()
        except OSError:
            info = ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                 platform.processor() or None)
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    return {"cpu": model, "flags": {flag: flag in flags for flag in CPU_FLAGS}, "cores": os.cpu_count(),
            "threads": threads, "machine": platform.machine(), "system": platform.platform(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def _ttft_table(report: dict) -> str:
    names = list(report["results"])
    rows = []
    for item, by_target in report.get("ttft", {}).items():
        for name in names:
            r = by_target.get(name) or {}
            rows.append([item, name, r.get("ttft_ms"), r.get("prompt_tokens"), r.get("cached_tokens"),
                         r.get("server_cache_n")])
    if not rows:
        return ""
    return "\n" + markdown_table(["time to first token", "server", "TTFT ms", "prompt tokens", "cached tokens",
                                  "server cache_n"], rows)


def _ratio_table(report: dict) -> str:
    ours = list(report["results"])[0]
    text = ""
    for other, by in (report.get("ratios_by_target") or {}).items():
        rows = [[f"{c} client{'s' if c > 1 else ''}", by[f"stream_decode_tokens_per_s at {c}"], by[f"ttft_ms at {c}"],
                 by[f"aggregate_tokens_per_s at {c}"]] for c in report["settings"]["clients"]]
        rows += [[f"TTFT {item}", None, by[f"ttft_ms {item}"], None] for item in report.get("ttft", {})]
        text += "\n" + markdown_table([f"{ours} / {other}", "decode a stream", "TTFT (< 1: sooner)",
                                       "aggregate tokens/s"], rows)
    return text


def table(report: dict) -> str:
    rows = []
    for name, results in report["results"].items():
        for r in results:
            rows.append([name, r["clients"], r["stream_decode_tokens_per_s"], r["ttft_ms"], r["aggregate_tokens_per_s"]])
    text = markdown_table(["server", "clients", "decode tokens/s a stream", "TTFT ms", "aggregate tokens/s"], rows)
    text += _ttft_table(report)
    steps = [[name, r["clients"], 1e3 / r["stream_decode_tokens_per_s"] if r["stream_decode_tokens_per_s"] else None,
              r["server_step_ms"], r["server_forward_ms"], r["server_rows_per_step"]]
             for name, results in report["results"].items() for r in results if r.get("server_step_ms")]
    if steps:  # where a client's gap between tokens goes, as the server counts its decode steps
        text += "\n" + markdown_table(["server", "clients", "client gap ms", "server step ms", "forward ms",
                                       "rows a step"], steps)
    text += _ratio_table(report)
    for name, target in report.get("targets", {}).items():
        memory = target.get("memory_mb")
        if memory:
            text += f"\n{name}'s resident memory after the rounds: {memory['rss']:.0f} MB (peak {memory['peak']:.0f} MB)\n"
        if target.get("command"):
            text += f"\n{name}: `{' '.join(target['command'])}`" + (f" ({target['version']})" if target.get("version") else "") + "\n"
    m = report.get("machine")
    if m:
        flags = ", ".join(f"{flag} {'yes' if on else 'no'}" for flag, on in m["flags"].items())
        text += f"\nMachine: {m['cpu']}, {m['cores']} cores ({flags}), {m['threads']} threads, {m['date']}\n"
    return text


def default_gguf(model: str | None) -> Path:
    """The GGUF ``llama-server`` loads: ``model`` if it is one, else the embedded model's."""
    if model is not None:
        if not str(model).endswith(".gguf"):
            raise ValueError(f"llama-server needs a .gguf model, not {model}")
        return Path(model)
    from engine.model.loader import embedded_gguf_path

    return embedded_gguf_path()


def _tokenizer(model: str | None):
    from engine.config import EngineConfig
    from engine.model.loader import load_tokenizer

    return load_tokenizer(model, EngineConfig().cache_dir)


def _default_threads() -> int:
    import torch

    return torch.get_num_threads()  # what a sinkserve serve started with default settings uses


START_TIMEOUT_S = 1200.0  # a loaded machine may take minutes to load a model and build its kernels


def _started(stack: contextlib.ExitStack, process):
    """``process`` (a :class:`ServerProcess` or :class:`~bench.llama_server.LlamaServer`) started, healthy, and
    stopped when ``stack`` closes."""
    stack.callback(process.stop)
    return process.start(timeout=START_TIMEOUT_S)


def run_api(out_dir, *, url: str | None = None, other_url: str | None = None, quick: bool = False,
            clients=None, rounds: int | None = None, max_tokens: int | None = None, tiny: bool = False,
            serve_flags: list[str] | None = None, serve_env: dict[str, str] | None = None,
            llama_server: str | Path | None = None, llama_server_flags: list[str] | None = None,
            gguf: str | Path | None = None, model: str | None = None, threads: int | None = None,
            ttft_tokens=None, conversation_tokens: int | None = None) -> dict:
    """Measure ``url`` (or a ``sinkserve serve`` started here), a ``llama-server`` started from the binary
    ``llama_server`` (on ``gguf``, default the one of ``model``) and ``other_url``; write OUT/api.json/.md.
    ``ttft_tokens`` ``()`` and ``conversation_tokens`` 0 leave the TTFT items out."""
    from bench.llama_server import LlamaServer, llama_server_version, slot_tokens_for

    logging.getLogger("httpx").setLevel(logging.WARNING)
    clients = sorted(set(clients or (QUICK_CLIENTS if quick else LLAMA_SERVER_CLIENTS if llama_server else CLIENTS)))
    rounds = rounds or (1 if quick else 3)
    max_tokens = max_tokens or (32 if quick else 128)
    ttft_tokens = tuple(QUICK_TTFT_TOKENS if quick else TTFT_TOKENS) if ttft_tokens is None else tuple(ttft_tokens)
    if conversation_tokens is None:
        conversation_tokens = QUICK_CONVERSATION_TOKENS if quick else CONVERSATION_TOKENS
    threads = threads or _default_threads()
    tokenizer = _tokenizer(model) if ttft_tokens or conversation_tokens else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        targets: dict[str, str] = {}
        started = {}
        if url is None:
            data_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="sinkserve-api-"))
            started["sinkserve"] = _started(stack, ServerProcess(Path(data_dir), *(serve_flags or []), tiny=tiny,
                                                                env=serve_env, log_path=out / "api-server.log"))
            url = started["sinkserve"].url
        targets["sinkserve"] = url.rstrip("/")
        if llama_server:
            longest = max([*ttft_tokens, conversation_tokens + 64 * CONVERSATION_TURNS, 256])
            started[LLAMA_SERVER] = _started(stack, LlamaServer(
                llama_server, gguf or default_gguf(model), parallel=max(clients),
                slot_tokens=slot_tokens_for(longest, max_tokens), threads=threads, extra=llama_server_flags,
                log_path=out / "api-llama-server.log"))
            targets[LLAMA_SERVER] = started[LLAMA_SERVER].url
        if other_url:
            targets["other"] = other_url.rstrip("/")
        report = asyncio.run(measure_api_async(targets, clients=clients, rounds=rounds, max_tokens=max_tokens,
                                               ttft_tokens=ttft_tokens, conversation_tokens=conversation_tokens,
                                               tokenizer=tokenizer, reference=LLAMA_SERVER))
        for name, process in started.items():  # what each server holds after every round, and its peak
            report["targets"][name]["memory_mb"] = process.memory_mb()
    if "sinkserve" in started:
        report["targets"]["sinkserve"]["started"] = "bench.tiny_server (tiny random model)" if tiny else "sinkserve serve"
    if LLAMA_SERVER in started:
        process = started[LLAMA_SERVER]
        report["targets"][LLAMA_SERVER].update({
            "command": process.cmd, "version": llama_server_version(process.binary), "parallel": process.parallel,
            "slot_tokens": process.slot_tokens, "threads": process.threads})
    report["machine"] = machine(threads)
    report["files"] = write_report(out_dir, "api", report, table(report), None)
    return report
