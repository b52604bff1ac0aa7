"""Time to first token of a short follow-up against history length: session reuse vs re-prefill.

A conversation of ``L`` history tokens gets a ``followup_tokens`` (20) token follow-up. Two ways to answer
it through the :class:`~engine.engine.Engine`:

``session``
    sinkserve's sessions: the history was streamed earlier into a session (``generate`` with the same
    ``session_id`` and ``max_tokens=1``, ``feed`` tokens per call, each prompt the whole conversation so far
    so the engine reuses the session's cache). The follow-up then only prefills its new tokens; its time to
    first token should not depend on ``L``.
``reprefill``
    What a server without sessions does: the whole conversation plus the follow-up is prefilled through a
    fresh sink cache (a new owner, so no session matches), i.e. the StreamingLLM streaming cost without
    reuse (arXiv 2309.17453, section 4.5, compares per-token costs; the sliding window with re-computation
    baseline re-encodes for every token, this one once per request). Grows linearly with ``L``.

One session is grown through all lengths in order (the follow-up of a shorter length is rolled back when
the history is extended, as an edited conversation would be). Report (``followup.json``): per length the
TTFT of both ways in ms, the session follow-up's ``cached_tokens``, and ``ratios``: TTFT at the longest
over the shortest length for each way, and reprefill over session per length.

``responses_chain`` (``bench/responses_chain.py``): the same question as a response chained through
``previous_response_id`` over HTTP, its time to first token at each length of the chain behind it.
"""

from __future__ import annotations

import asyncio
import logging
import time

from bench.common import (
    environment,
    history_ids,
    markdown_table,
    pyplot,
    ratio,
    save_figure,
    write_report,
)
from engine.events import FinishEvent, TokenEvent
from engine.sampling import SamplingParams

log = logging.getLogger(__name__)

LENGTHS = (500, 2_000, 8_000, 20_000, 50_000)
QUICK_LENGTHS = (500, 2_000)
FOLLOWUP_TOKENS = 20


async def first_token(engine, prompt: list[int], *, api_key: str, session_id: str | None) -> dict:
    """Send ``prompt`` (max_tokens=1, greedy); seconds to the first token and the finish usage."""
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    generation = await engine.generate(prompt, params, api_key=api_key, session_id=session_id)
    ttft = None
    finish = None
    async for event in generation:
        if isinstance(event, TokenEvent) and ttft is None:
            ttft = time.perf_counter() - start
        elif isinstance(event, FinishEvent):
            finish = event
    if finish is None or finish.finish_reason == "error":
        raise RuntimeError(f"generation failed: {finish.error if finish else 'no finish event'}")
    if ttft is None:
        ttft = time.perf_counter() - start
    return {"ttft_s": ttft, "total_s": time.perf_counter() - start, "cached_tokens": finish.usage.cached_tokens,
            "prompt_tokens": finish.usage.prompt_tokens, "generation": generation}


async def measure_followup_async(engine, lengths=LENGTHS, *, followup_tokens: int = FOLLOWUP_TOKENS,
                                 feed: int = 4096, session_id: str = "bench-followup") -> dict:
    lengths = sorted(set(int(n) for n in lengths))
    ids = history_ids(engine.tokenizer, max(lengths) + followup_tokens)
    results = []
    started = time.perf_counter()
    await first_token(engine, ids[:64], api_key="bench-warmup", session_id=None)  # warm the kernels
    built = 0
    build_s = 0.0
    for length in lengths:
        history = ids[:length]
        followup = history + ids[length : length + followup_tokens]
        begin = time.perf_counter()
        while built < length:  # extend the session, one generate per ``feed`` tokens
            built = min(built + feed, length)
            await first_token(engine, ids[:built], api_key="bench", session_id=session_id)
        build_s += time.perf_counter() - begin
        session = await first_token(engine, followup, api_key="bench", session_id=session_id)
        fresh = await first_token(engine, followup, api_key=f"bench-fresh-{length}", session_id=None)
        await engine.delete_session(f"bench-fresh-{length}", fresh["generation"].session_id)
        results.append({
            "history_tokens": length,
            "followup_tokens": followup_tokens,
            "session": {"ttft_ms": 1e3 * session["ttft_s"], "cached_tokens": session["cached_tokens"],
                        "prompt_tokens": session["prompt_tokens"]},
            "reprefill": {"ttft_ms": 1e3 * fresh["ttft_s"], "cached_tokens": fresh["cached_tokens"],
                          "prompt_tokens": fresh["prompt_tokens"]},
            "session_build_s_so_far": build_s,
        })
        log.info("follow-up after %d tokens: session %.0f ms (%d cached), re-prefill %.0f ms", length,
                 1e3 * session["ttft_s"], session["cached_tokens"], 1e3 * fresh["ttft_s"])
    first, last = results[0], results[-1]
    return {
        "suite": "followup",
        "environment": environment(engine.loaded, engine.config),
        "settings": {"lengths": lengths, "followup_tokens": followup_tokens, "feed_tokens_per_request": feed,
                     "prefill_chunk": engine.config.chunk_size},
        "results": results,
        "ratios": {
            "session_longest_over_shortest": ratio(last["session"]["ttft_ms"], first["session"]["ttft_ms"]),
            "reprefill_longest_over_shortest": ratio(last["reprefill"]["ttft_ms"], first["reprefill"]["ttft_ms"]),
            "reprefill_over_session": {str(r["history_tokens"]): ratio(r["reprefill"]["ttft_ms"], r["session"]["ttft_ms"])
                                       for r in results},
        },
        "seconds": time.perf_counter() - started,
        "notes": ["session: the history lives in the session's sink cache, only the follow-up is prefilled; "
                  "reprefill: the whole conversation is streamed through a fresh sink cache (no sessions)."],
    }


def measure_followup(engine, lengths=LENGTHS, **kwargs) -> dict:
    """Run :func:`measure_followup_async` on a fresh event loop (the engine must be started)."""
    return asyncio.run(measure_followup_async(engine, lengths, **kwargs))


def table(report: dict) -> str:
    rows = [[r["history_tokens"], r["session"]["ttft_ms"], r["session"]["cached_tokens"], r["reprefill"]["ttft_ms"],
             report["ratios"]["reprefill_over_session"][str(r["history_tokens"])]] for r in report["results"]]
    text = markdown_table(["history tokens", "session TTFT ms", "session cached tokens", "re-prefill TTFT ms",
                           "re-prefill / session"], rows)
    r, lengths = report["ratios"], report["settings"]["lengths"]
    text += (f"\nTTFT({lengths[-1]}) / TTFT({lengths[0]}): session {_fmt(r['session_longest_over_shortest'])}x, "
             f"re-prefill {_fmt(r['reprefill_longest_over_shortest'])}x\n")
    if "responses_chain" in report:
        text += responses_table(report)
    return text


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def plot(report: dict, path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    n = [r["history_tokens"] for r in report["results"]]
    ax.plot(n, [r["session"]["ttft_ms"] for r in report["results"]], "o-", label="sinkserve session")
    ax.plot(n, [r["reprefill"]["ttft_ms"] for r in report["results"]], "s--", label="re-prefill (no sessions)")
    if "responses_chain" in report:
        chain = report["responses_chain"]
        ax.plot([r["chain_tokens"] for r in chain], [r["ttft_ms"] for r in chain], "^-",
                label="Responses chain (HTTP, previous_response_id)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("history length (tokens)")
    ax.set_ylabel(f"TTFT of a {report['settings']['followup_tokens']}-token follow-up (ms)")
    ax.set_title(f"Follow-up latency ({report['environment']['model']}, {report['environment']['device']})")
    save_figure(fig, ax, path)


def add_responses_chain(report: dict, engine) -> None:
    """The Responses-chain row: a chained response's TTFT at each length (``bench/responses_chain.py``)."""
    from bench.responses_chain import measure_responses_chain

    rows = measure_responses_chain(engine, report["settings"]["lengths"])
    report["responses_chain"] = rows
    report["ratios"]["responses_longest_over_shortest"] = ratio(rows[-1]["ttft_ms"], rows[0]["ttft_ms"])


def responses_table(report: dict) -> str:
    rows = [[r["chain_tokens"], r["cached_tokens"], r["input_tokens"], r["ttft_ms"]] for r in report["responses_chain"]]
    text = "\nResponses chain (previous_response_id over HTTP):\n\n" + markdown_table(
        ["chain tokens", "cached tokens", "input tokens", "chained response TTFT ms"], rows)
    return text + f"\nTTFT longest / shortest: {_fmt(report['ratios']['responses_longest_over_shortest'])}x\n"


def run_followup(engine, out_dir, quick: bool = False, lengths=None, **kwargs) -> dict:
    report = measure_followup(engine, lengths or (QUICK_LENGTHS if quick else LENGTHS), **kwargs)
    add_responses_chain(report, engine)
    report["files"] = write_report(out_dir, "followup", report, table(report), plot)
    return report
