"""What constrained decoding costs: tokens/s of 8 sessions under a JSON-schema grammar against the same 8
without one, in one run.

Each round starts ``sessions`` (8) conversations at once through :meth:`~engine.engine.Engine.generate`
(distinct owners and prompts, so no session is shared), greedy, ``max_tokens`` (96) each. The constrained
rounds give every generation its own matcher of one JSON schema (``engine.constraint``, compiled once and
cached, as the server does per request); the schema asks for an array of at least 64 objects, so no
constrained reply can end before ``max_tokens`` and both kinds of round generate the same number of
tokens (the free rounds ignore end-of-sequence). Per step the scheduler fills one batch bitmask for the
constrained rows (llguidance, ``engine/scheduling/grammar.py``), applies it to their logits and advances each
matcher with the sampled token: that work is what this suite measures. Free and constrained rounds
alternate (free first in even rounds, constrained first in odd ones) so a slow spell of a shared machine
does not land on one kind only; medians are reported.

Report (``constrained.json``): per kind, tokens/s including prefill (every generated token over the wall
time from the first request to the last finish) and decode-phase tokens/s (from the moment every stream
has its first token); ``cost``: 1 - constrained / free for both.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time

from bench.common import environment, history_ids, markdown_table, ratio, write_report
from engine.events import FinishEvent, TokenEvent
from engine.scheduling.grammar import Grammar
from engine.scheduling.sampling import SamplingParams

log = logging.getLogger(__name__)

SCHEMA = {  # nested objects, an array, enums, required fields, no additional properties
    "type": "object",
    "properties": {
        "rows": {"type": "array", "minItems": 64, "items": {
            "type": "object",
            "properties": {"word": {"type": "string", "maxLength": 12}, "kind": {"enum": ["noun", "verb", "other"]},
                           "count": {"type": "integer", "minimum": 0, "maximum": 999}},
            "required": ["word", "kind", "count"], "additionalProperties": False}},
    },
    "required": ["rows"],
    "additionalProperties": False,
}
KINDS = ("free", "constrained")
JSON_START = '{"rows": [{"word": "'  # how every constrained reply begins (compact JSON, schema order)


async def _stream(engine, prompt: list[int], params: SamplingParams, api_key: str, grammar: Grammar | None) -> dict:
    start = time.perf_counter()
    constraint = await engine.constraint(grammar) if grammar is not None else None
    generation = await engine.generate(prompt, params, api_key=api_key, constraint=constraint)
    stamps, text, finish = [], [], None
    async for event in generation:
        text.append(event.text)
        if isinstance(event, TokenEvent):
            stamps.append(time.perf_counter())
        elif isinstance(event, FinishEvent):
            finish = event
    if finish is None or finish.finish_reason == "error":
        raise RuntimeError(f"generation failed: {finish.error if finish else 'no finish event'}")
    return {"start": start, "first": stamps[0] if stamps else None, "end": time.perf_counter(),
            "tokens": finish.usage.completion_tokens, "session_id": generation.session_id, "text": "".join(text)}


async def _round(engine, prompts, params: SamplingParams, kind: str, tag: str) -> dict:
    grammar = Grammar.json_schema(SCHEMA) if kind == "constrained" else None
    keys = [f"bench-{tag}-{kind}-{i}" for i in range(len(prompts))]
    runs = await asyncio.gather(*(_stream(engine, p, params, k, grammar) for p, k in zip(prompts, keys, strict=True)))
    for key, run in zip(keys, runs, strict=True):
        await engine.delete_session(key, run["session_id"])
        if grammar is not None and not run["text"].startswith(JSON_START[: len(run["text"])]):
            raise RuntimeError(f"a constrained reply does not follow the schema: {run['text'][:80]!r}")
    begin, end = min(r["start"] for r in runs), max(r["end"] for r in runs)
    all_first = max(r["first"] for r in runs if r["first"] is not None)
    tokens = sum(r["tokens"] for r in runs)
    return {"generated_tokens": tokens, "wall_s": end - begin, "tokens_per_s": tokens / (end - begin),
            "decode_tokens_per_s": sum(r["tokens"] - 1 for r in runs) / (end - all_first) if end > all_first else None}


async def measure_constrained_async(engine, *, sessions: int = 8, prompt_tokens: int = 64, max_tokens: int = 96,
                                    rounds: int = 3) -> dict:
    started = time.perf_counter()
    free = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    bounded = SamplingParams(max_tokens=max_tokens, temperature=0.0)  # the grammar cannot end before max_tokens
    source = history_ids(engine.tokenizer, prompt_tokens * (2 * rounds * sessions + 2))
    chunks = iter(source[i : i + prompt_tokens] for i in range(0, len(source) - prompt_tokens + 1, prompt_tokens))
    await _round(engine, [next(chunks)], SamplingParams(max_tokens=4, temperature=0.0), "constrained", "warmup")
    measured: dict[str, list[dict]] = {kind: [] for kind in KINDS}
    for index in range(rounds):
        for kind in (KINDS if index % 2 == 0 else KINDS[::-1]):
            prompts = [next(chunks) for _ in range(sessions)]
            result = await _round(engine, prompts, bounded if kind == "constrained" else free, kind, f"r{index}")
            measured[kind].append(result)
            log.info("round %d, %s: %.1f tokens/s (decode phase %.1f), %d tokens", index + 1, kind,
                     result["tokens_per_s"], result["decode_tokens_per_s"] or float("nan"), result["generated_tokens"])
    keys = ("generated_tokens", "wall_s", "tokens_per_s", "decode_tokens_per_s")
    results = {kind: {**{k: statistics.median(r[k] for r in runs if r[k] is not None) for k in keys},
                      "per_round": runs} for kind, runs in measured.items()}

    def cost(key: str):
        share = ratio(results["constrained"][key], results["free"][key])
        return None if share is None else 1.0 - share

    return {
        "suite": "constrained",
        "environment": environment(engine.loaded, engine.config),
        "settings": {"sessions": sessions, "prompt_tokens": prompt_tokens, "max_tokens": max_tokens,
                     "rounds": rounds, "max_batch": engine.config.max_batch, "schema": SCHEMA},
        "results": results,
        "cost": {"tokens_per_s": cost("tokens_per_s"), "decode_tokens_per_s": cost("decode_tokens_per_s")},
        "seconds": time.perf_counter() - started,
        "notes": [
            "cost = 1 - constrained / free tokens/s (medians over the rounds); both kinds generate max_tokens "
            "tokens per session, greedily; the constrained rows each carry a JSON-schema matcher (llguidance).",
        ],
    }


def measure_constrained(engine, **kwargs) -> dict:
    return asyncio.run(measure_constrained_async(engine, **kwargs))


def table(report: dict) -> str:
    rows = [[kind, r["tokens_per_s"], r["decode_tokens_per_s"], r["generated_tokens"]]
            for kind, r in report["results"].items()]
    text = markdown_table(["rows", "tokens/s incl. prefill", "decode-phase tokens/s", "tokens a round"], rows)
    c, s = report["cost"], report["settings"]

    def pct(v) -> str:
        return "-" if v is None else f"{100 * v:.1f}%"

    text += (f"\n{s['sessions']} sessions, {s['max_tokens']} tokens each: constrained decoding costs "
             f"{pct(c['decode_tokens_per_s'])} of decode-phase throughput, {pct(c['tokens_per_s'])} with prefills "
             f"(medians of {s['rounds']} interleaved rounds)\n")
    return text


def run_constrained(engine, out_dir, quick: bool = False, sessions: int | None = None, **kwargs) -> dict:
    if quick:
        kwargs.setdefault("rounds", 2)
        kwargs.setdefault("max_tokens", 64)
    report = measure_constrained(engine, sessions=sessions or 8, **kwargs)
    report["files"] = write_report(out_dir, "constrained", report, table(report), None)
    return report
