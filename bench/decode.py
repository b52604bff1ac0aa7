"""Decode cost per generated token against conversation length: sinkserve vs dense vs recompute.

Three ways to keep talking after a conversation of ``L`` tokens (the baselines of StreamingLLM, Xiao et al.
2023, arXiv 2309.17453, section 4.5 "Efficiency Results", Figure 10):

``sinkserve``
    The engine's :class:`~engine.model.runner.Runner` over a :class:`~engine.cache.sink.SinkCache` (``sink_tokens`` +
    ``window`` slots, 4 + 1020 by default) with one row per length plus a stream row. The history is
    streamed through the stream row in big prefill chunks, as a session does, one length after the other;
    when it reaches a length the row is copied into that length's own row (``SinkCache.copy_row``), a
    snapshot of the conversation at ``L`` tokens. Once every length is fed, each snapshot row gets
    ``warmup_steps`` untimed decode steps, then ``decode_steps`` greedy decode steps per length are timed
    one by one in ``rounds`` interleaved rounds: each round times its share of the steps on every length
    in turn, each row continuing its own token stream, so the points are measured side by side rather
    than minutes apart on a host whose speed drifts. The cost should not depend on ``L`` once the window
    is full. With the window full every step that crosses a block boundary evicts a block
    (``evict_block`` tokens, every ``evict_block`` steps), so the longer points, and any point past the
    window, include evictions; that is the steady state of a long conversation.
``dense``
    transformers ``model.generate`` with its default ``DynamicCache``: the whole history is prefilled,
    then ``decode_steps`` tokens are generated; a streamer stamps each token, so prefill and per-token
    decode times come from one call. The cache grows with ``L`` (and positions run past the model's
    trained ``max_position_embeddings``, which the report flags). A length whose prefill is estimated
    (from the last measured run, or the sink cache's prefill rate, scaled by a FLOP count linear +
    quadratic in ``L``) to exceed ``dense_budget_s``, or whose cache would not fit the available memory,
    is skipped and recorded as ``"skipped: <reason>"``.
``recompute``
    The sliding window with re-computation at ``recompute_window`` (1024) tokens: every generated token
    re-encodes the last ``recompute_window`` tokens from scratch (one forward of that many tokens, no
    cache). Its cost depends on ``min(L, recompute_window)`` only, so it is measured once per distinct
    window length with ``recompute_steps`` tokens.

``steps``
    The owned decode step (engine/model/families) against transformers' forward, step for step: a cache of
    ``max(step_rows)`` rows each holding the same history (the shortest length, at most the window), then
    decode steps of 1 and of 8 rows (``step_rows``) alternating between the two over the same rows, in
    ``rounds`` rounds of ``step_count // rounds`` steps each. transformers' forward runs on the model's own
    modules (float weights unless int8 replaced them); the owned step on the weights it serves with. Its
    ratio is ``transformers_over_owned`` per row count. Skipped (with the reason) for a model no owned step
    covers. ``--model DIR`` runs every method on any model directory, e.g. one of
    ``scripts/make_shaped_model.py``'s random models with a real family's shapes.

Report (``decode.json``): per length ``sinkserve`` / ``dense`` / ``recompute`` entries with
``ms_per_token`` (mean), ``ms_per_token_median`` and timing details (sinkserve: also each round's mean),
and ``ratios``: recompute over sinkserve per length, and the longest over the shortest length for sinkserve
(of the means, and ``sinkserve_longest_over_shortest_median`` of the medians) and dense. The dense and
recompute baselines are measured after sinkserve, one length after the other (not interleaved).
"""

from __future__ import annotations

import logging
import statistics
import time

import torch

from bench.common import (
    Timer,
    available_memory_bytes,
    environment,
    history_ids,
    markdown_table,
    peak_rss_bytes,
    pyplot,
    ratio,
    save_figure,
    sync,
    write_report,
)
from engine.cache.sink import SinkCache
from engine.model.loader import LoadedModel
from engine.model.quantize import float_weights
from engine.model.runner import Runner, serving_runner

log = logging.getLogger(__name__)

LENGTHS = (1_000, 8_000, 32_000, 100_000)
QUICK_LENGTHS = (1_000, 4_000)


# ----- a rough cost model, to skip dense runs that would take too long ------------------------------------
def _dims(loaded: LoadedModel) -> tuple[int, int]:
    """(parameters used per token, layers * query width) of the model."""
    config = loaded.model.config.get_text_config()
    embed = loaded.model.get_input_embeddings().weight.numel()
    params = sum(p.numel() for p in loaded.model.parameters()) - embed
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return max(params, 1), config.num_hidden_layers * heads * head_dim


def prefill_flops(loaded: LoadedModel, tokens: int, context_before: int = 0) -> float:
    """FLOPs to feed ``tokens`` tokens after ``context_before`` cached ones (matmuls + causal attention)."""
    params, width = _dims(loaded)
    contexts = tokens * context_before + tokens * (tokens + 1) / 2  # sum of each token's context length
    return 2.0 * params * tokens + 4.0 * width * contexts


# ----- the three methods -------------------------------------------------------------------------------
def _argmax(logits: torch.Tensor) -> int:
    return int(logits.reshape(-1, logits.shape[-1])[-1].argmax())


def sink_decode(loaded: LoadedModel, ids: list[int], lengths: list[int], *, sink_tokens: int, window: int,
                evict_block: int, chunk: int, decode_steps: int, warmup_steps: int = 8, rounds: int = 4,
                compile_decode: bool = False) -> dict[int, dict]:
    """Stream ``ids`` through one sink-cache row, snapshot it at each length into a row of its own, then
    time ``decode_steps`` greedy decode steps per length in ``rounds`` interleaved rounds."""
    rounds = max(1, min(rounds, decode_steps))
    cache = SinkCache(loaded.shape, len(lengths) + 1, sink_tokens + window, sink_tokens, evict_block,
                      loaded.inv_freqs, dtype=loaded.dtype, device=loaded.device)
    runner = serving_runner(loaded.model, cache, loaded.quantize, max_rows=1, compile_decode=compile_decode)
    if compile_decode:
        with Timer(loaded.device) as compiling:
            runner.warm_up()
        log.info("compiled the decode step in %.0f s", compiling.seconds)
    chunk = max(1, min(chunk, window))
    stream = 0  # the row the history is streamed through; length i is snapshot into row i + 1
    fed = 0
    feeds: dict[int, tuple[int, float]] = {}  # length -> (tokens fed to reach it, seconds)
    tokens: dict[int, int] = {}  # length -> the next token to feed its row
    for i, length in enumerate(lengths):
        part = ids[fed:length]
        with Timer(loaded.device) as feed:
            logits = runner.prefill(stream, part, chunk) if part else None
        fed = length
        feeds[length] = (len(part), feed.seconds)
        cache.copy_row(stream, i + 1)
        tokens[length] = _argmax(logits) if logits is not None else ids[length - 1]
        log.info("sinkserve: fed %d tokens up to %d in %.1f s", len(part), length, feed.seconds)
    row_of = {length: i + 1 for i, length in enumerate(lengths)}
    for length in lengths:  # every row warm before any timing
        for _ in range(warmup_steps):
            tokens[length] = _argmax(runner.decode([row_of[length]], [tokens[length]]))
    per_round = [decode_steps // rounds + (1 if r < decode_steps % rounds else 0) for r in range(rounds)]  # >= 1 each
    by_round: dict[int, list[list[float]]] = {length: [] for length in lengths}  # length -> each round's steps
    for share in per_round:
        for length in lengths:  # each length in turn, so drift on the host hits all of them alike
            row, token = row_of[length], tokens[length]
            steps = []
            for _ in range(share):
                start = time.perf_counter()
                token = _argmax(runner.decode([row], [token]))  # .item() inside waits for the device
                steps.append(time.perf_counter() - start)
            by_round[length].append(steps)
            tokens[length] = token
    results: dict[int, dict] = {}
    for length in lengths:
        row, (part, seconds) = row_of[length], feeds[length]
        steps = [step for taken in by_round[length] for step in taken]
        results[length] = {
            "ms_per_token": 1e3 * statistics.fmean(steps),
            "ms_per_token_median": 1e3 * statistics.median(steps),
            "ms_per_token_round_means": [1e3 * statistics.fmean(taken) for taken in by_round[length]],
            "decode_steps": decode_steps,
            "rounds": rounds,
            "stream_tokens": length + warmup_steps + decode_steps,
            "cache_tokens": cache.lengths[row],
            "evicted_tokens": cache.evicted[row],
            "cache_bytes": cache.row_bytes_used(row),
            "history_feed_s": seconds,
            "history_feed_tokens": part,
            "history_feed_tokens_per_s": part / seconds if part and seconds else None,
        }
        log.info("sinkserve: %d tokens, %.1f ms/token mean, %.1f median over %d rounds", length,
                 results[length]["ms_per_token"], results[length]["ms_per_token_median"], rounds)
    return results


class _Stamps:
    """A ``generate`` streamer that only records when each put happens (the prompt first, then tokens)."""

    def __init__(self, device) -> None:
        self.device = device
        self.times: list[float] = []

    def put(self, value) -> None:
        sync(self.device)
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def dense_decode(loaded: LoadedModel, ids: list[int], length: int, decode_steps: int) -> dict:
    """``model.generate`` (default DynamicCache, greedy) on the first ``length`` ids: prefill and decode times."""
    model = loaded.model
    prompt = torch.tensor([ids[:length]], device=loaded.device)
    stamps = _Stamps(loaded.device)
    pad = next(iter(loaded.eos_token_ids), 0)
    sync(loaded.device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=decode_steps,
                             min_new_tokens=decode_steps, do_sample=False, streamer=stamps, pad_token_id=pad)
    generated = out.shape[1] - length
    if len(stamps.times) < 3 or generated < 2:
        raise RuntimeError(f"generate produced {generated} tokens")
    prefill_s = stamps.times[1] - start
    decode_s = stamps.times[-1] - stamps.times[1]
    gaps = [b - a for a, b in zip(stamps.times[1:], stamps.times[2:], strict=False)]
    return {
        "ms_per_token": 1e3 * decode_s / (generated - 1),
        "ms_per_token_median": 1e3 * statistics.median(gaps),
        "decode_steps": generated,
        "prefill_s": prefill_s,
        "prefill_tokens_per_s": length / prefill_s if prefill_s else None,
        "cache_bytes": (length + generated) * loaded.shape.bytes_per_token(loaded.dtype),
        "beyond_trained_positions": length + generated > loaded.max_positions,
        "peak_rss_bytes": peak_rss_bytes(),
    }


def recompute_decode(loaded: LoadedModel, ids: list[int], length: int, window: int, steps: int) -> dict:
    """Sliding window with re-computation: each token re-encodes the last ``window`` tokens, no cache."""
    context = list(ids[max(0, length - window) : length])
    times = []
    with torch.inference_mode():
        for _ in range(steps):
            start = time.perf_counter()
            logits = loaded.model(input_ids=torch.tensor([context], device=loaded.device), logits_to_keep=1).logits
            token = _argmax(logits)
            times.append(time.perf_counter() - start)
            context = (context + [token])[-window:]
    return {
        "ms_per_token": 1e3 * statistics.fmean(times),
        "ms_per_token_median": 1e3 * statistics.median(times),
        "decode_steps": steps,
        "tokens_per_forward": min(length, window),
    }


def step_comparison(loaded: LoadedModel, rows=(1, 8), *, history: int, sink_tokens: int, window: int,
                    evict_block: int, chunk: int, step_count: int = 12, rounds: int = 3) -> dict:
    """ms per decode step of ``rows`` rows on the owned step and on transformers' forward, over the same
    cache rows holding ``history`` tokens each, the two alternating (see the module docstring)."""
    most = max(rows)
    cache = SinkCache(loaded.shape, most, sink_tokens + window, sink_tokens, evict_block, loaded.inv_freqs,
                      dtype=loaded.dtype, device=loaded.device)
    owned = serving_runner(loaded.model, cache, loaded.quantize, max_rows=most)
    if owned.decoder is None:
        return {"skipped": f"no owned decode step covers model type {loaded.model.config.model_type!r}"}
    runners = {"owned": owned, "transformers": Runner(loaded.model, cache)}
    ids = history_ids(loaded.tokenizer, max(1, min(history, window)))
    for row in range(most):
        owned.prefill(row, ids, max(1, min(chunk, window)))
    tokens = [ids[-1]] * most
    rounds = max(1, min(rounds, step_count))
    per_round = max(1, step_count // rounds)
    results: dict[str, dict] = {}
    for n in rows:
        times: dict[str, list[float]] = {name: [] for name in runners}
        for r in range(rounds + 1):  # the first round warms up
            order = list(runners.items()) if r % 2 else list(reversed(runners.items()))
            for name, runner in order:
                for _ in range(per_round):
                    sync(loaded.device)
                    start = time.perf_counter()
                    logits = runner.decode(list(range(n)), tokens[:n])
                    tokens[:n] = logits.argmax(-1).tolist()  # waits for the device
                    if r:
                        times[name].append(time.perf_counter() - start)
        entry = {name: {"ms_per_step": 1e3 * statistics.fmean(t), "ms_per_step_median": 1e3 * statistics.median(t),
                        "ms_per_token": 1e3 * statistics.fmean(t) / n, "steps": len(t)} for name, t in times.items()}
        entry["transformers_over_owned"] = ratio(entry["transformers"]["ms_per_step"], entry["owned"]["ms_per_step"])
        entry["transformers_over_owned_median"] = ratio(entry["transformers"]["ms_per_step_median"],
                                                        entry["owned"]["ms_per_step_median"])
        results[str(n)] = entry
        log.info("steps of %d rows: owned %.1f ms, transformers' forward %.1f ms (%.2fx)", n,
                 entry["owned"]["ms_per_step"], entry["transformers"]["ms_per_step"], entry["transformers_over_owned"])
    return {"rows": results, "history_tokens": len(ids), "cache_tokens": cache.lengths[0],
            "family": owned.model_info()["family"], "owned_weights": loaded.quantize or str(loaded.dtype)}


# ----- the suite ---------------------------------------------------------------------------------------
def _estimate_dense(loaded: LoadedModel, length: int, reference: tuple[float, float] | None) -> float | None:
    """Seconds a dense prefill of ``length`` tokens should take, from (FLOPs, seconds) of a measured run."""
    if reference is None:
        return None
    flops, seconds = reference
    return seconds * prefill_flops(loaded, length) / flops


def measure_decode(loaded: LoadedModel, lengths=LENGTHS, *, sink_tokens: int = 4, window: int = 1020,
                   evict_block: int = 64, chunk: int = 512, decode_steps: int = 32, recompute_window: int = 1024,
                   recompute_steps: int = 3, dense_budget_s: float = 120.0,
                   methods=("sinkserve", "steps", "dense", "recompute"), compile_decode: bool = False,
                   rounds: int = 4, step_rows=(1, 8), step_count: int = 12) -> dict:
    """Time the decode of each method at each history length; a JSON-ready report."""
    lengths = sorted(set(int(n) for n in lengths))
    ids = history_ids(loaded.tokenizer, max(lengths))
    started = time.perf_counter()
    sink = {}
    if "sinkserve" in methods:
        sink = sink_decode(loaded, ids, lengths, sink_tokens=sink_tokens, window=window, evict_block=evict_block,
                           chunk=chunk, decode_steps=decode_steps, rounds=rounds, compile_decode=compile_decode)
    steps = None
    if "steps" in methods:
        steps = step_comparison(loaded, step_rows, history=lengths[0], sink_tokens=sink_tokens, window=window,
                                evict_block=evict_block, chunk=chunk, step_count=step_count,
                                rounds=min(rounds, 3))
    reference = None  # (FLOPs, seconds) of the latest prefill, to estimate the next dense one
    first = sink.get(lengths[0])
    if first and first["history_feed_s"]:
        fed = lengths[0]
        reference = (sum(prefill_flops(loaded, min(chunk, window), min(i, window))
                         for i in range(0, fed, min(chunk, window))), first["history_feed_s"])
    dense: dict[int, dict | str] = {}
    recompute: dict[int, dict] = {}
    by_window: dict[int, dict] = {}
    with float_weights(loaded.model):  # the baselines are plain transformers on float32 weights
        for length in lengths:
            if "dense" in methods:
                estimate = _estimate_dense(loaded, length, reference)
                need = length * loaded.shape.bytes_per_token(loaded.dtype) * 2  # the cache, plus as much again
                free = available_memory_bytes() if loaded.device.type == "cpu" else None
                if estimate is not None and estimate > dense_budget_s:
                    dense[length] = f"skipped: prefill estimated at {estimate:.0f} s > budget {dense_budget_s:.0f} s"
                elif free is not None and need > free:
                    dense[length] = f"skipped: needs about {need / 1e9:.1f} GB, {free / 1e9:.1f} GB available"
                else:
                    try:
                        dense[length] = dense_decode(loaded, ids, length, decode_steps)
                        dense[length]["estimated_prefill_s"] = estimate
                        reference = (prefill_flops(loaded, length), dense[length]["prefill_s"])
                    except (RuntimeError, MemoryError) as exc:  # out of memory, or the model gave up
                        dense[length] = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
                entry = dense[length]
                if isinstance(entry, str):
                    log.info("dense: %d tokens, %s", length, entry)
                else:
                    log.info("dense: %d tokens, %.1f ms/token, prefill %.1f s", length, entry["ms_per_token"],
                             entry["prefill_s"])
            if "recompute" in methods:
                span = min(length, recompute_window)
                if span not in by_window:
                    by_window[span] = recompute_decode(loaded, ids, length, recompute_window, recompute_steps)
                    by_window[span]["measured_at"] = length
                    log.info("recompute: window %d, %.1f ms/token", span, by_window[span]["ms_per_token"])
                recompute[length] = by_window[span]

    def ms(table: dict, length: int, key: str = "ms_per_token") -> float | None:
        entry = table.get(length)
        return entry[key] if isinstance(entry, dict) else None

    measured_dense = [n for n in lengths if ms(dense, n) is not None]
    report = {
        "suite": "decode",
        "environment": environment(loaded, None),
        "settings": {
            "lengths": lengths, "sink_tokens": sink_tokens, "window": window, "evict_block": evict_block,
            "chunk": chunk, "decode_steps": decode_steps, "rounds": rounds, "recompute_window": recompute_window,
            "recompute_steps": recompute_steps, "dense_budget_s": dense_budget_s,
            "model_max_positions": loaded.max_positions, "compile_decode": compile_decode,
            "step_rows": list(step_rows), "step_count": step_count,
        },
        "steps": steps,
        "results": [
            {"history_tokens": n, "sinkserve": sink.get(n), "dense": dense.get(n), "recompute": recompute.get(n)}
            for n in lengths
        ],
        "ratios": {
            "recompute_over_sinkserve": {str(n): ratio(ms(recompute, n), ms(sink, n)) for n in lengths},
            "sinkserve_longest_over_shortest": ratio(ms(sink, lengths[-1]), ms(sink, lengths[0])),
            "sinkserve_longest_over_shortest_median": ratio(ms(sink, lengths[-1], "ms_per_token_median"),
                                                            ms(sink, lengths[0], "ms_per_token_median")),
            "dense_longest_measured_over_shortest": (
                ratio(ms(dense, measured_dense[-1]), ms(dense, measured_dense[0])) if measured_dense else None),
            "dense_longest_measured": measured_dense[-1] if measured_dense else None,
        },
        "seconds": time.perf_counter() - started,
        "notes": [
            f"sinkserve: one row streamed through the lengths, snapshot into a row per length; {decode_steps} "
            f"decode steps per length in {rounds} interleaved rounds (each round times every length in turn), "
            "so host drift hits all lengths alike; ratios from means and from medians. A full window evicts a "
            f"block of {evict_block} tokens every {evict_block} steps, at every length past the window.",
            "Baselines as in StreamingLLM (arXiv 2309.17453, section 4.5): dense = transformers generate with "
            "its growing DynamicCache; recompute = sliding window of "
            f"{recompute_window} tokens re-encoded for every generated token. Both run on the float32 "
            "weights; sinkserve decodes with the weights the engine serves with (environment.quantize_in_effect).",
            f"The model was trained on {loaded.max_positions} positions; dense runs past that are flagged "
            "beyond_trained_positions (they still run, with growing memory and time).",
        ],
    }
    return report


def table(report: dict) -> str:
    rows = []
    for entry in report["results"]:
        n = entry["history_tokens"]
        rows.append([n, _cell(entry, "sinkserve"), _cell(entry, "dense"), _cell(entry, "recompute"),
                     report["ratios"]["recompute_over_sinkserve"].get(str(n))])
    text = markdown_table(["history tokens", "sinkserve ms/token", "dense (generate) ms/token",
                           "recompute ms/token", "recompute / sinkserve"], rows)
    r = report["ratios"]
    text += (f"\nsinkserve {report['settings']['lengths'][-1]} vs {report['settings']['lengths'][0]} tokens: "
             f"{_fmt(r['sinkserve_longest_over_shortest'])}x (means), "
             f"{_fmt(r.get('sinkserve_longest_over_shortest_median'))}x (medians, "
             f"{report['settings'].get('rounds', 1)} interleaved rounds); dense {r['dense_longest_measured']} vs "
             f"{report['settings']['lengths'][0]}: {_fmt(r['dense_longest_measured_over_shortest'])}x\n")
    steps = report.get("steps")
    if steps and "rows" in steps:
        text += "\n" + markdown_table(
            ["rows", "owned step ms/step", "transformers' forward ms/step", "transformers / owned"],
            [[n, round(e["owned"]["ms_per_step"], 2), round(e["transformers"]["ms_per_step"], 2),
              e["transformers_over_owned"]] for n, e in steps["rows"].items()])
        text += f"\nowned step ({steps['family']}, {steps['owned_weights']}) against transformers' forward over " \
                f"the same rows of {steps['history_tokens']} tokens\n"
    elif steps:
        text += f"\nowned step against transformers' forward: {steps['skipped']}\n"
    return text


def _cell(entry: dict, method: str):
    value = entry.get(method)
    if value is None:
        return None
    return value if isinstance(value, str) else round(value["ms_per_token"], 2)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def plot(report: dict, path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, style in (("sinkserve", "o-"), ("dense", "s--"), ("recompute", "^:")):
        points = [(e["history_tokens"], e[method]["ms_per_token"]) for e in report["results"]
                  if isinstance(e.get(method), dict)]
        if points:
            ax.plot(*zip(*points, strict=True), style, label=method)
        skipped = [e["history_tokens"] for e in report["results"] if isinstance(e.get(method), str)]
        for n in skipped:
            ax.axvline(n, color="grey", alpha=0.15)
    ax.axvline(report["settings"]["model_max_positions"], color="red", alpha=0.4, linestyle="--",
               label="model's trained positions")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("conversation length (tokens)")
    ax.set_ylabel("ms per generated token")
    ax.set_title(f"Decode cost ({report['environment']['model']}, {report['environment']['device']})")
    save_figure(fig, ax, path)


def run_decode(loaded: LoadedModel, out_dir, quick: bool = False, lengths=None, **kwargs) -> dict:
    report = measure_decode(loaded, lengths or (QUICK_LENGTHS if quick else LENGTHS), **kwargs)
    report["files"] = write_report(out_dir, "decode", report, table(report), plot)
    return report
