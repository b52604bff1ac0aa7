"""The follow-up benchmark's Responses-chain row: time to first token of a chained response against the
length of the chain behind it, through ``POST /v1/responses`` with ``previous_response_id``.

One chain grows through the lengths in order: responses of at most ``feed`` (4,096) input tokens of the
shipped text (``max_output_tokens`` 1) extend it; at each length a short question is sent as a streamed
response chained on the last one, and the time from sending it to its first
``response.output_text.delta`` event is measured with its ``cached_tokens``, and the time to the
response's headers (sent once the engine admitted the request: the HTTP path before the model runs). That question's response
then continues the chain; ``repeats`` (5) such questions in a row give a median, as this host's speed
drifts from minute to minute. The server is the benchmark's own engine behind ``create_app`` (uvicorn on a
free port of 127.0.0.1, in a thread), so the row includes what the HTTP path adds: loading the stored
response, rendering the whole chain with the chat template, SSE. With sessions it should stay flat in
the chain's length (issue 13: at most 1.5x from 500 to 50,000 tokens).

Part of ``sinkserve bench followup``; alone (the embedded model, default settings, no other row):

    .venv/bin/python -m bench.responses_chain --lengths 500,50000 --out docs/results/responses-chain
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from bench.common import environment, history_ids, markdown_table, ratio, write_report

log = logging.getLogger(__name__)

QUESTION = "In one short sentence: who spoke last in the text above?"


class _Server:
    """uvicorn around ``create_app(engine=engine)`` in a background thread on a free loopback port."""

    def __init__(self, engine) -> None:
        import uvicorn

        from server.app import create_app
        from server.settings import Settings

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        app = create_app(Settings(), engine=engine)
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> _Server:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the benchmark's HTTP server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


def _respond(client: httpx.Client, model: str, text: str, previous: str | None, stream: bool) -> dict:
    """One response (greedy, 1 output token); for a stream, seconds to the first text delta too."""
    body = {"model": model, "input": text, "max_output_tokens": 1, "temperature": 0, "stream": stream,
            "previous_response_id": previous}
    start = time.perf_counter()
    if not stream:
        reply = client.post("/v1/responses", json=body)
        reply.raise_for_status()
        return {"response": reply.json(), "ttft_s": None}
    first, final = None, None
    with client.stream("POST", "/v1/responses", json=body) as reply:
        headers = time.perf_counter() - start  # sent once the engine admitted the request
        reply.raise_for_status()
        for line in reply.iter_lines():
            if not line.startswith("data:"):
                continue
            event = json.loads(line.removeprefix("data:"))
            if event["type"] == "response.output_text.delta" and first is None:
                first = time.perf_counter() - start
            elif event["type"] in ("response.completed", "response.incomplete", "response.failed"):
                final = event["response"]
    if final is None or final["status"] == "failed":
        raise RuntimeError(f"the chained response failed: {final and final.get('error')}")
    return {"response": final, "ttft_s": first if first is not None else time.perf_counter() - start,
            "headers_s": headers}


def measure_responses_chain(engine, lengths, *, feed: int = 4096, repeats: int = 5) -> list[dict]:
    """Per length: the chain's tokens before the first question, the median TTFT in ms of ``repeats``
    chained questions (each also in ``ttft_ms_each``), and the first question's ``cached_tokens``."""
    lengths = sorted(set(int(n) for n in lengths))
    ids = history_ids(engine.tokenizer, max(lengths) + feed, offset=7000)
    rows, used, chain, previous = [], 0, 0, None
    with _Server(engine) as server, httpx.Client(base_url=server.url, timeout=3600) as client:
        for length in lengths:
            while chain < length:  # extend the chain, one response per ``feed`` tokens
                take = min(feed, max(length - chain, 16))
                text = engine.tokenizer.decode(ids[used:used + take])
                used += take
                done = _respond(client, engine.model_name, text, previous, stream=False)["response"]
                previous = done["id"]
                chain = done["usage"]["total_tokens"]
            row = {"chain_tokens": chain, "ttft_ms_each": [], "headers_ms_each": []}
            for _ in range(repeats):  # each question continues the chain (a few tokens longer each time)
                timed = _respond(client, engine.model_name, QUESTION, previous, stream=True)
                usage = timed["response"]["usage"]
                row["ttft_ms_each"].append(1e3 * timed["ttft_s"])
                row["headers_ms_each"].append(1e3 * timed["headers_s"])
                row.setdefault("input_tokens", usage["input_tokens"])
                row.setdefault("cached_tokens", usage["input_tokens_details"]["cached_tokens"])
                previous = timed["response"]["id"]
                chain = usage["total_tokens"]
            row["ttft_ms"] = statistics.median(row["ttft_ms_each"])
            row["headers_ms"] = statistics.median(row["headers_ms_each"])
            rows.append(row)
            log.info("chained response after %d tokens: %.0f ms to the first token (median of %d; %d cached)",
                     row["chain_tokens"], row["ttft_ms"], repeats, row["cached_tokens"])
    return rows


def main(argv: list[str] | None = None) -> int:
    from engine.config import EngineConfig
    from engine.engine import Engine

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="500,50000", help="chain lengths (tokens), comma list")
    parser.add_argument("--out", default="results/responses-chain")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    lengths = [int(x) for x in args.lengths.split(",")]
    with tempfile.TemporaryDirectory(prefix="sinkserve-bench-") as data_dir:
        engine = Engine(EngineConfig(data_dir=Path(data_dir))).start()
        try:
            started = time.perf_counter()
            rows = measure_responses_chain(engine, lengths)
            report = {"suite": "responses_chain", "environment": environment(engine.loaded, engine.config),
                      "results": rows, "seconds": time.perf_counter() - started,
                      "ttft_longest_over_shortest": ratio(rows[-1]["ttft_ms"], rows[0]["ttft_ms"])}
        finally:
            engine.stop()
    table = markdown_table(["chain tokens", "cached tokens", "input tokens", "headers ms (median of 5)",
                            "chained response TTFT ms (median of 5)"],
                           [[r["chain_tokens"], r["cached_tokens"], r["input_tokens"], r["headers_ms"], r["ttft_ms"]]
                            for r in rows])
    table += f"\nTTFT longest / shortest: {report['ttft_longest_over_shortest']:.2f}x\n"
    write_report(args.out, "responses_chain", report, table, None)
    sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
