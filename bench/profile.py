"""Where a decode step's time goes: ms per step for the forward pass, sampling, detokenization and stop
matching, the hand-off of token events, and scheduling/bookkeeping, at batch 1, 8 and 16, through
:meth:`~engine.engine.Engine.generate` (what the HTTP server calls).

The engine carries no timing code. For the length of a run this suite wraps, in this process only:
the scheduler instance's ``step`` (the whole step) and its runner's ``forward`` (split into decode and
prefill passes by the number of tokens per row); the sampling functions the output processor calls
(engine/scheduling/output.py: ``penalize_logits``, ``filter_logits``, ``sample``, ``sample_batch``, ``token_logprobs``); the ``push`` /
``flush`` methods of :class:`~engine.scheduling.stops.IncrementalDetokenizer` and :class:`~engine.scheduling.stops.StopMatcher`;
and ``emit`` of the scheduler's request (the hand-off to the event loop). Everything else a step spends
is "bookkeeping" (batching, cache rows, session sync, finishing); "between" is the time from one step's
end to the next one's start (the worker loop's inbox and admission, and waiting for the GIL). ``perf_counter`` costs
about 0.1 us a call: the clock itself is not measurable at these step sizes. Only pure decode steps
(no prefill chunk in them) at the full batch are counted.

``c`` conversations (distinct owners, ``prompt_tokens`` of the shipped text each) generate
``max_tokens`` tokens with the sampling a client gets when it sends no sampling fields (the served
model's defaults, e.g. the embedded model card's temperature 0.2 and top-p 0.9; temperature 1 for a model
without any) and
``ignore_eos``, all at once; the client side records the mean gap between consecutive token events,
which adds the event loop's wake-up to the worker's step.

Report (``profile.json``): per batch size the median ms per step of each category, its share of the step,
the share outside the forward pass, and the clients' mean inter-token gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
import time
from collections import defaultdict
from collections.abc import Iterator

import engine.scheduling.output as output_module
import engine.scheduling.scheduler as scheduler_module
from bench.common import environment, history_ids, markdown_table, write_report
from engine.events import FinishEvent, TokenEvent
from engine.scheduling.sampling import SamplingParams
from engine.scheduling.stops import IncrementalDetokenizer, StopMatcher

log = logging.getLogger(__name__)

BATCHES = (1, 8, 16)
CATEGORIES = ("forward", "sampling", "detokenize", "handoff", "bookkeeping", "between")
SAMPLING_FUNCTIONS = ("penalize_logits", "filter_logits", "sample", "sample_batch", "token_logprobs")


class StepClock:
    """Per-step time in each category, filled by the wrappers :func:`instrument` installs."""

    def __init__(self) -> None:
        self.steps: list[dict] = []
        self.current: defaultdict | None = None
        self.last_end: float | None = None

    def timed(self, fn, category: str):
        def wrapper(*args, **kwargs):
            if self.current is None:  # outside a step (another thread, or before the run)
                return fn(*args, **kwargs)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.current[category] += time.perf_counter() - start
        return wrapper

    def timed_forward(self, fn):
        def wrapper(rows, tokens, *args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(rows, tokens, *args, **kwargs)
            finally:
                if self.current is not None:
                    decode = tokens.shape[1] == 1
                    self.current["forward" if decode else "prefill"] += time.perf_counter() - start
                    if decode:
                        self.current["batch"] = len(rows)
        return wrapper

    def timed_step(self, fn):
        def wrapper(*args, **kwargs):
            self.current = defaultdict(float)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                record, self.current = self.current, None
                end = time.perf_counter()
                record["step"] = end - start
                record["between"] = start - self.last_end if self.last_end is not None else 0.0
                record["total"] = end - start + record["between"]
                self.last_end = end
                self.steps.append(dict(record))
        return wrapper


@contextlib.contextmanager
def instrument(scheduler) -> Iterator[StepClock]:
    """Wrap the scheduler's step, forward pass, sampling, detokenization and hand-off while inside."""
    clock = StepClock()
    runner = scheduler.runner
    patched: list[tuple[object, str, object]] = []  # (owner, name, original)

    def patch(owner, name: str, wrapper) -> None:
        patched.append((owner, name, owner.__dict__.get(name, _MISSING)))
        setattr(owner, name, wrapper)

    patch(runner, "forward", clock.timed_forward(runner.forward))
    for name in SAMPLING_FUNCTIONS:
        if hasattr(output_module, name):
            patch(output_module, name, clock.timed(getattr(output_module, name), "sampling"))
    for cls in (IncrementalDetokenizer, StopMatcher):
        for name in ("push", "flush"):
            patch(cls, name, clock.timed(getattr(cls, name), "detokenize"))
    patch(scheduler_module.Request, "emit", clock.timed(scheduler_module.Request.emit, "handoff"))
    patch(scheduler, "step", clock.timed_step(scheduler.step))  # last: the worker picks it up at its next step
    try:
        yield clock
    finally:
        for owner, name, original in reversed(patched):
            if original is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, original)


_MISSING = object()


def summarize(steps: list[dict], batch: int) -> dict:
    """Median ms per step of each category over the pure decode steps at ``batch`` rows."""
    decode = [s for s in steps if s.get("batch") == batch and not s.get("prefill")]
    if not decode:
        return {"batch": batch, "steps": 0}
    for s in decode:
        s["bookkeeping"] = s["step"] - sum(s.get(c, 0.0) for c in CATEGORIES if c not in ("bookkeeping", "between"))
    ms = {c: 1e3 * statistics.median(s.get(c, 0.0) for s in decode) for c in (*CATEGORIES, "step", "total")}
    outside = [1 - s.get("forward", 0.0) / s["total"] for s in decode]
    return {"batch": batch, "steps": len(decode), "ms": ms,
            "share": {c: ms[c] / ms["total"] for c in CATEGORIES},
            "outside_forward_share": statistics.median(outside)}


async def _stream(engine, prompt: list[int], params: SamplingParams, api_key: str) -> list[float]:
    generation = await engine.generate(prompt, params, api_key=api_key)
    stamps: list[float] = []
    async for event in generation:
        if isinstance(event, TokenEvent):
            stamps.append(time.perf_counter())
        elif isinstance(event, FinishEvent) and event.finish_reason == "error":
            raise RuntimeError(f"generation failed: {event.error}")
    await engine.delete_session(api_key, generation.session_id)
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


async def measure_profile_async(engine, batches=BATCHES, *, prompt_tokens: int = 64, max_tokens: int = 64) -> dict:
    """Profile ``max_tokens`` decode steps at each batch size (one round each, the sizes in order)."""
    defaults = dict(engine.loaded.sampling_defaults)  # what a request that omits the sampling fields gets
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, **defaults)
    source = history_ids(engine.tokenizer, prompt_tokens * (sum(batches) + 1))
    prompts = iter(source[i : i + prompt_tokens] for i in range(0, len(source), prompt_tokens))
    await _stream(engine, next(prompts), SamplingParams(max_tokens=4, ignore_eos=True), "profile-warmup")
    started = time.perf_counter()
    results = []
    for batch in batches:
        if batch > engine.config.max_batch:
            results.append({"batch": batch, "steps": 0, "skipped": f"max_batch is {engine.config.max_batch}"})
            continue
        with instrument(engine.scheduler) as clock:
            gaps = await asyncio.gather(*(_stream(engine, next(prompts), params, f"profile-{batch}-{i}")
                                          for i in range(batch)))
        result = summarize(clock.steps, batch)
        flat = [g for stream in gaps for g in stream]
        result["client_gap_ms"] = 1e3 * statistics.fmean(flat) if flat else None
        results.append(result)
        if result["steps"]:
            log.info("batch %d: %.1f ms/step, %.0f%% outside the forward pass (%d steps)", batch,
                     result["ms"]["total"], 100 * result["outside_forward_share"], result["steps"])
    return {
        "suite": "profile",
        "environment": environment(engine.loaded, engine.config),
        "settings": {"batches": list(batches), "prompt_tokens": prompt_tokens, "max_tokens": max_tokens,
                     "max_batch": engine.config.max_batch, "sampling": defaults or "temperature 1 (no defaults)"},
        "results": results,
        "seconds": time.perf_counter() - started,
        "notes": [
            "Medians over the pure decode steps at the full batch (no prefill chunk in the step). bookkeeping = "
            "the step minus the measured parts; between = from the previous step's end to this one's start (the "
            "worker loop's inbox and admission, and waiting for the GIL); outside forward = 1 - forward / (step + "
            "between). client gap = mean time between consecutive token events as "
            "Engine.generate's caller receives them (the step plus the event loop's hand-off).",
        ],
    }


def measure_profile(engine, batches=BATCHES, **kwargs) -> dict:
    return asyncio.run(measure_profile_async(engine, batches, **kwargs))


def table(report: dict) -> str:
    rows = []
    for r in report["results"]:
        if not r["steps"]:
            rows.append([r["batch"], *["-"] * (len(CATEGORIES) + 4), r.get("skipped", "no steps")])
            continue
        rows.append([r["batch"], *(r["ms"][c] for c in CATEGORIES), r["ms"]["step"], r["ms"]["total"],
                     f"{100 * r['outside_forward_share']:.0f}%", r["client_gap_ms"], r["steps"]])
    return markdown_table(["batch", *(f"{c} ms" for c in CATEGORIES), "step ms", "step + between ms",
                           "outside forward",
                           "client gap ms", "steps"], rows)


def run_profile(engine, out_dir, quick: bool = False, batches=None, **kwargs) -> dict:
    if quick:
        kwargs.setdefault("max_tokens", 24)
    report = measure_profile(engine, batches or BATCHES, **kwargs)
    report["files"] = write_report(out_dir, "profile", report, table(report), None)
    return report
