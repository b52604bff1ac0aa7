#!/usr/bin/env python
"""Fair prefill against a real ``serve`` with the embedded model: one key sends a long prompt, and while it
is prefilling another key sends a 2-token chat; that chat's time to first token is compared with its time
alone (the same server, idle). The scheduler shares each step's prompt tokens between them
(engine/scheduling/scheduler.py), so the chat should wait about one share of the long prompt, not all of it.

    python scripts/fair_prefill.py --long-tokens 5000 --delay 2 --out fair_prefill.json
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from bench.serve_process import ServerProcess  # noqa: E402

log = logging.getLogger("fair_prefill")
WORDS = "the quick brown fox jumps over the lazy dog while a small cat sleeps on an old red chair".split()
KEYS = ["fair-prefill-long", "fair-prefill-short"]
SHORT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True}


def first_token_s(url: str, key: str, body: dict, timeout: float) -> tuple[float, float]:
    """(seconds to the first content chunk, seconds to the end) of one streamed chat."""
    start, first = time.monotonic(), None
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers, timeout=timeout) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            if first is None and line.startswith("data: {") and _has_text(line[len("data: "):]):
                first = time.monotonic() - start
    return (first if first is not None else float("nan")), time.monotonic() - start


def _has_text(chunk: str) -> bool:
    """Whether a streamed chunk carries reply text (the first chunk names the role, with empty content)."""
    return any((choice.get("delta") or {}).get("content") for choice in json.loads(chunk).get("choices", []))


def long_body(tokens: int) -> dict:
    words = " ".join(WORDS[i % len(WORDS)] for i in range(tokens))  # one token a word
    return {"messages": [{"role": "user", "content": f"Summarize: {words}"}], "max_tokens": 4, "stream": True}


def run(long_tokens: int, delay: float, repeats: int, timeout: float, data_dir: Path) -> dict:
    server = ServerProcess(data_dir, keys=KEYS, log_path=data_dir / "serve.log").start(timeout=timeout)
    try:
        first_token_s(server.url, KEYS[1], SHORT, timeout)  # warm-up
        alone = [first_token_s(server.url, KEYS[1], SHORT, timeout)[0] for _ in range(repeats)]
        log.info("the chat alone: first token after %s s", [round(t, 3) for t in alone])
        long_result: dict = {}

        def send_long() -> None:
            long_result["ttft_s"], long_result["total_s"] = first_token_s(server.url, KEYS[0], long_body(long_tokens),
                                                                          timeout)

        thread = threading.Thread(target=send_long)
        thread.start()
        time.sleep(delay)
        beside = []
        while thread.is_alive() and len(beside) < repeats:  # each while the long prompt is still prefilling
            beside.append(first_token_s(server.url, KEYS[1], SHORT, timeout)[0])
            log.info("the chat beside the long prompt: first token after %.3f s", beside[-1])
            time.sleep(0.5)
        thread.join()
        log.info("the long prompt: %s", long_result)
    finally:
        server.stop()
    alone_s, beside_s = statistics.median(alone), statistics.median(beside) if beside else float("nan")
    return {"long_tokens": long_tokens, "delay_s": delay, "alone_ttft_s": [round(t, 3) for t in alone],
            "beside_long_ttft_s": [round(t, 3) for t in beside], "long": {k: round(v, 2) for k, v in long_result.items()},
            "ratio": round(beside_s / alone_s, 2), "first_ratio": round(beside[0] / alone_s, 2) if beside else None,
            "within_2x": bool(beside) and max(beside) <= 2 * alone_s}  # every chat sent beside the long prompt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--long-tokens", type=int, default=5000)
    parser.add_argument("--delay", type=float, default=2.0, help="seconds between the long prompt and the chat")
    parser.add_argument("--repeats", type=int, default=3, help="chats alone, and beside the long prompt")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--out", type=Path, default=Path("fair_prefill.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    with tempfile.TemporaryDirectory(prefix="sinkserve-fair-") as data_dir:
        results = run(args.long_tokens, args.delay, args.repeats, args.timeout, Path(data_dir))
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0 if results["within_2x"] else 1


if __name__ == "__main__":
    sys.exit(main())
