#!/usr/bin/env python
"""Probe a real ``serve`` as an attacker and a careless client would, and count what went wrong.

Starts the server (``bench/serve_process.py``: the real ``serve`` command around a tiny random model, or
``--real`` for the embedded model) on 127.0.0.1 with two API keys and runs, each bounded in requests and
time:

- isolation: what key A creates (a named session, a stored response) is invisible to key B (404s, absent
  from B's lists);
- bad input: lone surrogates, out-of-range numbers, wrong types, unknown fields, huge fields, bad and
  deeply nested JSON, on every route;
- grammar abuse: schemas that compile but cannot start, huge or pathological ones, as ``response_format``
  and as tool parameters; no session may be left behind by a refused request;
- exhaustion: many concurrent requests of both keys (streams included, some abandoned mid-way), then
  ``--branches`` diverging stateless chats and ``--stored`` stored responses, with the server's RSS and
  the data dir's size before and after;
- kill -9: ``--kills`` times, with traffic in flight; every completed stored response and named session
  must read back after the restart.

Every request has a 30 s timeout (a longer wait is a hang). The report (stdout, and ``--out`` as JSON)
counts 5xx replies, hangs, connection errors, isolation leaks, phantom sessions, records lost after
kill -9, RSS and disk; the exit status is 1 when any of the failure counts is not zero.

    python scripts/probe.py --out probe.json                        # the default short run, tiny model
    python scripts/probe.py --branches 300 --stored 3000 --kills 3  # the issue's sizes
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from bench.serve_process import ServerProcess  # noqa: E402

log = logging.getLogger("probe")
KEY_A, KEY_B = "probe-key-a", "probe-key-b"
HANG_S = 30.0
CHAT, COMPLETIONS, RESPONSES = "/v1/chat/completions", "/v1/completions", "/v1/responses"
HI = [{"role": "user", "content": "hi"}]
MiB = 1024 * 1024


class Probe:
    """The server under probe and the counts of everything that went wrong."""

    def __init__(self, args: argparse.Namespace, data_dir: Path) -> None:
        self.args, self.data_dir = args, data_dir
        self.counts: Counter[str] = Counter()
        self.statuses: Counter[str] = Counter()
        self.failures: list[str] = []
        self.report: dict = {}
        self.server: ServerProcess | None = None
        self.lock = threading.Lock()
        self.deadline = time.monotonic() + args.budget_s

    # ----- the server ----------------------------------------------------------------------------------
    def start(self) -> None:
        env = {"SINKSERVE_MAX_PROMPT_TOKENS": str(self.args.max_prompt_tokens),
               "SINKSERVE_MAX_CONCURRENT_PER_KEY": str(self.args.per_key)}
        self.server = ServerProcess(self.data_dir, tiny=not self.args.real, keys=[KEY_A, KEY_B], env=env,
                                    log_path=self.data_dir.parent / "serve.log").start(timeout=600)

    def client(self, key: str) -> httpx.Client:
        return httpx.Client(base_url=self.server.url, headers={"Authorization": f"Bearer {key}"}, timeout=HANG_S)

    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline

    # ----- one request, counted ------------------------------------------------------------------------
    def call(self, client: httpx.Client, phase: str, method: str, path: str, *, json_body=None,
             content: bytes | None = None, expect: tuple[int, ...] | None = None, stream: bool = False,
             abandon_after: int | None = None, headers: dict | None = None) -> httpx.Response | None:
        """The reply (None on a hang or a connection error); 5xx, hangs and unexpected statuses counted."""
        headers = {"Content-Type": "application/json", **(headers or {})}
        started = time.monotonic()
        try:
            if stream:
                with client.stream(method, path, json=json_body, content=content, headers=headers) as response:
                    for i, _ in enumerate(response.iter_lines()):
                        if abandon_after is not None and i >= abandon_after:
                            break
                    reply = response
            else:
                reply = client.request(method, path, json=json_body, content=content, headers=headers)
        except httpx.TimeoutException:
            self.fail(phase, "hangs", f"{method} {path}: no reply in {HANG_S:.0f} s")
            return None
        except httpx.TransportError as exc:
            self.fail(phase, "connection_errors", f"{method} {path}: {type(exc).__name__}: {exc}")
            return None
        with self.lock:
            self.statuses[f"{phase}:{reply.status_code // 100}xx"] += 1
        if reply.status_code >= 500:
            body = "" if stream else reply.text[:200]
            self.fail(phase, "responses_5xx", f"{method} {path} -> {reply.status_code} {body}")
        elif expect is not None and reply.status_code not in expect:
            sent = (content or json.dumps(json_body).encode())[:80]
            self.fail(phase, "unexpected_status", f"{method} {path} {sent!r} -> {reply.status_code}, expected "
                      f"{expect}: {'' if stream else reply.text[:200]}")
        if time.monotonic() - started > HANG_S:
            self.fail(phase, "hangs", f"{method} {path} took {time.monotonic() - started:.0f} s")
        return reply

    def fail(self, phase: str, kind: str, what: str) -> None:
        with self.lock:
            self.counts[kind] += 1
            if len(self.failures) < 200:
                self.failures.append(f"[{phase}] {kind}: {what}")
        log.warning("[%s] %s: %s", phase, kind, what)

    def sessions(self, client: httpx.Client) -> set[str]:
        reply = self.call(client, "list", "GET", "/v1/sessions", expect=(200,))
        return {s["id"] for s in reply.json()["data"]} if reply is not None and reply.status_code == 200 else set()

    def measure(self) -> dict:
        memory = self.server.memory_mb() or {}
        disk = sum(f.stat().st_size for f in self.data_dir.rglob("*") if f.is_file())
        return {"rss_mb": round(memory.get("rss", 0.0), 1), "data_dir_mb": round(disk / MiB, 2)}

    # ----- phases --------------------------------------------------------------------------------------
    def isolation(self) -> None:
        with self.client(KEY_A) as a, self.client(KEY_B) as b:
            reply = self.call(a, "isolation", "POST", CHAT, json_body={"messages": HI, "max_tokens": 4,
                                                                       "session_id": "probe-isolated"}, expect=(200,))
            session = reply.json()["sinkserve"]["session_id"] if reply is not None and reply.status_code == 200 else None
            reply = self.call(a, "isolation", "POST", RESPONSES, json_body={"input": "hi", "max_output_tokens": 4},
                              expect=(200,))
            stored = reply.json()["id"] if reply is not None and reply.status_code == 200 else None
            checks = []
            if session:
                checks += [("GET", f"/v1/sessions/{session}"), ("DELETE", f"/v1/sessions/{session}")]
            if stored:
                checks += [("GET", f"{RESPONSES}/{stored}"), ("GET", f"{RESPONSES}/{stored}/input_items"),
                           ("DELETE", f"{RESPONSES}/{stored}")]
            for method, path in checks:
                reply = self.call(b, "isolation", method, path, expect=(404,))
                self.counts["isolation_checks"] += 1
                if reply is not None and reply.status_code < 300:
                    self.fail("isolation", "isolation_leaks", f"key B: {method} {path} -> {reply.status_code}")
            if stored:
                reply = self.call(b, "isolation", "POST", RESPONSES, json_body={
                    "input": "and?", "previous_response_id": stored, "max_output_tokens": 2}, expect=(400, 404))
                self.counts["isolation_checks"] += 1
                if reply is not None and reply.status_code < 300:
                    self.fail("isolation", "isolation_leaks", "key B continued key A's response")
            if session and session in self.sessions(b):
                self.fail("isolation", "isolation_leaks", "key B lists key A's session")
            self.counts["isolation_checks"] += 1

    def bad_input(self) -> None:
        huge = "x" * (3 * MiB)
        cases: list[tuple[str, object]] = [
            (CHAT, b'{"messages": [{"role": "user", "content": "a\\ud800"}], "max_tokens": 2}'),
            (CHAT, b'{"messages": [{"role": "user", "content": "hi", "name": "\\udc00"}], "max_tokens": 2}'),
            (CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "stop": "\\ud800", "max_tokens": 2}'),
            (CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "user": "\\ud800", "max_tokens": 2}'),
            (COMPLETIONS, b'{"prompt": "\\ud800", "max_tokens": 2}'),
            (RESPONSES, b'{"input": "hi", "metadata": {"k": "\\ud800"}, "max_output_tokens": 2}'),
            (RESPONSES, b'{"input": "hi", "user": "\\ud800", "max_output_tokens": 2}'),
            (RESPONSES, b'{"input": "hi", "instructions": "\\ud800", "max_output_tokens": 2}'),
            (CHAT, {"messages": HI, "seed": 2**64}), (CHAT, {"messages": HI, "seed": -(2**64)}),
            (COMPLETIONS, {"prompt": "a", "seed": 2**70}), (RESPONSES, {"input": "hi", "seed": 2**64}),
            (CHAT, {"messages": HI, "max_tokens": 10**30}), (CHAT, {"messages": HI, "max_tokens": "many"}),
            (CHAT, {"messages": HI, "temperature": "hot"}), (CHAT, b'{"messages": [], "temperature": NaN}'),
            (CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}'),
            (CHAT, {"messages": 5}), (CHAT, {"messages": [5]}), (CHAT, {"messages": [{"role": "user", "content": {}}]}),
            (CHAT, {"messages": HI, "logit_bias": {"1": "x"}}), (CHAT, {"messages": HI, "logit_bias": {"-1": 1}}),
            (CHAT, {"messages": HI, "stop": [1, 2]}), (CHAT, {"messages": HI, "tools": "all"}),
            (CHAT, {"messages": HI, "tool_choice": {"type": "function"}}), (CHAT, {"messages": HI, "wizard": 1}),
            (CHAT, {"messages": HI, "session_id": "x" * 10_000}), (CHAT, {"messages": HI, "n": 10**9}),
            (CHAT, {"messages": [{"role": "user", "content": huge}]}),
            (CHAT, {"messages": [{"role": "user", "content": "hi"}] * 5000}),
            (COMPLETIONS, {"prompt": [10**12]}), (COMPLETIONS, {"prompt": [-1]}), (COMPLETIONS, {"prompt": huge}),
            (RESPONSES, {"input": [{"type": "wizard"}]}), (RESPONSES, {"input": "hi", "previous_response_id": "nope"}),
            (RESPONSES, {"input": "hi", "text": {"format": {"type": "json_schema", "schema": {"$ref": "#"}}}}),
            (CHAT, b'{"messages": ['), (CHAT, b"not json"), (CHAT, b""), (CHAT, b"null"), (CHAT, b"[]"),
            (CHAT, b"[" * 100_000 + b"]" * 100_000), (CHAT, b'{"messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"),
            (CHAT, b'{"messages": [{"role": "user", "content": "hi"}]}\x00garbage'),
            (CHAT, b"\xff\xfe\x00{"),
        ]
        with self.client(KEY_A) as a:
            for path, body in cases:
                if self.out_of_time():
                    return
                content = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.call(a, "bad_input", "POST", path, content=content, expect=(400, 404, 413))
                self.counts["bad_input_requests"] += 1
            for method, path in (("GET", "/v1/nothing"), ("PUT", CHAT), ("GET", "/v1/sessions/../../etc"),
                                 ("GET", f"{RESPONSES}/{'x' * 5000}"), ("DELETE", "/v1/sessions/%00")):
                self.call(a, "bad_input", method, path, expect=(400, 404, 405))
                self.counts["bad_input_requests"] += 1
            self.call(a, "bad_input", "POST", CHAT, content=json.dumps({"messages": HI, "max_tokens": 2}).encode(),
                      headers={"Content-Type": "text/plain"}, expect=(200, 400, 415))
            # a huge identifier that is not stored anywhere for chat: served or refused, never a 5xx
            self.call(a, "bad_input", "POST", CHAT, json_body={"messages": HI, "max_tokens": 2, "user": huge},
                      expect=(200, 400))
            reply = self.call(a, "bad_input", "POST", CHAT, json_body={"messages": HI, "max_tokens": 2}, expect=(200,))
            if reply is None:
                self.fail("bad_input", "unusable_after", "the server does not serve a plain chat after the bad input")

    def grammar_abuse(self) -> None:
        schemas = {
            "self ref": {"$ref": "#"},
            "mutual refs": {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
            "huge pattern": {"type": "object", "properties": {"x": {"type": "string", "pattern": "^a{1000000}$"}},
                             "required": ["x"]},
            "2000 untyped properties": {"type": "object", "properties": {f"p{i}": {} for i in range(2000)}},
            "required recursion": {"type": "object", "properties": {"c": {"$ref": "#"}}, "required": ["c"]},
            "nested 200 deep": json.loads('{"type": "object", "properties": {"a": ' * 200 + "{}" + "}}" * 200),
            "catastrophic regex": {"type": "string", "pattern": "^(a+)+(b+)+(c+)+$"},
            "many items": {"type": "array", "items": {"type": "integer"}, "minItems": 100_000},
            "huge enum": {"enum": [f"value-{i}" for i in range(5000)]},
            "unknown keyword": {"type": "string", "x-unknown": True, "format": "no-such-format"},
            "not a schema": [1, 2, 3],
            "wrong types": {"type": "object", "properties": 5},
        }
        with self.client(KEY_A) as a:
            before = self.sessions(a)
            for schema in schemas.values():
                if self.out_of_time():
                    return
                fmt = {"type": "json_schema", "json_schema": {"name": "probe", "schema": schema}}
                tools = [{"type": "function", "function": {"name": "probe", "parameters": schema}}]
                for extra in ({"response_format": fmt}, {"tools": tools, "tool_choice": "required"}):
                    self.call(a, "grammar", "POST", CHAT, json_body={"messages": HI, "max_tokens": 8, **extra},
                              expect=(200, 400))
                    self.counts["grammar_requests"] += 1
            after = self.sessions(a)
            # refused requests must leave nothing; served ones (a schema that works) may add a session each
            served = self.statuses["grammar:2xx"]
            phantoms = max(0, len(after - before) - served)
            if phantoms:
                self.fail("grammar", "phantom_sessions", f"{phantoms} sessions left by refused requests")

    def exhaustion(self) -> None:
        def one(i: int) -> None:
            key = KEY_A if i % 2 else KEY_B
            with self.client(key) as c:
                body = {"messages": [{"role": "user", "content": f"storm {i}"}], "max_tokens": 8}
                if i % 3 == 0:
                    self.call(c, "exhaustion", "POST", CHAT, json_body={**body, "stream": True}, stream=True,
                              abandon_after=2 if i % 2 else None, expect=(200, 429))
                else:
                    self.call(c, "exhaustion", "POST", CHAT, json_body=body, expect=(200, 429))
        with ThreadPoolExecutor(self.args.concurrency) as pool:
            list(pool.map(one, range(self.args.storm)))
        self.counts["exhaustion_requests"] += self.args.storm
        self.report["before_growth"] = self.measure()
        with self.client(KEY_A) as a:
            for i in range(self.args.branches):  # diverging stateless requests: each may fork a session
                if self.out_of_time():
                    break
                messages = [*HI, {"role": "assistant", "content": "hello"}, {"role": "user", "content": f"branch {i}"}]
                self.call(a, "branches", "POST", CHAT, json_body={"messages": messages, "max_tokens": 2},
                          expect=(200, 429, 507))
            self.report["after_branches"] = {**self.measure(), "sessions": len(self.sessions(a))}
            for i in range(self.args.stored):
                if self.out_of_time():
                    break
                self.call(a, "stored", "POST", RESPONSES, json_body={"input": f"store {i}", "max_output_tokens": 2},
                          expect=(200, 429, 507))
            self.report["after_stored"] = self.measure()

    def kills(self) -> None:
        for round_ in range(self.args.kills):
            if self.out_of_time():
                return
            self.kill_round(round_)

    def kill_round(self, round_: int) -> None:
        """Traffic of three clients, kill -9 after ``--kill-after-s``, restart, read back what completed."""
        done_responses, done_sessions = [], {}
        stop = threading.Event()

        def traffic(worker: int) -> None:
            with self.client(KEY_A) as c:
                for i in range(200):
                    if stop.is_set():
                        return
                    try:
                        if i % 2:
                            r = c.post(RESPONSES, json={"input": f"kill {round_}.{worker}.{i}", "max_output_tokens": 4})
                            if r.status_code == 200:
                                done_responses.append(r.json()["id"])
                        else:
                            sid = f"probe-k{round_}-{worker}"
                            r = c.post(CHAT, json={"messages": [{"role": "user", "content": f"turn {i}"}],
                                                   "max_tokens": 4, "session_id": sid})
                            if r.status_code == 200:
                                done_sessions[sid] = r.json()["sinkserve"]["session_id"]
                    except httpx.HTTPError:
                        return  # the kill cut it: not a completed record
        threads = [threading.Thread(target=traffic, args=(w,)) for w in range(3)]
        for t in threads:
            t.start()
        time.sleep(self.args.kill_after_s)
        completed_r, completed_s = list(done_responses), dict(done_sessions)
        self.server.kill()
        stop.set()
        for t in threads:
            t.join(60)
        self.start()
        with self.client(KEY_A) as a:
            for rid in completed_r:
                reply = self.call(a, "kill", "GET", f"{RESPONSES}/{rid}", expect=(200,))
                if reply is None or reply.status_code != 200:
                    self.fail("kill", "lost_after_kill", f"stored response {rid}")
            for sid in set(completed_s.values()):
                reply = self.call(a, "kill", "GET", f"/v1/sessions/{sid}", expect=(200,))
                if reply is None or reply.status_code != 200:
                    self.fail("kill", "lost_after_kill", f"session {sid}")
        self.counts["kill_checked_responses"] += len(completed_r)
        self.counts["kill_checked_sessions"] += len(set(completed_s.values()))
        self.counts["kills"] += 1


FAILURE_COUNTS = ("responses_5xx", "hangs", "connection_errors", "unexpected_status", "isolation_leaks",
                  "phantom_sessions", "lost_after_kill", "unusable_after")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", action="store_true", help="the embedded model instead of the tiny one")
    parser.add_argument("--concurrency", type=int, default=16, help="client threads of the storm")
    parser.add_argument("--storm", type=int, default=64, help="requests of the concurrent storm")
    parser.add_argument("--branches", type=int, default=30, help="diverging stateless chats")
    parser.add_argument("--stored", type=int, default=30, help="stored responses to create")
    parser.add_argument("--kills", type=int, default=1, help="kill -9 rounds")
    parser.add_argument("--kill-after-s", type=float, default=3.0, help="traffic before each kill")
    parser.add_argument("--max-prompt-tokens", type=int, default=20_000, help="the server's prompt limit")
    parser.add_argument("--per-key", type=int, default=16, help="the server's concurrent requests per key")
    parser.add_argument("--budget-s", type=float, default=900.0, help="stop starting new work after this")
    parser.add_argument("--phases", default="isolation,bad_input,grammar_abuse,exhaustion,kills")
    parser.add_argument("--data-dir", type=Path, help="default: a temporary directory")
    parser.add_argument("--out", type=Path, help="write the report here as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="probe-") as tmp:
        data_dir = args.data_dir or Path(tmp) / "data"
        probe = Probe(args, data_dir)
        probe.start()
        started = time.monotonic()
        try:
            for phase in args.phases.split(","):
                log.info("phase %s", phase)
                getattr(probe, phase.strip())()
        finally:
            probe.report["final"] = probe.measure()
            probe.server.stop()
        report = {"failures": {k: probe.counts[k] for k in FAILURE_COUNTS},
                  "counts": {k: v for k, v in probe.counts.items() if k not in FAILURE_COUNTS},
                  "statuses": dict(sorted(probe.statuses.items())), **probe.report,
                  "seconds": round(time.monotonic() - started, 1), "examples": probe.failures[:50]}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 1 if any(report["failures"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
