"""Passkey retrieval past the window (``eval recall``): dense attention, the sink cache, and the sink cache
with recall (engine/cache/recall.py); plus streaming perplexity with recall on and off.

Each case (a seed and a depth): ``prefix`` tokens of the shipped text from a random place, the passkey
sentence ("The pass key is 71432. Remember it.", a random 5-digit key), ``depth`` more tokens of the text,
then the question ("What is the pass key? The pass key is"). For each mode it reports (a) whether the
greedy answer's first number is the key (exact match) and (b) the teacher-forced log-likelihood (nats) of
the answer tokens (" " and the digits) after the question:

``dense``
    transformers' forward over the whole text (positions 0..n-1, within the model's positions).
``sink``
    A :class:`~engine.cache.sink.SinkCache` of ``sink_tokens + window`` slots driven chunk by chunk through
    the engine's :class:`~engine.model.runner.Runner` (transformers' forward), as ``eval ppl`` does.
``recall``
    The same cache, of the same size, with ``blocks * evict_block`` of its slots reserved for the recall
    segment (the window is smaller by as much); at the question (the start of a turn) the question's
    queries (:func:`~engine.cache.recall.capture_queries`) choose the evicted blocks to splice back.

The streaming perplexity part feeds the first ``ppl_tokens`` tokens of the text through the sink cache
with recall off (``eval ppl``'s ``sink`` mode) and on (a turn every ``turn`` tokens: the next chunk's
queries choose the blocks), scored as ``eval ppl`` scores.

Outputs: ``recall.json``, ``recall.md`` (a table) and ``recall.png`` (log-likelihood per case and mode).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import re
import time
from pathlib import Path

import torch

from engine.cache.recall import Recall, capture_queries
from engine.cache.sink import SinkCache
from engine.config import EngineConfig
from engine.evaluate.ppl import DEFAULT_TEXT, _mode_result, _Scores, _Trace, encode_text, stream_ppl
from engine.model.loader import LoadedModel, load
from engine.model.runner import Runner

log = logging.getLogger(__name__)

MODES = ("dense", "sink", "recall")
PASSKEY = " The pass key is {key}. Remember it."
QUESTION = "\nWhat is the pass key? The pass key is"
ANSWER_TOKENS = 8  # greedy tokens generated for the answer


# ----- cases ---------------------------------------------------------------------------------------------
def make_case(tokenizer, text_ids: list[int], seed: int, depth: int, prefix: int = 200) -> dict:
    """The token ids of one case: context (prefix, passkey, depth tokens), question and answer."""
    rng = random.Random(seed)
    key = str(rng.randint(10_000, 99_999))
    start = rng.randrange(0, len(text_ids) - prefix - depth - 1)
    needle = encode_text(tokenizer, PASSKEY.format(key=key))
    context = text_ids[start : start + prefix] + needle + text_ids[start + prefix : start + prefix + depth]
    return {"seed": seed, "depth": depth, "key": key, "context": context,
            "question": encode_text(tokenizer, QUESTION), "answer": encode_text(tokenizer, " " + key),
            "needle_at": prefix}


def answered(tokenizer, tokens: list[int], key: str) -> tuple[bool, str]:
    """Whether the first number in the generated text is the key, and the text."""
    text = tokenizer.decode(tokens)
    found = re.search(r"\d+", text)
    return bool(found and found.group() == key), text


def answer_loglik(first_logits: torch.Tensor, later_logits: torch.Tensor, answer: list[int]) -> float:
    """Sum of log p(answer tokens): the first from ``first_logits`` (V,), the rest from ``later_logits``
    (n-1, V), the predictions after feeding ``answer[:-1]``."""
    logits = torch.cat([first_logits[None], later_logits[: len(answer) - 1]]).float()
    logp = torch.log_softmax(logits, dim=-1)
    return float(logp[torch.arange(len(answer)), torch.tensor(answer)].sum())


# ----- modes ---------------------------------------------------------------------------------------------
@torch.inference_mode()
def run_dense(loaded: LoadedModel, case: dict) -> dict:
    """Full attention over the whole text with transformers' forward."""
    model, device = loaded.model, loaded.device
    prompt = case["context"] + case["question"]
    out = model(input_ids=torch.tensor([prompt], device=device), use_cache=True, logits_to_keep=1)
    first, past = out.logits[0, -1].float(), out.past_key_values
    answer = case["answer"]
    forced = copy.deepcopy(past)
    later = model(input_ids=torch.tensor([answer[:-1]], device=device), past_key_values=forced,
                  use_cache=True).logits[0].float() if len(answer) > 1 else first[None, :0]
    loglik = answer_loglik(first, later, answer)
    del forced
    tokens, logits = [], first
    for _ in range(ANSWER_TOKENS):
        tokens.append(int(logits.argmax()))
        logits = model(input_ids=torch.tensor([[tokens[-1]]], device=device), past_key_values=past,
                       use_cache=True).logits[0, -1].float()
    return {"loglik": loglik, "tokens": tokens}


def _feed(runner: Runner, row: int, tokens: list[int], chunk: int) -> torch.Tensor:
    logits = None
    for start in range(0, len(tokens), chunk):
        logits = runner.forward([row], torch.tensor([tokens[start : start + chunk]]), all_logits=True)[0]
    return logits  # (T, V) of the last chunk


@torch.inference_mode()
def run_cache(loaded: LoadedModel, case: dict, sink_tokens: int, window: int, evict_block: int, chunk: int,
              blocks: int = 0, recall_options: dict | None = None, extra: bool = False) -> dict:
    """The sink cache (``blocks`` = 0) or the sink cache with a recall segment of ``blocks`` blocks, of the
    same total size ``sink_tokens + window`` (``extra``: the segment added to it), fed through the runner."""
    slots = blocks * evict_block
    cache = SinkCache(loaded.shape, 2, sink_tokens + window + (slots if extra else 0), sink_tokens, evict_block,
                      loaded.inv_freqs,
                      dtype=loaded.dtype, device=loaded.device, recall_slots=slots)
    recall = Recall(cache, blocks, **(recall_options or {})) if blocks else None
    runner = Runner(loaded.model, cache)
    _feed(runner, 0, case["context"], chunk)
    recalled, spliced = 0, []
    if recall is not None:
        queries = capture_queries(loaded.model, cache, 0, case["question"])
        ranks = needle_ranks(recall, queries, case["needle_at"], evict_block)
        recalled = recall.before_turn(0, queries)
        spliced = recall.segments.get(0, [])
    first = _feed(runner, 0, case["question"], chunk)[-1]
    cache.copy_row(0, 1)
    answer = case["answer"]
    later = runner.forward([0], torch.tensor([answer[:-1]]), all_logits=True)[0] if len(answer) > 1 else None
    loglik = answer_loglik(first, later if later is not None else first[None, :0], answer)
    tokens, logits = [], first
    for _ in range(ANSWER_TOKENS):
        tokens.append(int(logits.argmax()))
        logits = runner.forward([1], torch.tensor([[tokens[-1]]]))[0]
    needle = case["needle_at"]
    result = {"loglik": loglik, "tokens": tokens, "recalled_tokens": recalled}
    if recall is not None:
        store = recall.store(0)
        result.update(
            spliced=spliced, needle_ranks=ranks,
            needle_recalled=any(s <= needle + 4 < s + evict_block for s in spliced),
            store_tokens=store.tokens, store_bytes=store.nbytes, dropped_tokens=store.dropped_tokens,
        )
    return result


def needle_ranks(recall: Recall, queries: list[torch.Tensor], needle: int, block: int) -> dict[str, int | None]:
    """Where the block holding the passkey ranks among the stored blocks under each aggregation (0: first)."""
    ranks = {}
    for aggregate in ("max", "mean"):
        starts, scores = recall.scores(0, queries, aggregate)
        order = [starts[i] for i in torch.argsort(scores, descending=True).tolist()]
        hits = [i for i, s in enumerate(order) if s <= needle + 5 < s + block]
        ranks[aggregate] = hits[0] if hits else None
    return ranks


# ----- streaming perplexity ------------------------------------------------------------------------------
@torch.inference_mode()
def stream_ppl_recall(loaded: LoadedModel, ids: list[int], capacity: int, sink_tokens: int, evict_block: int,
                      chunk: int, blocks: int, turn: int, recall_options: dict | None = None,
                      extra: bool = False) -> dict:
    """``eval ppl``'s sink mode with recall: every ``turn`` tokens the next chunk's queries choose the blocks
    spliced into the segment (``blocks * evict_block`` reserved slots of the same ``capacity``)."""
    capacity += blocks * evict_block if extra else 0
    cache = SinkCache(loaded.shape, 1, capacity, sink_tokens, evict_block, loaded.inv_freqs, dtype=loaded.dtype,
                      device=loaded.device, recall_slots=blocks * evict_block)
    recall = Recall(cache, blocks, **(recall_options or {}))
    runner = Runner(loaded.model, cache)
    scores, trace = _Scores(ids), _Trace()
    started = time.perf_counter()
    for start in range(0, len(ids), chunk):
        part = ids[start : start + chunk]
        if start and start % turn == 0:
            recall.before_turn(0, capture_queries(loaded.model, cache, 0, part))
        scores.add(start, runner.forward([0], torch.tensor([part]), all_logits=True)[0])
        trace.record(start + len(part), cache.row_bytes_used(0))
    result = _mode_result(scores, trace, len(ids), started, capacity, cache.evicted[0],
                          loaded.shape.bytes_per_token(loaded.dtype))
    result["recall"] = dict(recall.counters)
    return result


# ----- the whole evaluation ------------------------------------------------------------------------------
def summarize(cases: list[dict], modes: list[str]) -> dict:
    """Per mode the mean log-likelihood and the exact answers; the share of the sink cache's gap to dense
    that recall closes."""
    summary = {}
    if not cases:
        return summary
    for mode in modes:
        values = [c[mode]["loglik"] for c in cases]
        summary[mode] = {"mean_loglik": sum(values) / len(values),
                         "exact": sum(c[mode]["exact"] for c in cases), "cases": len(cases)}
    if {"dense", "sink", "recall"} <= set(modes):
        gap = summary["dense"]["mean_loglik"] - summary["sink"]["mean_loglik"]
        closed = summary["recall"]["mean_loglik"] - summary["sink"]["mean_loglik"]
        summary["gap_closed"] = closed / gap if gap else float("nan")
    return summary


def run_recall(out_dir, seeds: int = 4, depths=(1500, 3000, 4500, 6000), modes=MODES, sink_tokens: int = 4,
               window: int = 1020, evict_block: int = 64, chunk: int = 64, blocks: int = 4, score: str = "attention",
               ppl_tokens: int = 20_000, turn: int = 1024, text_path=None, model: str | None = None,
               loaded: LoadedModel | None = None, first_seed: int = 0, extra: bool = False) -> dict:
    """Run the passkey cases and the perplexity comparison; write the reports to ``out_dir``."""
    text_path = Path(text_path) if text_path else DEFAULT_TEXT
    if loaded is None:
        loaded = load(EngineConfig(model=model, dtype="float32", sink_tokens=sink_tokens, window=window,
                                   evict_block=evict_block, quantize=None))
    text = encode_text(loaded.tokenizer, Path(text_path).read_text(encoding="utf-8"))
    options = {"score": score}
    report = {"model": loaded.name, "dtype": str(loaded.dtype).removeprefix("torch."), "sink_tokens": sink_tokens,
              "window": window, "evict_block": evict_block, "chunk": chunk, "blocks": blocks, "score": score,
              "modes": list(modes), "cases": [], "machine": _machine(), "extra": extra}
    for depth in depths:
        for seed in range(first_seed, first_seed + seeds):
            case = make_case(loaded.tokenizer, text, seed, depth)
            if len(case["context"]) + len(case["question"]) + ANSWER_TOKENS > loaded.max_positions:
                raise ValueError(f"depth {depth} does not fit the model's {loaded.max_positions} positions")
            row = {"seed": seed, "depth": depth, "key": case["key"], "tokens": len(case["context"])}
            for mode in modes:
                started = time.perf_counter()
                if mode == "dense":
                    result = run_dense(loaded, case)
                else:
                    result = run_cache(loaded, case, sink_tokens, window, evict_block, chunk,
                                       blocks if mode == "recall" else 0, options, extra)
                result["exact"], result["text"] = answered(loaded.tokenizer, result.pop("tokens"), case["key"])
                result["seconds"] = time.perf_counter() - started
                row[mode] = result
                log.info("depth %d seed %d %s: loglik %.2f exact %s (%r) %.0f s", depth, seed, mode,
                         result["loglik"], result["exact"], result["text"], result["seconds"])
            report["cases"].append(row)
            _write(report, out_dir, modes)  # partial results survive an interrupted run
    report["summary"] = summarize(report["cases"], list(modes))
    if ppl_tokens:
        ids = text[:ppl_tokens]
        capacity = sink_tokens + window
        report["ppl"] = {"tokens": len(ids), "turn": turn,
                         "off": stream_ppl(loaded, ids, capacity, sink_tokens, evict_block, chunk, "sink"),
                         "on": stream_ppl_recall(loaded, ids, capacity, sink_tokens, evict_block, chunk, blocks,
                                                 turn, options, extra)}
        report["ppl"]["ratio"] = report["ppl"]["on"]["ppl"] / report["ppl"]["off"]["ppl"]
    _write(report, out_dir, modes)
    return report


CONFIG_KEYS = ("model", "dtype", "sink_tokens", "window", "evict_block", "chunk", "blocks", "score", "extra")


def merge_reports(paths, out_dir) -> dict:
    """One report from several ``recall.json`` of the same configuration (runs split over seeds or depths);
    the first report with a perplexity part gives it."""
    reports = [json.loads(Path(p).read_text()) for p in paths]
    merged = dict(reports[0], cases=[])
    for report in reports:
        if any(report.get(k) != merged.get(k) for k in CONFIG_KEYS):
            raise ValueError(f"{report.get('window')}/{report.get('blocks')}: reports of different configurations")
        merged["cases"] += report["cases"]
        if "ppl" in report and "ppl" not in merged:
            merged["ppl"] = report["ppl"]
    merged["cases"].sort(key=lambda c: (c["depth"], c["seed"]))
    merged["summary"] = summarize(merged["cases"], merged["modes"])
    _write(merged, out_dir, merged["modes"])
    return merged


def _machine() -> str:
    """The CPU's model name and core count (what the timings and the float32 figures ran on)."""
    import os
    import platform

    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


# ----- reports -------------------------------------------------------------------------------------------
def markdown(report: dict, modes) -> str:
    lines = [
        f"Passkey retrieval with {report['model']} ({report['dtype']}) on {report['machine']}; "
        f"sink_tokens={report['sink_tokens']}, window={report['window']} (recall: {report['blocks']} blocks of "
        f"{report['evict_block']} {'added to the cache' if report.get('extra') else 'reserved from it'}, score "
        f"{report['score']}), chunk={report['chunk']}. "
        "Log-likelihood: nats of the answer tokens, teacher-forced; exact: greedy answer's first number.",
        "",
        "| depth | seed | " + " | ".join(f"{m} loglik | {m} exact" for m in modes) + " |",
        "|---:|---:|" + "---:|---|" * len(modes),
    ]
    for c in report["cases"]:
        cells = " | ".join(f"{c[m]['loglik']:.2f} | {'yes' if c[m]['exact'] else 'no'}" for m in modes)
        lines.append(f"| {c['depth']} | {c['seed']} | {cells} |")
    summary = report.get("summary")
    if summary:
        lines += ["", "| mode | mean loglik | exact |", "|---|---:|---:|"]
        lines += [f"| {m} | {summary[m]['mean_loglik']:.2f} | {summary[m]['exact']}/{summary[m]['cases']} |"
                  for m in modes]
        if "gap_closed" in summary:
            lines += ["", f"Share of the sink cache's gap to dense closed by recall: {summary['gap_closed']:.1%}."]
    ppl = report.get("ppl")
    if ppl:
        lines += ["", f"Streaming perplexity over {ppl['tokens']} tokens (a recall turn every {ppl['turn']} "
                      f"tokens): off {ppl['off']['ppl']:.3f}, on {ppl['on']['ppl']:.3f}, "
                      f"ratio {ppl['ratio']:.4f}."]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path, modes) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    cases = report["cases"]
    labels = [f"{c['depth']}/{c['seed']}" for c in cases]
    for mode in modes:
        ax.plot(range(len(cases)), [c[mode]["loglik"] for c in cases], marker="o", linestyle="", label=mode)
    ax.set_xticks(range(len(cases)), labels, rotation=60, fontsize=7)
    ax.set_xlabel("depth / seed")
    ax.set_ylabel("log-likelihood of the passkey (nats)")
    ax.set_title(f"{report['model']}: passkey past a {report['sink_tokens'] + report['window']}-slot cache")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _write(report: dict, out_dir, modes) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recall.json").write_text(json.dumps(report, indent=1, default=_finite) + "\n")
    (out / "recall.md").write_text(markdown(report, modes))
    if report["cases"]:
        plot(report, out / "recall.png", modes)


def _finite(value):
    return None if isinstance(value, float) and not math.isfinite(value) else str(value)
