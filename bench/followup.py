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

Each length gets a session of its own: one stream session is grown through the lengths in order, and at
each length a first follow-up with ``fork=True`` branches a copy of it off (``SessionStore.fork``: a cache
row copy, no re-feeding), which becomes that length's session; the stream session is then deleted. Then
``rounds`` (5) interleaved rounds: in each, every length's session in turn gets a new follow-up (a different
``followup_tokens`` slice of the text after its history each round), so the session rolls the previous
follow-up back and prefills only the new one; its time to first token is recorded. The re-prefill baseline
is one sample per length, after the rounds (it prefills the whole history, which is expensive at 50k).

Report (``followup.json``): per length the session TTFT in ms (``ttft_ms``: the median over the rounds, with
the mean and every sample) and its ``cached_tokens`` (the least over the rounds; each sample's too), the
re-prefill TTFT, and ``ratios``: TTFT at the longest over the shortest length for each way (session: of the
medians), and reprefill over session per length.

``responses_chain`` (``bench/responses_chain.py``): the same question as a response chained through
``previous_response_id`` over HTTP, its time to first token at each length of the chain behind it.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
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
from engine.scheduling.sampling import SamplingParams

log = logging.getLogger(__name__)

LENGTHS = (500, 2_000, 8_000, 20_000, 50_000)
QUICK_LENGTHS = (500, 2_000)
FOLLOWUP_TOKENS = 20
ROUNDS = 5
API_KEY = "bench"


async def first_token(engine, prompt: list[int], *, api_key: str, session_id: str | None, fork: bool = False) -> dict:
    """Send ``prompt`` (max_tokens=1, greedy); seconds to the first token and the finish usage."""
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    generation = await engine.generate(prompt, params, api_key=api_key, session_id=session_id, fork=fork)
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


async def _fork(engine, ids: list[int], length: int, followup: list[int], *, session_id: str) -> tuple[str, dict]:
    """A session of its own holding ``ids[:length]``, branched off ``session_id`` (which holds
    ``ids[:length + 1]``; ``followup`` must not start with ``ids[length]``) by a first follow-up with
    ``fork=True``: the copy's id and that (untimed) follow-up's result."""
    result = await first_token(engine, ids[:length] + followup, api_key=API_KEY, session_id=session_id, fork=True)
    if result["generation"].session_id == session_id:
        raise RuntimeError("the follow-up did not branch off the stream session")
    return result["generation"].session_id, result


async def measure_followup_async(engine, lengths=LENGTHS, *, followup_tokens: int = FOLLOWUP_TOKENS,
                                 feed: int = 4096, rounds: int = ROUNDS, session_id: str = "bench-followup") -> dict:
    lengths = sorted(set(int(n) for n in lengths))
    rounds = max(1, int(rounds))
    spare = 8  # slices to choose the branching follow-up from
    ids = history_ids(engine.tokenizer, max(lengths) + 1 + (rounds + spare) * followup_tokens)

    def slices(length: int) -> list[list[int]]:
        """The follow-ups of a length: slices of the text after its history, the first (which branches its
        session off the stream session) one that diverges from the stream at ``length``, then one per round."""
        after = [ids[length + 1 + k * followup_tokens : length + 1 + (k + 1) * followup_tokens]
                 for k in range(rounds + spare)]
        for k, part in enumerate(after):
            if part[0] != ids[length]:
                return [part] + (after[:k] + after[k + 1 :])[:rounds]
        raise RuntimeError(f"no follow-up diverging from the history at {length} tokens")

    started = time.perf_counter()
    await first_token(engine, ids[:64], api_key="bench-warmup", session_id=None)  # warm the kernels
    # one stream session grown through the lengths; at each, a copy of it becomes that length's session
    sessions: dict[int, str] = {}
    build_s: dict[int, float] = {}
    followups = {length: slices(length) for length in lengths}
    built = 0
    begin = time.perf_counter()
    for length in lengths:
        while built < length + 1:  # extend the stream session, one generate per ``feed`` tokens
            built = min(built + feed, length + 1)
            await first_token(engine, ids[:built], api_key=API_KEY, session_id=session_id)
        sessions[length], forked = await _fork(engine, ids, length, followups[length][0], session_id=session_id)
        build_s[length] = time.perf_counter() - begin
        log.info("session of %d tokens ready after %.1f s (branched with %d cached)", length, build_s[length],
                 forked["cached_tokens"])
    await engine.delete_session(API_KEY, session_id)  # its device row is free again
    samples: dict[int, list[dict]] = {length: [] for length in lengths}
    for r in range(1, rounds + 1):  # each round: every length in turn, a new follow-up for each
        for length in lengths:
            prompt = ids[:length] + followups[length][r]
            result = await first_token(engine, prompt, api_key=API_KEY, session_id=sessions[length])
            if result["generation"].session_id != sessions[length]:
                raise RuntimeError("the follow-up did not continue its session")
            samples[length].append(result)
            log.info("round %d: follow-up after %d tokens, %.0f ms (%d cached)", r, length,
                     1e3 * result["ttft_s"], result["cached_tokens"])
    where = {length: (await engine.get_session(API_KEY, sessions[length]))["location"] for length in lengths}
    results = []
    for length in lengths:  # the re-prefill baseline: one sample per length (a whole history each)
        prompt = ids[:length] + followups[length][rounds]
        fresh = await first_token(engine, prompt, api_key=f"bench-fresh-{length}", session_id=None)
        await engine.delete_session(f"bench-fresh-{length}", fresh["generation"].session_id)
        await engine.delete_session(API_KEY, sessions[length])
        ttfts = [1e3 * s["ttft_s"] for s in samples[length]]
        cached = [s["cached_tokens"] for s in samples[length]]
        results.append({
            "history_tokens": length,
            "followup_tokens": followup_tokens,
            "session": {"ttft_ms": statistics.median(ttfts), "ttft_ms_mean": statistics.fmean(ttfts),
                        "ttft_ms_samples": ttfts, "cached_tokens": min(cached), "cached_tokens_samples": cached,
                        "prompt_tokens": samples[length][-1]["prompt_tokens"], "location": where[length]},
            "reprefill": {"ttft_ms": 1e3 * fresh["ttft_s"], "cached_tokens": fresh["cached_tokens"],
                          "prompt_tokens": fresh["prompt_tokens"], "samples": 1},
            "session_build_s_so_far": build_s[length],
        })
        log.info("follow-up after %d tokens: session median %.0f ms over %d rounds (%d cached), re-prefill %.0f ms",
                 length, results[-1]["session"]["ttft_ms"], rounds, min(cached), 1e3 * fresh["ttft_s"])
    first, last = results[0], results[-1]
    return {
        "suite": "followup",
        "environment": environment(engine.loaded, engine.config),
        "settings": {"lengths": lengths, "followup_tokens": followup_tokens, "feed_tokens_per_request": feed,
                     "rounds": rounds, "prefill_chunk": engine.config.chunk_size},
        "results": results,
        "ratios": {  # session figures are medians over the rounds
            "session_longest_over_shortest": ratio(last["session"]["ttft_ms"], first["session"]["ttft_ms"]),
            "reprefill_longest_over_shortest": ratio(last["reprefill"]["ttft_ms"], first["reprefill"]["ttft_ms"]),
            "reprefill_over_session": {str(r["history_tokens"]): ratio(r["reprefill"]["ttft_ms"], r["session"]["ttft_ms"])
                                       for r in results},
        },
        "seconds": time.perf_counter() - started,
        "notes": ["session: the history lives in the session's sink cache, only the follow-up is prefilled; "
                  "reprefill: the whole conversation is streamed through a fresh sink cache (no sessions).",
                  f"session TTFT: the median of {rounds} follow-ups per length, measured in interleaved rounds "
                  "(each round sends every length's session a new follow-up, in turn; the session rolls the "
                  "previous one back and prefills only the new one). reprefill: one sample per length, after the "
                  "rounds (a whole history each, expensive at long lengths), so its ratios are single points."],
    }


def measure_followup(engine, lengths=LENGTHS, **kwargs) -> dict:
    """Run :func:`measure_followup_async` on a fresh event loop (the engine must be started)."""
    return asyncio.run(measure_followup_async(engine, lengths, **kwargs))


def table(report: dict) -> str:
    rows = [[r["history_tokens"], r["session"]["ttft_ms"], r["session"]["cached_tokens"], r["reprefill"]["ttft_ms"],
             report["ratios"]["reprefill_over_session"][str(r["history_tokens"])]] for r in report["results"]]
    rounds = report["settings"].get("rounds", 1)
    text = markdown_table(["history tokens", f"session TTFT ms (median of {rounds})", "session cached tokens",
                           "re-prefill TTFT ms (1 sample)", "re-prefill / session"], rows)
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
