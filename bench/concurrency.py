"""Aggregate decode throughput and per-stream latency against the number of concurrent sessions.

``c`` conversations (1, 2, 4, 8, 16) each send a ~``prompt_tokens`` (200) token prompt at once
(``asyncio.gather`` of :meth:`~engine.engine.Engine.generate` calls, distinct owners and texts so no
session is shared) and generate ``max_tokens`` (64) tokens greedily with ``ignore_eos``. The engine
(``max_batch`` 16) prefills them chunk by chunk and decodes all running rows in one batched forward pass
over the sink cache. Every row's cost is bounded by its ``sink_tokens + window`` slots, the property
StreamingLLM's efficiency comparison rests on (arXiv 2309.17453, section 4.5; its baselines, dense
attention and the sliding window with re-computation, are measured in the ``decode`` suite).

Report (``concurrency.json``): per ``c``: aggregate generated tokens/s (all streams' tokens over the wall
time from the first request to the last finish), decode-only tokens/s (from the last stream's first token
on), mean per-stream inter-token latency (ms), mean time to first token; ``ratios``: 8 streams vs 1.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time

from bench.common import environment, history_ids, markdown_table, pyplot, ratio, write_report
from engine.events import FinishEvent, TokenEvent
from engine.scheduling.sampling import SamplingParams

log = logging.getLogger(__name__)

STREAMS = (1, 2, 4, 8, 16)
QUICK_STREAMS = (1, 2, 8)


async def _stream(engine, prompt: list[int], params: SamplingParams, api_key: str) -> dict:
    start = time.perf_counter()
    generation = await engine.generate(prompt, params, api_key=api_key)
    stamps = []
    finish = None
    async for event in generation:
        if isinstance(event, TokenEvent):
            stamps.append(time.perf_counter())
        elif isinstance(event, FinishEvent):
            finish = event
    if finish is None or finish.finish_reason == "error":
        raise RuntimeError(f"generation failed: {finish.error if finish else 'no finish event'}")
    # a token whose text is held back (stop strings, partial UTF-8) still counts in usage
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return {
        "start": start,
        "first": stamps[0] if stamps else None,
        "end": time.perf_counter(),
        "tokens": finish.usage.completion_tokens,
        "itl_s": statistics.fmean(gaps) if gaps else None,
        "session_id": generation.session_id,
    }


async def _round(engine, count: int, prompts, params: SamplingParams, tag: str) -> dict:
    """``count`` conversations at once; their aggregate figures."""
    batch = [next(prompts) for _ in range(count)]
    keys = [f"bench-{tag}-c{count}-{i}" for i in range(count)]
    runs = await asyncio.gather(*(_stream(engine, p, params, k) for p, k in zip(batch, keys, strict=True)))
    for key, run in zip(keys, runs, strict=True):
        await engine.delete_session(key, run["session_id"])
    begin, end = min(r["start"] for r in runs), max(r["end"] for r in runs)
    all_first = max(r["first"] for r in runs if r["first"] is not None)
    itls = [r["itl_s"] for r in runs if r["itl_s"] is not None]
    return {
        "generated_tokens": sum(r["tokens"] for r in runs),
        "wall_s": end - begin,
        "tokens_per_s": sum(r["tokens"] for r in runs) / (end - begin),
        "decode_tokens_per_s": sum(r["tokens"] - 1 for r in runs) / (end - all_first) if end > all_first else None,
        "mean_itl_ms": 1e3 * statistics.fmean(itls) if itls else None,
        "max_itl_ms": 1e3 * max(itls) if itls else None,
        "mean_ttft_ms": 1e3 * statistics.fmean(r["first"] - r["start"] for r in runs),
    }


def _median(rounds: list[dict], key: str):
    values = [r[key] for r in rounds if r[key] is not None]
    return statistics.median(values) if values else None


async def measure_concurrency_async(engine, streams=STREAMS, *, prompt_tokens: int = 200, max_tokens: int = 128,
                                    rounds: int = 3) -> dict:
    """Each stream count ``rounds`` times, the counts interleaved (1, 2, .., 16, 1, 2, ..) so that a slow
    spell of a shared machine does not land on one count only; medians are reported."""
    streams = sorted(set(int(c) for c in streams))
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    source = history_ids(engine.tokenizer, prompt_tokens * (rounds * sum(streams) + 1) + 1)
    prompts = iter(source[i : i + prompt_tokens] for i in range(0, len(source) - prompt_tokens, prompt_tokens))
    started = time.perf_counter()
    await _stream(engine, next(prompts), SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), "bench-warmup")
    measured: dict[int, list[dict]] = {count: [] for count in streams}
    for index in range(rounds):
        for count in streams:
            measured[count].append(await _round(engine, count, prompts, params, f"r{index}"))
            last = measured[count][-1]
            log.info("round %d, %2d streams: %.1f tokens/s (decode phase %.1f), inter-token %.1f ms, TTFT %.0f ms",
                     index + 1, count, last["tokens_per_s"], last["decode_tokens_per_s"] or float("nan"),
                     last["mean_itl_ms"] or float("nan"), last["mean_ttft_ms"])
    keys = ("generated_tokens", "wall_s", "tokens_per_s", "decode_tokens_per_s", "mean_itl_ms", "max_itl_ms",
            "mean_ttft_ms")
    results = [{"streams": count, "rounds": len(runs), **{k: _median(runs, k) for k in keys}, "per_round": runs}
               for count, runs in measured.items()]

    def at(count: int, key: str):
        return next((r[key] for r in results if r["streams"] == count), None)

    hi = 8 if 8 in streams else streams[-1]
    lo = streams[0]
    return {
        "suite": "concurrency",
        "environment": environment(engine.loaded, engine.config),
        "settings": {"streams": streams, "prompt_tokens": prompt_tokens, "max_tokens": max_tokens,
                     "max_batch": engine.config.max_batch, "rounds": rounds},
        "results": results,
        "ratios": {
            "compared": [hi, lo],
            "tokens_per_s": ratio(at(hi, "tokens_per_s"), at(lo, "tokens_per_s")),
            "decode_tokens_per_s": ratio(at(hi, "decode_tokens_per_s"), at(lo, "decode_tokens_per_s")),
            "mean_itl_ms": ratio(at(hi, "mean_itl_ms"), at(lo, "mean_itl_ms")),
        },
        "seconds": time.perf_counter() - started,
        "notes": [
            "tokens/s counts every generated token over the wall time from the first request to the last finish "
            "(prefills of all prompts included); decode-phase tokens/s counts from the moment every stream has its "
            "first token, i.e. while all sessions are generating together. Medians over the rounds.",
        ],
    }


def measure_concurrency(engine, streams=STREAMS, **kwargs) -> dict:
    return asyncio.run(measure_concurrency_async(engine, streams, **kwargs))


def table(report: dict) -> str:
    rows = [[r["streams"], r["tokens_per_s"], r["decode_tokens_per_s"], r["mean_itl_ms"], r["mean_ttft_ms"]]
            for r in report["results"]]
    text = markdown_table(["streams", "tokens/s incl. prefill", "decode-phase tokens/s", "mean inter-token ms",
                           "mean TTFT ms"], rows)
    r = report["ratios"]
    hi, lo = r["compared"]

    def fmt(v) -> str:
        return "-" if v is None else f"{v:.2f}"

    text += (f"\n{hi} vs {lo} streams: decode-phase throughput {fmt(r['decode_tokens_per_s'])}x, throughput with "
             f"prefills {fmt(r['tokens_per_s'])}x, inter-token latency {fmt(r['mean_itl_ms'])}x "
             f"(medians of {report['settings']['rounds']} rounds)\n")
    return text


def plot(report: dict, path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    n = [r["streams"] for r in report["results"]]
    ax.plot(n, [r["decode_tokens_per_s"] for r in report["results"]], "o-", color="tab:blue",
            label="decode-phase tokens/s")
    ax.plot(n, [r["tokens_per_s"] for r in report["results"]], "o:", color="tab:blue", alpha=0.5,
            label="tokens/s with prefills")
    ax.legend(loc="upper left")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent sessions")
    ax.set_ylabel("aggregate tokens/s", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(n, [r["mean_itl_ms"] for r in report["results"]], "s--", color="tab:orange", label="inter-token ms")
    ax2.set_ylabel("mean inter-token latency per stream (ms)", color="tab:orange")
    ax.set_title(f"Concurrency ({report['environment']['model']}, {report['environment']['device']})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_concurrency(engine, out_dir, quick: bool = False, streams=None, **kwargs) -> dict:
    if quick:
        kwargs.setdefault("rounds", 1)
        kwargs.setdefault("max_tokens", 64)
    report = measure_concurrency(engine, streams or (QUICK_STREAMS if quick else STREAMS), **kwargs)
    report["files"] = write_report(out_dir, "concurrency", report, table(report), plot)
    return report
