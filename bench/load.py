"""Sustained HTTP load on a running server: many streaming clients holding multi-turn conversations.

Unlike the other suites this one talks to the server over HTTP, the way a deployment is used:
``clients`` (32) concurrent clients each hold multi-turn conversations in the stateless style of the
OpenAI API (every turn resends the whole growing history; the server finds the session by token
prefix), streaming ``max_tokens`` (32) greedy tokens a turn, for ``seconds`` (60). Each conversation
lasts ``turns`` (8) turns, then the client starts a new one. Load stops by itself: no new turn starts
after ``seconds`` or ``max_requests``, and whatever is still running ``drain_s`` later is cancelled.

Only loopback servers are accepted (``127.0.0.1``, ``localhost``, ``::1``): this is a load generator, it
must not be pointed at someone else's machine. ``sinkserve bench load --serve`` starts ``sinkserve
serve`` itself on a free port of 127.0.0.1 (``--tiny``: the tests' tiny random model,
``bench.tiny_server``; both through :mod:`bench.serve_process`), one API key per client so each client owns its sessions.

Recorded per request: start time, time to first token (TTFT), inter-token latencies (ITL, between
consecutive content chunks), completion tokens, prompt tokens served from the session cache, HTTP status
and error kind. 429 (per-key concurrency limit, queue full) is deliberate back-pressure: the client waits
``Retry-After`` and retries the turn, and it is counted apart from errors. The server's resident memory
is sampled every second (``/proc/<pid>/status`` when the benchmark started the server, else
``process_resident_memory_bytes`` from ``/metrics`` when the server exports it).

At the end the sessions must be consistent: the engine is idle (``/metrics``: no running or waiting
request), ``GET /v1/sessions`` lists every session the clients last used, and one more turn on a few
conversations answers 200 (``same_session``: it continued the conversation's session).

Report (``load.json``): requests, tokens/s, p50/p99 TTFT and ITL, errors by kind, peak and post-warm-up
memory (``rss_growth``: RSS at the end vs the first sample after 20% of the run), the consistency check,
and every request (``requests``) and memory sample (``rss``) for the plot.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx

from bench.common import DEFAULT_TEXT, markdown_table, metric_value, pyplot, sse_chunks, write_report
from bench.serve_process import ServerProcess

log = logging.getLogger(__name__)

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
BAN_SPECIAL = {"0": -100, "1": -100, "2": -100}  # SmolLM2's <|endoftext|>, <|im_start|>, <|im_end|>: full turns
WARMUP_FRACTION = 0.2


def check_loopback(url: str) -> str:
    """``url`` without a trailing slash; ValueError unless its host is a loopback address."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or parsed.hostname not in LOOPBACK:
        raise ValueError(f"the load benchmark only targets loopback servers (127.0.0.1, localhost, ::1), not {url!r}")
    return url.rstrip("/")


@dataclass
class Request:
    client: int
    conversation: int
    turn: int
    start_s: float  # since the load began
    status: int | None = None
    kind: str = "ok"  # ok, rejected_429, http_<status>, transport_<Error>, stream_error, no_finish, cancelled
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    tokens: int = 0
    cached_tokens: int | None = None
    end_s: float | None = None
    session_id: str | None = None


@dataclass
class Conversation:
    key: str | None
    messages: list[dict] = field(default_factory=list)
    session_id: str | None = None


def _percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (``q`` in 0..100) of ``values``, None when empty."""
    if not values:
        return None
    data = sorted(values)
    pos = (len(data) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def _headers(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def _lines(seed: int) -> list[str]:
    text = DEFAULT_TEXT.read_text(encoding="utf-8")
    lines = [line.strip() for line in text.splitlines() if len(line.strip()) > 20]
    random.Random(seed).shuffle(lines)
    return lines[:4096] or ["Tell me more."]


async def _turn(client: httpx.AsyncClient, conv: Conversation, body_extra: dict, rec: Request,
                origin: float, timeout: float) -> dict | None:
    """One streaming turn; fills ``rec`` and returns the assistant message (None on failure)."""
    body = {"messages": conv.messages, "max_tokens": body_extra["max_tokens"], "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}, "logit_bias": body_extra["logit_bias"]}
    if body_extra.get("model"):
        body["model"] = body_extra["model"]
    started = time.perf_counter()
    rec.start_s = started - origin
    text: list[str] = []
    last = None
    finished = False
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body, headers=_headers(conv.key),
                                 timeout=timeout) as response:
            rec.status = response.status_code
            rec.session_id = response.headers.get("x-session-id")
            if response.status_code == 429:
                rec.kind = "rejected_429"
                await response.aread()
                return None
            if response.status_code != 200:
                rec.kind = f"http_{response.status_code}"
                await response.aread()
                return None
            async for chunk in sse_chunks(response):
                if "error" in chunk:
                    rec.kind = "stream_error"
                    return None
                if chunk.get("usage"):
                    usage = chunk["usage"]
                    rec.tokens = usage.get("completion_tokens", rec.tokens)
                    rec.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
                for choice in chunk.get("choices") or []:
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        now = time.perf_counter()
                        if last is None:
                            rec.ttft_s = now - started
                        else:
                            rec.itl_s.append(now - last)
                        last = now
                        text.append(content)
                    if choice.get("finish_reason"):
                        finished = True
    except httpx.TransportError as exc:
        rec.kind = f"transport_{type(exc).__name__}"
        return None
    except (json.JSONDecodeError, ValueError):
        rec.kind = "bad_stream"
        return None
    finally:
        rec.end_s = time.perf_counter() - origin
    if not finished:
        rec.kind = "no_finish"
        return None
    if not rec.tokens:
        rec.tokens = len(rec.itl_s) + (rec.ttft_s is not None)
    return {"role": "assistant", "content": "".join(text)}


async def _client(index: int, http: httpx.AsyncClient, key: str | None, state: dict) -> None:
    rng = random.Random(index)
    lines = state["lines"]
    conv_no = 0
    while not state["stop"].is_set():
        conv = Conversation(key)
        state["conversations"].append(conv)
        for turn in range(state["turns"]):
            if state["stop"].is_set():
                return
            conv.messages.append({"role": "user", "content": f"[{index}.{conv_no}.{turn}] " + rng.choice(lines)})
            while True:  # retry the same turn after a 429
                if state["stop"].is_set() or len(state["requests"]) >= state["max_requests"]:
                    state["stop"].set()
                    conv.messages.pop()
                    return
                rec = Request(index, conv_no, turn, 0.0)
                state["requests"].append(rec)
                try:
                    reply = await _turn(http, conv, state["body"], rec, state["origin"], state["timeout"])
                except asyncio.CancelledError:
                    rec.kind = "cancelled"
                    conv.messages.pop()
                    raise
                if rec.kind == "rejected_429":
                    await asyncio.sleep(0.25 + rng.random() * 0.5)
                    continue
                break
            if reply is None:  # an error: this conversation is over, start a new one (after a breath)
                conv.messages.pop()
                await asyncio.sleep(0.1)
                break
            conv.messages.append(reply)
            conv.session_id = rec.session_id
        conv_no += 1


def _proc_rss(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


async def _rss_sampler(http: httpx.AsyncClient, pid: int | None, origin: float, samples: list, notes: list,
                       done: asyncio.Event) -> None:
    use_metrics = pid is None
    while not done.is_set():
        rss = None
        if use_metrics:
            try:
                rss = metric_value((await http.get("/metrics", timeout=5)).text, "process_resident_memory_bytes")
            except httpx.HTTPError:
                rss = None
            if rss is None and not samples:
                notes.append("no RSS: the server was not started here and /metrics has no "
                             "process_resident_memory_bytes")
                return
        else:
            rss = _proc_rss(pid)
        if rss is not None:
            samples.append([round(time.perf_counter() - origin, 3), int(rss)])
        try:
            await asyncio.wait_for(done.wait(), 1.0)
        except asyncio.TimeoutError:
            pass


async def _consistency(http: httpx.AsyncClient, conversations: list[Conversation], body: dict,
                       followups: int, timeout: float) -> dict:
    """Idle engine, every last-used session listed, one more turn on a few conversations answers 200."""
    out: dict = {"idle": None, "listed": 0, "missing": [], "dropped": 0, "list_errors": [], "followups": [],
                 "ok": False}
    deadline = time.monotonic() + 10
    while True:
        try:
            text = (await http.get("/metrics", timeout=5)).text
            running = metric_value(text, "sinkserve_running_requests")
            waiting = metric_value(text, "sinkserve_waiting_requests")
            out["idle"] = (running or 0) == 0 and (waiting or 0) == 0
        except httpx.HTTPError as exc:
            out["idle"] = False
            out["list_errors"].append(f"/metrics: {type(exc).__name__}")
        if out["idle"] or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    used = [c for c in conversations if c.session_id]
    for key in sorted({c.key for c in used}, key=str):
        response = await http.get("/v1/sessions", headers=_headers(key), timeout=30)
        if response.status_code != 200:
            out["list_errors"].append(f"GET /v1/sessions: {response.status_code}")
            continue
        ids = {s["id"] for s in response.json()["data"]}
        mine = {c.session_id for c in used if c.key == key}
        out["listed"] += len(mine & ids)
        out["missing"] += sorted(mine - ids)
    # a few conversations ending on an assistant turn, spread over the clients
    picks = [c for c in used if c.messages and c.messages[-1]["role"] == "assistant"]
    picks = picks[:: max(1, len(picks) // followups)][:followups] if picks else []
    for conv in picks:
        messages = [*conv.messages, {"role": "user", "content": "One more thing: summarise that."}]
        request = {"messages": messages, "max_tokens": 4, "temperature": 0.0}
        if body.get("model"):
            request["model"] = body["model"]
        try:
            response = await http.post("/v1/chat/completions", json=request, headers=_headers(conv.key),
                                       timeout=timeout)
            status, sid = response.status_code, response.headers.get("x-session-id")
        except httpx.TransportError as exc:
            status, sid = f"transport_{type(exc).__name__}", None
        out["followups"].append({"status": status, "same_session": sid == conv.session_id})
    # sessions and branches the server dropped over its per-key bounds (counted in /metrics) may be missing;
    # any other missing session is lost
    try:
        text = (await http.get("/metrics", timeout=5)).text
        out["dropped"] = sum(int(metric_value(text, f"sinkserve_{name}_dropped_total") or 0)
                             for name in ("sessions", "branches"))
    except httpx.HTTPError as exc:
        out["dropped"] = 0
        out["list_errors"].append(f"/metrics: {type(exc).__name__}")
    out["ok"] = bool(out["idle"] and len(out["missing"]) <= out["dropped"] and not out["list_errors"]
                     and all(f["status"] == 200 for f in out["followups"]))
    return out


async def measure_load_async(url: str, *, clients: int = 32, seconds: float = 60.0, api_keys=None,
                             pid: int | None = None, turns: int = 8, max_tokens: int = 32,
                             max_requests: int = 100_000, drain_s: float = 120.0, followups: int = 4,
                             request_timeout: float = 300.0, model: str | None = None,
                             ban_special: bool = True) -> dict:
    """Run the load against ``url`` (loopback only) and return the JSON-ready report.

    ``api_keys``: client ``i`` uses ``api_keys[i % len(api_keys)]`` (none: no Authorization header).
    ``pid``: the server's process id, for RSS from /proc; None: RSS from /metrics when exported.
    """
    url = check_loopback(url)
    keys = list(api_keys or [None])
    notes: list[str] = []
    state = {
        "stop": asyncio.Event(), "requests": [], "conversations": [], "turns": max(1, turns),
        "max_requests": max_requests, "timeout": request_timeout, "lines": _lines(0),
        "body": {"max_tokens": max_tokens, "logit_bias": BAN_SPECIAL if ban_special else {}, "model": model},
    }
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    rss: list[list] = []
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=request_timeout) as http:
        origin = time.perf_counter()
        state["origin"] = origin
        sampler_done = asyncio.Event()
        sampler = asyncio.create_task(_rss_sampler(http, pid, origin, rss, notes, sampler_done))
        tasks = [asyncio.create_task(_client(i, http, keys[i % len(keys)], state)) for i in range(clients)]
        try:
            await asyncio.wait_for(state["stop"].wait(), seconds)
        except asyncio.TimeoutError:
            pass
        state["stop"].set()
        load_end = time.perf_counter()
        _, pending = await asyncio.wait(tasks, timeout=drain_s)
        for task in pending:
            task.cancel()
        if pending:
            notes.append(f"{len(pending)} clients still running {drain_s:.0f} s after the end were cancelled")
            await asyncio.gather(*pending, return_exceptions=True)
        for task in tasks:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()
        drained = time.perf_counter()
        sampler_done.set()
        await sampler
        consistency = await _consistency(http, state["conversations"], state["body"], followups, request_timeout)

    requests: list[Request] = state["requests"]
    done = [r for r in requests if r.kind == "ok"]
    errors: dict[str, int] = {}
    for r in requests:
        if r.kind not in ("ok", "rejected_429"):
            errors[r.kind] = errors.get(r.kind, 0) + 1
    ttfts = [r.ttft_s for r in done if r.ttft_s is not None]
    itls = [gap for r in done for gap in r.itl_s]
    tokens = sum(r.tokens for r in done)
    wall = drained - origin

    def ms(value):
        return None if value is None else 1e3 * value

    memory: dict = {"source": "proc" if pid is not None else "metrics", "samples": len(rss)}
    if rss:
        warm_t = WARMUP_FRACTION * (load_end - origin)
        warm = next((b for t, b in rss if t >= warm_t), rss[-1][1])
        memory.update({
            "peak_mib": max(b for _, b in rss) / 2**20,
            "start_mib": rss[0][1] / 2**20,
            "post_warmup_mib": warm / 2**20,
            "end_mib": rss[-1][1] / 2**20,
            "growth_after_warmup_mib": (rss[-1][1] - warm) / 2**20,
            "growth_after_warmup_ratio": rss[-1][1] / warm if warm else None,
        })
    else:
        memory["peak_mib"] = None
    cached = [r.cached_tokens for r in done if r.turn > 0 and r.cached_tokens is not None]
    summary = {
        "requests": len(requests),
        "completed": len(done),
        "rejected_429": sum(r.kind == "rejected_429" for r in requests),
        "errors": sum(errors.values()),
        "errors_by_kind": errors,
        "conversations": len(state["conversations"]),
        "generated_tokens": tokens,
        "load_s": load_end - origin,
        "wall_s": wall,
        "tokens_per_s": tokens / wall if wall > 0 else None,
        "requests_per_s": len(done) / wall if wall > 0 else None,
        "ttft_p50_ms": ms(_percentile(ttfts, 50)),
        "ttft_p99_ms": ms(_percentile(ttfts, 99)),
        "itl_p50_ms": ms(_percentile(itls, 50)),
        "itl_p99_ms": ms(_percentile(itls, 99)),
        "followup_turns_with_cache_hit": (sum(c > 0 for c in cached) / len(cached)) if cached else None,
    }
    log.info("load: %d requests (%d ok, %d 429, %d errors), %.1f tokens/s, TTFT p50 %s ms, ITL p50 %s ms",
             summary["requests"], summary["completed"], summary["rejected_429"], summary["errors"],
             summary["tokens_per_s"] or 0, _fmt(summary["ttft_p50_ms"]), _fmt(summary["itl_p50_ms"]))
    if not consistency["ok"]:
        notes.append(f"sessions NOT consistent after the load: {consistency}")
    return {
        "suite": "load",
        "environment": {"url": url, "python": sys.version.split()[0]},
        "settings": {"clients": clients, "seconds": seconds, "turns": turns, "max_tokens": max_tokens,
                     "max_requests": max_requests, "keys": len(keys), "ban_special_tokens": ban_special,
                     "temperature": 0.0, "stateless": True},
        "summary": summary,
        "memory": memory,
        "consistency": consistency,
        "rss": rss,
        "requests": [_compact(r) for r in requests],
        "notes": notes,
    }


def _compact(r: Request) -> dict:
    d = asdict(r)
    d["itl_s"] = [round(x, 5) for x in r.itl_s]
    for k in ("start_s", "end_s", "ttft_s"):
        if d[k] is not None:
            d[k] = round(d[k], 5)
    return d


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def measure_load(url: str, **kwargs) -> dict:
    return asyncio.run(measure_load_async(url, **kwargs))


def table(report: dict) -> str:
    s, m, c = report["summary"], report["memory"], report["consistency"]
    st = report["settings"]
    rows = [[st["clients"], s["requests"], s["completed"], s["rejected_429"], s["errors"], s["tokens_per_s"],
             s["ttft_p50_ms"], s["ttft_p99_ms"], s["itl_p50_ms"], s["itl_p99_ms"], m.get("peak_mib"),
             m.get("post_warmup_mib"), m.get("end_mib")]]
    text = markdown_table(["clients", "requests", "ok", "429", "errors", "tokens/s", "TTFT p50 ms", "TTFT p99 ms",
                           "ITL p50 ms", "ITL p99 ms", "peak RSS MiB", "RSS after warm-up MiB", "RSS end MiB"],
                          rows)
    errors = ", ".join(f"{k}: {v}" for k, v in sorted(s["errors_by_kind"].items())) or "none"
    same = sum(f["same_session"] for f in c["followups"])
    text += (f"\n{st['seconds']:.0f} s, {st['turns']} turns a conversation, {st['max_tokens']} tokens a turn, "
             f"stateless (whole history resent). Errors: {errors}. Sessions consistent: "
             f"{'yes' if c['ok'] else 'NO'} (engine idle: {c['idle']}, {c['listed']} listed, "
             f"{len(c['missing'])} missing, {len(c['followups'])} follow-up turns, {same} on the same session).\n")
    if m.get("growth_after_warmup_mib") is not None:
        text += (f"Memory growth after warm-up ({int(WARMUP_FRACTION * 100)}% of the run): "
                 f"{m['growth_after_warmup_mib']:+.1f} MiB ({m['samples']} samples).\n")
    return text


def _rolling_median(points: list[tuple[float, float]], width: int = 25) -> tuple[list[float], list[float]]:
    points = sorted(points)
    xs, ys = [], []
    for i in range(len(points)):
        window = [y for _, y in points[max(0, i - width + 1) : i + 1]]
        xs.append(points[i][0])
        ys.append(_percentile(window, 50))
    return xs, ys


def plot(report: dict, path) -> None:
    plt = pyplot()
    fig, (ax, ax_mem) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    ok = [r for r in report["requests"] if r["kind"] == "ok"]
    ttft = [(r["start_s"], 1e3 * r["ttft_s"]) for r in ok if r["ttft_s"] is not None]
    itl = [(r["start_s"] + (r["ttft_s"] or 0), 1e3 * sum(r["itl_s"]) / len(r["itl_s"])) for r in ok if r["itl_s"]]
    for points, color, label in ((ttft, "tab:blue", "TTFT"), (itl, "tab:orange", "mean ITL of the request")):
        if points:
            ax.scatter(*zip(*points, strict=True), s=6, alpha=0.35, color=color, label=label)
            ax.plot(*_rolling_median(points), color=color, lw=1.5, label=f"{label}, rolling p50")
    bad = [r["start_s"] for r in report["requests"] if r["kind"] not in ("ok", "rejected_429")]
    if bad:
        ax.scatter(bad, [1] * len(bad), marker="x", color="red", label="errors")
    if ttft or itl:
        ax.set_yscale("log")
    ax.set_ylabel("latency (ms)")
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(alpha=0.3)
    s = report["summary"]
    ax.set_title(f"Load: {report['settings']['clients']} clients, {s['tokens_per_s'] or 0:.1f} tokens/s, "
                 f"{s['errors']} errors")
    if report["rss"]:
        t, b = zip(*report["rss"], strict=True)
        ax_mem.plot(t, [x / 2**20 for x in b], color="tab:green")
        ax_mem.axvline(WARMUP_FRACTION * s["load_s"], color="gray", ls="--", lw=1)
    else:
        ax_mem.text(0.5, 0.5, "no RSS samples", ha="center", va="center", transform=ax_mem.transAxes)
    ax_mem.set_ylabel("server RSS (MiB)")
    ax_mem.set_xlabel("time since the load began (s)")
    ax_mem.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_load(out_dir, *, url: str | None = None, serve: bool = False, tiny: bool = False, clients: int = 32,
             seconds: float = 60.0, api_keys=None, serve_flags: list[str] | None = None,
             serve_env: dict[str, str] | None = None, **kwargs) -> dict:
    """Run against ``url`` or (``serve``) a server started here; write OUT/load.json/.md/.png."""
    if serve == (url is not None):
        raise ValueError("give exactly one of --url and --serve")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    if url is not None:
        report = measure_load(url, clients=clients, seconds=seconds, api_keys=api_keys, **kwargs)
    else:
        keys = [f"load-client-{i}" for i in range(clients)]  # one key per client: its own sessions
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="sinkserve-load-") as data_dir:
            server = ServerProcess(Path(data_dir), *(serve_flags or []), tiny=tiny, keys=keys, env=serve_env,
                                   log_path=out / "load-server.log")
            started = time.perf_counter()
            with server:
                log.info("server %s up in %.1f s (pid %d, %s)", server.url, time.perf_counter() - started,
                         server.proc.pid, "tiny model" if tiny else "real model")
                report = measure_load(server.url, clients=clients, seconds=seconds, api_keys=keys,
                                      pid=server.proc.pid, **kwargs)
        report["environment"]["server"] = "bench.tiny_server (tiny random model)" if tiny else "sinkserve serve"
    report["files"] = write_report(out_dir, "load", report, table(report), plot)
    return report
