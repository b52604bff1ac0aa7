"""Streaming perplexity of a long text under four cache policies (StreamingLLM, Figure 3).

The text is tokenized once and fed left to right in chunks of at most ``chunk`` tokens. Every token but
the first is scored by the negative log-likelihood the model gave it when predicting it from what came
before, as the cache policy lets it see that past:

``sink``
    :class:`~engine.cache.sink.SinkCache` with ``sink_tokens`` pinned tokens and a rolling ``window``; the
    engine's own runner (in-cache positions, block eviction and key re-rotation).
``window``
    The same cache with no sinks (``sink_tokens=0``) and the same window: plain window attention, whose
    perplexity blows up once the first tokens leave the cache.
``dense``
    A cache that never evicts (capacity ``tokens + 1``): full attention over the whole text. Position ids
    run past the model's trained ``max_position_embeddings`` (RoPE is computed for any position); the
    result is reported as it is, and the plot marks where the model's positions end.
``recompute``
    The oracle ("sliding window with re-computation"): for each block of at most ``chunk`` tokens, the
    tokens the sink cache would hold at that moment (its pinned first ``sink_tokens`` tokens plus its window)
    are re-encoded from scratch together with the block by a plain ``model(input_ids)`` forward, with
    positions 0.. as in the cache, and the block's predictions are scored. Which tokens the cache holds is
    not re-derived: a :class:`~engine.cache.sink.SinkCache` with zero layers (bookkeeping only, no tensors) is
    stepped alongside, so its ``make_room`` (pinned sinks, capacity ``sink_tokens + window``, eviction of
    whole ``evict_block`` blocks, rounded up) decides exactly as in ``sink`` mode. ``sink`` and ``recompute``
    therefore see the same tokens at the same positions; they differ only in that the sink cache keeps the
    keys and values each token got when it was first seen (with earlier context, since evicted), while the
    oracle recomputes them within the current context.

Scoring is aligned with the chunks: the predictions made by the positions of a chunk (of its tokens
``p..p+n-1``, predicting tokens ``p+1..p+n``) are scored with the cache state that chunk was fed with, in
every mode. So the first token of a chunk is predicted by the last token of the previous chunk, with the
previous chunk's context, exactly as a server streaming the text would have predicted it.

Outputs (``run_ppl``): ``ppl.json`` (per mode: ``ppl``, ``segments`` = perplexity of each consecutive
1024-token segment, ``tokens``, ``seconds``, ``peak_cache_bytes`` and ``cache_bytes_trace`` =
``[tokens_seen, cache_bytes]`` every 1024 tokens), ``ppl.png`` (log-perplexity per segment, one line per
mode) and ``ppl.md`` (a summary table).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.cache.sink import CacheShape, SinkCache
from engine.config import EngineConfig
from engine.model.loader import LoadedModel, load
from engine.model.runner import serving_runner

log = logging.getLogger(__name__)

MODES = ("sink", "window", "dense", "recompute")
SEGMENT = 1024  # tokens per perplexity segment and between cache-size samples
DEFAULT_TEXT = Path(__file__).resolve().parent.parent / "data" / "tinyshakespeare.txt"


# ----- text ----------------------------------------------------------------------------------------------
def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (stand-in test tokenizers lack the keyword)."""
    try:
        return list(tokenizer.encode(text, add_special_tokens=False))
    except TypeError:  # a stand-in tokenizer without the keyword
        return list(tokenizer.encode(text))


def text_ids(tokenizer, text_path: str | Path, tokens: int) -> list[int]:
    """The first ``tokens`` token ids of the text (no special tokens added).

    Only a prefix of the text is tokenized (grown until it yields enough tokens with a margin, so the cut
    in the middle of a word cannot change the tokens kept).
    """
    text = Path(text_path).read_text(encoding="utf-8")
    chars = tokens * 6 + 256
    while True:
        ids = encode_text(tokenizer, text[:chars])
        if chars >= len(text) or len(ids) >= tokens + 16:
            break
        chars *= 2
    if len(ids) < tokens:
        raise ValueError(f"{text_path} has only {len(ids)} tokens, fewer than the {tokens} asked for")
    return ids[:tokens]


# ----- scoring -------------------------------------------------------------------------------------------
class _Scores:
    """NLL of each token of the stream, filled in as the chunks predicting them run."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = torch.tensor(ids, dtype=torch.long)
        self.nll = torch.full((len(ids),), float("nan"), dtype=torch.float64)

    def add(self, start: int, logits: torch.Tensor) -> None:
        """``logits`` (T, V) of positions ``start..start+T-1``, predicting tokens ``start+1..start+T``."""
        stop = min(start + logits.shape[0], len(self.ids) - 1)  # the last token predicts nothing scored
        count = stop - start
        if count <= 0:
            return
        targets = self.ids[start + 1 : stop + 1]
        nll = F.cross_entropy(logits[:count].float(), targets.to(logits.device), reduction="none")
        self.nll[start + 1 : stop + 1] = nll.double().cpu()

    def summary(self) -> dict:
        scored = self.nll[1:]
        if torch.isnan(scored).any():
            raise RuntimeError("some tokens were never scored")
        segments, ends = [], []
        for begin in range(0, len(self.nll), SEGMENT):
            part = self.nll[max(begin, 1) : begin + SEGMENT]
            if len(part):
                segments.append(math.exp(part.mean().item()))
                ends.append(min(begin + SEGMENT, len(self.nll)))
        return {
            "ppl": math.exp(scored.mean().item()) if len(scored) else float("nan"),
            "nll": scored.mean().item() if len(scored) else float("nan"),
            "segments": segments,
            "segment_ends": ends,
            "scored_tokens": len(scored),
        }


class _Trace:
    """``[tokens_seen, cache_bytes]`` each time the stream crosses a multiple of :data:`SEGMENT`."""

    def __init__(self) -> None:
        self.points: list[list[int]] = []
        self.peak = 0
        self._mark = 0

    def record(self, seen: int, used_bytes: int) -> None:
        self.peak = max(self.peak, used_bytes)
        if seen // SEGMENT > self._mark:
            self._mark = seen // SEGMENT
            self.points.append([seen, used_bytes])


def _progress(mode: str, seen: int, total: int, started: float, last: list[float]) -> None:
    now = time.perf_counter()
    if now - last[0] >= 30 or seen == total:
        last[0] = now
        log.info("%s: %d/%d tokens, %.0f s", mode, seen, total, now - started)


def _mode_result(scores, trace, tokens: int, started: float, capacity: int, evicted: int, per_token: int) -> dict:
    """One mode's entry in ppl.json: its scores plus how long, how big and how much it evicted."""
    result = scores.summary()
    result.update(
        tokens=tokens,
        seconds=time.perf_counter() - started,
        capacity=capacity,
        evicted=evicted,
        peak_cache_bytes=trace.peak,
        cache_bytes_trace=trace.points,
        bytes_per_token=per_token,
    )
    return result


def stream_ppl(loaded: LoadedModel, ids: list[int], capacity: int, sink_tokens: int, evict_block: int,
               chunk: int, mode: str = "stream") -> dict:
    """Feed ``ids`` through a one-row :class:`SinkCache` chunk by chunk and score every prediction."""
    cache = SinkCache(loaded.shape, 1, capacity, sink_tokens, evict_block, loaded.inv_freqs,
                      dtype=loaded.dtype, device=loaded.device)
    runner = serving_runner(loaded.model, cache, loaded.quantize, max_rows=1)
    per_token = loaded.shape.bytes_per_token(loaded.dtype)
    scores, trace = _Scores(ids), _Trace()
    started, last = time.perf_counter(), [time.perf_counter()]
    for start in range(0, len(ids), chunk):
        part = torch.tensor([ids[start : start + chunk]])
        # one token at a time is how a server decodes: score it on the decode weights
        logits = runner.forward([0], part, all_logits=True, decoding=part.shape[1] == 1)[0]  # (T, V)
        scores.add(start, logits)
        seen = start + part.shape[1]
        trace.record(seen, cache.row_bytes_used(0))
        _progress(mode, seen, len(ids), started, last)
    return _mode_result(scores, trace, len(ids), started, capacity, cache.evicted[0], per_token)


def held_tokens(plan: SinkCache, seen: int) -> tuple[int, int]:
    """The stream tokens row 0 of a bookkeeping cache holds after ``seen`` tokens were fed to it.

    Returned as ``(pinned, window_start)``: the cache holds tokens ``[0, pinned)`` and
    ``[window_start, seen)`` of the stream.
    """
    pinned = min(plan.pinned[0], seen)
    window_start = min(max(plan.pinned[0] + plan.evicted[0], pinned), seen)
    if pinned + (seen - window_start) != plan.lengths[0]:  # the arithmetic mirrors SinkCache exactly
        raise AssertionError("bookkeeping cache and held tokens disagree")
    return pinned, window_start


@torch.inference_mode()
def recompute_ppl(loaded: LoadedModel, ids: list[int], sink_tokens: int, window: int, evict_block: int,
                  chunk: int) -> dict:
    """The oracle: each block re-encoded from scratch with the tokens the sink cache would hold."""
    capacity = sink_tokens + window
    # zero layers: make_room/step do only the bookkeeping (lengths, evicted), no tensors
    plan = SinkCache(CacheShape(0, 1, 1), 1, capacity, sink_tokens, evict_block, [])
    per_token = loaded.shape.bytes_per_token(loaded.dtype)
    scores, trace = _Scores(ids), _Trace()
    started, last = time.perf_counter(), [time.perf_counter()]
    stream = torch.tensor(ids, dtype=torch.long)
    for start in range(0, len(ids), chunk):
        n = min(chunk, len(ids) - start)
        seen = start + n
        plan.step([0], n)  # evicts exactly as the sink cache would before taking the block
        pinned, window_start = held_tokens(plan, seen)  # the block is the last n of these tokens
        context = torch.cat([stream[:pinned], stream[window_start:seen]])
        logits = loaded.model(
            input_ids=context[None].to(loaded.device), use_cache=False, logits_to_keep=n
        ).logits[0]  # (n, V): the block's positions
        scores.add(start, logits)
        trace.record(seen, len(context) * per_token)
        _progress("recompute", seen, len(ids), started, last)
    return _mode_result(scores, trace, len(ids), started, capacity, plan.evicted[0], per_token)


def ppl_of_ids(loaded: LoadedModel, ids: list[int], modes: list[str], sink_tokens: int, window: int,
               evict_block: int = 64, chunk: int = 64) -> dict[str, dict]:
    """Per-mode results for a pre-tokenized stream (see the module docstring)."""
    unknown = set(modes) - set(MODES)
    if unknown:
        raise ValueError(f"unknown modes {sorted(unknown)}; choose from {MODES}")
    if not 1 <= chunk <= window:
        raise ValueError(f"chunk ({chunk}) must be between 1 and the window ({window})")
    results = {}
    for mode in modes:
        log.info("perplexity: mode %s over %d tokens", mode, len(ids))
        if mode == "sink":
            results[mode] = stream_ppl(loaded, ids, sink_tokens + window, sink_tokens, evict_block, chunk, mode)
        elif mode == "window":
            results[mode] = stream_ppl(loaded, ids, window, 0, evict_block, chunk, mode)
        elif mode == "dense":
            results[mode] = stream_ppl(loaded, ids, len(ids) + 1, 0, chunk, chunk, mode)
        else:
            results[mode] = recompute_ppl(loaded, ids, sink_tokens, window, evict_block, chunk)
        log.info("%s: ppl %.3f in %.0f s", mode, results[mode]["ppl"], results[mode]["seconds"])
    return results


# ----- reports -------------------------------------------------------------------------------------------
def worst_segment_ratio(result: dict, oracle: dict) -> float:
    return max(a / b for a, b in zip(result["segments"], oracle["segments"], strict=True))


def markdown_table(report: dict) -> str:
    modes = report["modes"]
    oracle = modes.get("recompute")
    lines = [
        f"Perplexity of the first {report['tokens']} tokens of `{Path(report['text']).name}` with "
        f"{report['model']} ({report['dtype']}); sink_tokens={report['sink_tokens']}, "
        f"window={report['window']}, evict_block={report['evict_block']}, chunk={report['chunk']}; "
        f"segments of {SEGMENT} tokens.",
        "",
        "| mode | ppl | ppl / recompute | worst segment ratio vs recompute | seconds | peak cache bytes |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for mode, r in modes.items():
        ratio = f"{r['ppl'] / oracle['ppl']:.4f}" if oracle else "n/a"
        worst = f"{worst_segment_ratio(r, oracle):.4f}" if oracle else "n/a"
        lines.append(
            f"| {mode} | {r['ppl']:.3f} | {ratio} | {worst} | {r['seconds']:.1f} | {r['peak_cache_bytes']:,} |"
        )
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for mode, r in report["modes"].items():
        ax.plot(r["segment_ends"], [math.log(p) for p in r["segments"]], marker=".", label=mode)
    max_positions = report.get("max_positions")
    if max_positions and max_positions < report["tokens"]:
        ax.axvline(max_positions, color="grey", linestyle="--", label=f"model max positions ({max_positions})")
    ax.set_xlabel("tokens")
    ax.set_ylabel(f"log perplexity ({SEGMENT}-token segments)")
    ax.set_title(f"{report['model']}: sinks {report['sink_tokens']} + window {report['window']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_reports(report: dict, out_dir: str | Path) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ppl.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "ppl.md").write_text(markdown_table(report))
    plot(report, out / "ppl.png")
    log.info("wrote %s", ", ".join(str(out / f) for f in ("ppl.json", "ppl.md", "ppl.png")))


def run_ppl(text_path: str | Path | None, tokens: int, modes, sink_tokens: int, window: int, out_dir,
            model: str | None = None, dtype: str = "float32", evict_block: int = 64, chunk: int = 64,
            loaded: LoadedModel | None = None, quantize: str | None = None) -> dict:
    """Measure the perplexity of the first ``tokens`` tokens of a text in each mode; write the reports."""
    text_path = Path(text_path) if text_path else DEFAULT_TEXT
    if isinstance(modes, str):
        modes = [m.strip() for m in modes.split(",") if m.strip()]
    if loaded is None:
        loaded = load(EngineConfig(model=model, dtype=dtype, sink_tokens=sink_tokens, window=window,
                                   evict_block=evict_block, quantize=quantize))
    ids = text_ids(loaded.tokenizer, text_path, tokens)
    report = {
        "model": loaded.name,
        "text": str(text_path),
        "tokens": len(ids),
        "dtype": str(loaded.dtype).removeprefix("torch.") + (f"+{loaded.quantize}" if loaded.quantize else ""),
        "device": str(loaded.device),
        "sink_tokens": sink_tokens,
        "window": window,
        "evict_block": evict_block,
        "chunk": chunk,
        "segment": SEGMENT,
        "max_positions": loaded.max_positions,
        "bytes_per_token": loaded.shape.bytes_per_token(loaded.dtype),
        "modes": ppl_of_ids(loaded, ids, list(modes), sink_tokens, window, evict_block, chunk),
    }
    write_reports(report, out_dir)
    return report
