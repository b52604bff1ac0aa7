"""Follow-up time to first token as a stateless ``openai`` client sees it, after 500 and 50,000 tokens.

The client resends the whole history every turn (no session id): the server must find the session by
token prefix and feed only the follow-up. For each history length: turn 1 sends the history as one user
message (max_tokens 1); turn 2 resends it with the reply and a ~20-token question, streaming, and the
time to its first content chunk is measured; ``cached_tokens`` should equal turn 1's whole stream.
A fresh client on a new session (the same turn-2 messages with a different API key) gives the
re-prefill baseline. Loopback only: it starts ``sinkserve serve`` itself on 127.0.0.1.

    .venv/bin/python scripts/followup_openai.py --out docs/results/followup-openai
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from openai import OpenAI

from bench.common import history_ids
from bench.serve_process import ServerProcess
from engine.config import EngineConfig
from engine.model.loader import load_tokenizer

QUESTION = "Now summarise, in two short sentences, what happened in the text above and who spoke last?"


def first_chunk(client: OpenAI, messages: list[dict]) -> tuple[float, int, int]:
    """Seconds to the first content chunk, cached prompt tokens, prompt tokens."""
    start = time.perf_counter()
    ttft = None
    stream = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages, max_tokens=4,
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if ttft is None and chunk.choices and chunk.choices[0].delta.content:
            ttft = time.perf_counter() - start
        if chunk.usage:
            usage = chunk.usage
    return ttft, usage.prompt_tokens_details.cached_tokens, usage.prompt_tokens


def measure(lengths: list[int]) -> list[dict]:
    tokenizer = load_tokenizer(None, EngineConfig().cache_dir)
    keys = ["session-key", "fresh-key"]
    rows = []
    with tempfile.TemporaryDirectory() as data, ServerProcess(Path(data), keys=keys) as server:
        session = OpenAI(base_url=f"{server.url}/v1", api_key=keys[0], timeout=600)
        fresh = OpenAI(base_url=f"{server.url}/v1", api_key=keys[1], timeout=600)
        for i, length in enumerate(lengths):
            text = tokenizer.decode(history_ids(tokenizer, length, offset=1000 * i))
            history = [{"role": "user", "content": text}]
            first = session.chat.completions.create(model="SmolLM2-135M-Instruct", messages=history,
                                                    max_tokens=1, temperature=0)
            history += [{"role": "assistant", "content": first.choices[0].message.content},
                        {"role": "user", "content": QUESTION}]
            ttft, cached, prompt = first_chunk(session, history)
            fresh_ttft, fresh_cached, _ = first_chunk(fresh, history)
            rows.append({"history_tokens": first.usage.prompt_tokens, "previous_stream": first.usage.prompt_tokens,
                         "followup_prompt_tokens": prompt, "cached_tokens": cached, "ttft_s": ttft,
                         "reprefill_ttft_s": fresh_ttft, "reprefill_cached_tokens": fresh_cached})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="500,50000")
    parser.add_argument("--out", default="results/followup-openai")
    args = parser.parse_args()
    rows = measure([int(x) for x in args.lengths.split(",")])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "followup_openai.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = ["| history tokens | cached tokens (previous stream) | session TTFT ms | re-prefill TTFT ms |",
             "|---:|---:|---:|---:|"]
    lines += [f"| {r['history_tokens']} | {r['cached_tokens']} ({r['previous_stream']}) | {r['ttft_s'] * 1000:.0f} | "
              f"{r['reprefill_ttft_s'] * 1000:.0f} |" for r in rows]
    lines.append(f"\nTTFT ratio last/first: {rows[-1]['ttft_s'] / rows[0]['ttft_s']:.2f}x")
    (out / "followup_openai.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
