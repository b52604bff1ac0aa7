"""Memory of one endless conversation: sink-cache bytes and process RSS against tokens streamed.

One session's worth of history (``tokens``, 100k; 10k with ``--quick``) is streamed through one row of a
:class:`~engine.cache.sink.SinkCache` by the engine's :class:`~engine.model.runner.Runner` in prefill chunks; every
``sample_every`` (4096) tokens the suite records the row's cache bytes (``SinkCache.row_bytes_used``), the
process's peak RSS (``resource.getrusage(...).ru_maxrss``) and current RSS (``VmRSS`` of
/proc/self/status), and, on CUDA, the allocator's current and peak bytes. Next to them it lists the bytes a
dense cache (transformers' ``DynamicCache``) would hold for the same tokens. Once the window is full the
sink cache stays flat while the dense cache grows linearly: the memory side of StreamingLLM's efficiency
comparison (arXiv 2309.17453, section 4.5, whose sliding window with re-computation baseline also keeps
only the window, but recomputes it for every token).

Report (``memory.json``): ``samples`` (``tokens``, ``cache_bytes``, ``dense_cache_bytes``,
``peak_rss_bytes``, ``rss_bytes`` and GPU fields), ``cache_bytes_per_row`` (the row's preallocated size),
and the growth of cache bytes and RSS between the first full window and the end.
"""

from __future__ import annotations

import logging
import time

import torch

from bench.common import (
    current_rss_bytes,
    environment,
    history_ids,
    markdown_table,
    peak_rss_bytes,
    pyplot,
    ratio,
    save_figure,
    write_report,
)
from engine.cache.sink import SinkCache
from engine.model.loader import LoadedModel
from engine.model.runner import serving_runner

log = logging.getLogger(__name__)

TOKENS = 100_000
QUICK_TOKENS = 10_000
SAMPLE_EVERY = 4096


def _sample(loaded: LoadedModel, cache: SinkCache, seen: int) -> dict:
    sample = {
        "tokens": seen,
        "cache_bytes": cache.row_bytes_used(0),
        "dense_cache_bytes": seen * loaded.shape.bytes_per_token(loaded.dtype),
        "peak_rss_bytes": peak_rss_bytes(),
        "rss_bytes": current_rss_bytes(),
    }
    if loaded.device.type == "cuda":
        sample["gpu_allocated_bytes"] = torch.cuda.memory_allocated(loaded.device)
        sample["gpu_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(loaded.device)
    return sample


def measure_memory(loaded: LoadedModel, tokens: int = TOKENS, *, sink_tokens: int = 4, window: int = 1020,
                   evict_block: int = 64, chunk: int = 512, sample_every: int = SAMPLE_EVERY) -> dict:
    """Stream ``tokens`` tokens through one sink-cache row, sampling memory every ``sample_every``."""
    ids = history_ids(loaded.tokenizer, tokens)
    cache = SinkCache(loaded.shape, 1, sink_tokens + window, sink_tokens, evict_block, loaded.inv_freqs,
                      dtype=loaded.dtype, device=loaded.device)
    runner = serving_runner(loaded.model, cache, loaded.quantize, max_rows=1)
    chunk = max(1, min(chunk, window, sample_every))
    samples = [_sample(loaded, cache, 0)]
    started = time.perf_counter()
    seen = 0
    next_sample = sample_every
    while seen < tokens:
        size = min(chunk, tokens - seen, next_sample - seen)
        runner.forward([0], torch.tensor([ids[seen : seen + size]]))
        seen += size
        if seen >= next_sample or seen == tokens:
            samples.append(_sample(loaded, cache, seen))
            next_sample += sample_every
            log.info("memory: %d tokens, cache %.1f MB, RSS %.0f MB (peak %.0f MB)", seen,
                     samples[-1]["cache_bytes"] / 1e6, samples[-1]["rss_bytes"] / 1e6, samples[-1]["peak_rss_bytes"] / 1e6)
    seconds = time.perf_counter() - started
    full = next((s for s in samples if s["tokens"] >= cache.capacity), samples[-1])
    last = samples[-1]
    return {
        "suite": "memory",
        "environment": environment(loaded, None),
        "settings": {"tokens": tokens, "sink_tokens": sink_tokens, "window": window, "evict_block": evict_block,
                     "chunk": chunk, "sample_every": sample_every},
        "cache_bytes_per_row": cache.bytes_per_row,
        "bytes_per_token": loaded.shape.bytes_per_token(loaded.dtype),
        "samples": samples,
        "summary": {
            "first_full_sample_tokens": full["tokens"],
            "cache_bytes_at_full": full["cache_bytes"],
            "cache_bytes_at_end": last["cache_bytes"],
            "cache_growth_bytes_after_full": last["cache_bytes"] - full["cache_bytes"],
            "rss_growth_bytes_after_full": last["rss_bytes"] - full["rss_bytes"],
            "peak_rss_bytes": last["peak_rss_bytes"],
            "dense_cache_bytes_at_end": last["dense_cache_bytes"],
            "dense_over_sink_at_end": ratio(last["dense_cache_bytes"], last["cache_bytes"]),
            "tokens_per_s": tokens / seconds if seconds else None,
        },
        "seconds": seconds,
        "notes": ["dense_cache_bytes: what a cache keeping every token (transformers' DynamicCache) would hold; "
                  "computed, not measured."],
    }


def table(report: dict) -> str:
    mb = 1e6
    rows = [[s["tokens"], s["cache_bytes"] / mb, s["dense_cache_bytes"] / mb, s["rss_bytes"] / mb,
             s["peak_rss_bytes"] / mb] for s in report["samples"]]
    text = markdown_table(["tokens streamed", "sink cache MB", "dense cache MB (computed)", "RSS MB",
                           "peak RSS MB"], rows)
    s = report["summary"]
    text += (f"\nafter the window filled ({s['first_full_sample_tokens']} tokens): cache grew "
             f"{s['cache_growth_bytes_after_full'] / mb:.2f} MB, RSS {s['rss_growth_bytes_after_full'] / mb:+.1f} MB\n")
    return text


def plot(report: dict, path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    samples = report["samples"]
    n = [s["tokens"] for s in samples]
    mb = 1e6
    ax.plot(n, [s["cache_bytes"] / mb for s in samples], "o-", label="sink cache (this session)")
    ax.plot(n, [s["dense_cache_bytes"] / mb for s in samples], ":", color="grey", label="dense cache (computed)")
    ax.plot(n, [s["rss_bytes"] / mb for s in samples], "s-", label="process RSS")
    ax.plot(n, [s["peak_rss_bytes"] / mb for s in samples], "--", label="process peak RSS")
    if any("gpu_allocated_bytes" in s for s in samples):
        ax.plot(n, [s.get("gpu_allocated_bytes", 0) / mb for s in samples], "^-", label="GPU allocated")
    ax.set_xlabel("tokens streamed through one session")
    ax.set_ylabel("MB")
    ax.set_yscale("log")
    ax.set_title(f"Memory ({report['environment']['model']}, {report['environment']['device']})")
    save_figure(fig, ax, path)


def run_memory(loaded: LoadedModel, out_dir, quick: bool = False, tokens=None, **kwargs) -> dict:
    report = measure_memory(loaded, tokens or (QUICK_TOKENS if quick else TOKENS), **kwargs)
    report["files"] = write_report(out_dir, "memory", report, table(report), plot)
    return report
