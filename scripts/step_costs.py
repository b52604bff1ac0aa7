"""Two costs of a decode step outside the model's matmuls, timed in isolation: an evicting step of the sink
cache (the undo snapshot plus the window's shift and re-rotation) and batched sampling (greedy, temperature
1, and the embedded model card's temperature 0.2 / top-p 0.9, what a client that sends no sampling fields
gets), at 1 and 8 rows.

    .venv/bin/python scripts/step_costs.py [--out docs/results/step-costs/NAME.json]

Shapes are the embedded model's (30 layers, 3 key/value heads of 64, a 4 + 1020 cache, a 49,152-token
vocabulary); the cache is one row filled to the brim, the logits are random (3 x a standard normal, so at
temperature 0.2 the nucleus is a few tokens, as with the real model). Run it on two checkouts, one after the
other, to compare them: the medians of ``repeats`` runs are reported, in ms.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from engine.cache.sink import CacheShape, SinkCache
from engine.scheduling.sampling import SamplingParams, sample_batch

SHAPE = CacheShape(num_layers=30, kv_heads=3, head_dim=64)
VOCAB = 49152
SAMPLING = {"greedy": SamplingParams(temperature=0.0), "temperature 1": SamplingParams(temperature=1.0),
            "card: temperature 0.2, top-p 0.9": SamplingParams(temperature=0.2, top_p=0.9)}


def median_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def evicting_step_ms(repeats: int) -> float:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64))
    cache = SinkCache(SHAPE, 1, 1024, 4, 64, [inv_freq] * SHAPE.num_layers)
    cache.reset(0)
    for buffers in (cache.k, cache.v):
        for buf in buffers:
            buf.normal_()

    def step():
        cache.lengths[0], cache.evicted[0] = 1024, 0  # full again: the step must evict a block
        cache.step([0], 21)

    return median_ms(step, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    report = {"evicting_step_ms": evicting_step_ms(args.repeats), "sample_batch_ms": {}}
    for rows in (1, 8):
        logits = 3 * torch.randn(rows, VOCAB)
        report["sample_batch_ms"][rows] = {name: median_ms(lambda p=p, x=logits: sample_batch(x, [p] * len(x)), args.repeats)
                                           for name, p in SAMPLING.items()}
    report["threads"] = torch.get_num_threads()
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
