"""The GPU benchmark run behind scripts/bench_gpu.sh: every engine suite on one model load, then the HTTP API.

In one process, on the model loaded once: ``decode``, ``concurrency`` (1, 8 and 64 sessions in one batch,
``max_batch`` 64: the GPU target), ``followup`` and ``memory`` (bench/, short sizes), then two measurements
of its own, written to ``OUT/gpu_extra.json``:

- ``sampling``: 64 concurrent sessions sampling with temperature, top-p, min-p, a repetition penalty and a
  seed each (the per-row sampling path) against the same 64 greedy: aggregate tokens/s of both;
- ``offload``: 64 sessions through a cache pool of 16 rows (the others parked in host memory and on disk),
  two turns each: every follow-up must continue from its session's cache; tokens/s and cached tokens.

Then ``bench api`` (bench/api.py: streamed chat completions through a real ``sinkserve serve``, 1, 8 and 64
clients) in a server process of its own (a second model load: that one cannot be shared). A suite that fails
is reported and makes the exit status 1; the others still run.

``--make-random-model CONFIG_DIR OUT_DIR``: a model directory of random weights with CONFIG_DIR's config and
tokenizer (SmolLM2-135M's, carried by scripts/gpu_check.sh): the same shapes, so the same speed, without the
538 MB weights. Speed does not depend on the weights' values; the benchmarks generate to ``max_tokens``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

log = logging.getLogger("bench_gpu")
SUITES = ("decode", "concurrency", "followup", "memory", "sampling", "offload", "api")


def make_random_model(config_dir: Path, out_dir: Path) -> None:
    """Random weights (bf16 safetensors) with ``config_dir``'s config, plus its tokenizer files."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if (out_dir / "model.safetensors").exists():
        log.info("random model already in %s", out_dir)
        return
    config = AutoConfig.from_pretrained(config_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tmp = Path(tempfile.mkdtemp(prefix=".random-", dir=out_dir.parent))
    model.save_pretrained(tmp)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (config_dir / name).exists():
            shutil.copy(config_dir / name, tmp / name)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    log.info("random %s weights in %s", config.model_type, out_dir)


async def _generate(engine, prompt: list[int], params, session_id: str) -> tuple[int, int]:
    """(generated tokens, cached prompt tokens) of one request."""
    from engine import FinishEvent

    gen = await engine.generate(prompt, params, session_id=session_id)
    async for event in gen:
        if isinstance(event, FinishEvent):
            if event.finish_reason not in ("length", "stop"):
                raise RuntimeError(f"request {session_id} ended with {event.finish_reason}: {event.error}")
            return event.usage.completion_tokens, event.usage.cached_tokens
    raise RuntimeError("no finish event")


async def _wave(engine, prompts: list[list[int]], params, tag: str) -> dict:
    started = time.perf_counter()
    results = await asyncio.gather(*[_generate(engine, p, params, f"{tag}{i}") for i, p in enumerate(prompts)])
    seconds = time.perf_counter() - started
    tokens = sum(r[0] for r in results)
    return {"sessions": len(prompts), "tokens": tokens, "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds, 1), "cached_tokens": [r[1] for r in results]}


def measure_sampling(engine, sessions: int = 64, max_tokens: int = 64) -> dict:
    from bench.common import history_ids
    from engine.scheduling.sampling import SamplingParams

    tokenizer = engine.loaded.tokenizer
    prompts = [history_ids(tokenizer, 128, offset=i * 7) for i in range(sessions)]
    greedy = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    sampled = [SamplingParams(max_tokens=max_tokens, temperature=0.8, top_p=0.9, min_p=0.02, repetition_penalty=1.1,
                              seed=i, ignore_eos=True) for i in range(sessions)]

    async def run() -> dict:
        await _wave(engine, prompts[:2], greedy, "warm")
        plain = await _wave(engine, prompts, greedy, "greedy")
        started = time.perf_counter()
        results = await asyncio.gather(*[_generate(engine, p, s, f"sampled{i}")
                                         for i, (p, s) in enumerate(zip(prompts, sampled, strict=True))])
        seconds = time.perf_counter() - started
        tokens = sum(r[0] for r in results)
        return {"greedy": plain, "sampled": {"sessions": sessions, "tokens": tokens, "seconds": round(seconds, 3),
                                             "tokens_per_s": round(tokens / seconds, 1)}}

    return asyncio.run(run())


def measure_offload(loaded, config, data_dir: Path, sessions: int = 64, rows: int = 16, max_tokens: int = 32) -> dict:
    from bench.common import history_ids
    from engine.engine import Engine
    from engine.scheduling.sampling import SamplingParams

    per_row = config.cache_size * loaded.shape.bytes_per_token(loaded.dtype)
    tight = replace(config, memory_budget_bytes=rows * per_row, data_dir=data_dir, max_batch=rows)
    engine = Engine(tight, loaded).start()
    try:
        assert engine.scheduler.cache.rows == rows, engine.scheduler.cache.rows
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        tokenizer = loaded.tokenizer
        prompts = [history_ids(tokenizer, 200, offset=i * 11) for i in range(sessions)]

        async def run() -> dict:
            first = await _wave(engine, prompts, params, "s")
            follow = [p + history_ids(tokenizer, 16, offset=5000 + i) for i, p in enumerate(prompts)]
            second = await _wave(engine, follow, params, "s")
            return {"first_turn": first, "follow_up": second}

        report = asyncio.run(run())
    finally:
        engine.stop()
    report.update(sessions=sessions, rows=rows)
    uncached = [i for i, cached in enumerate(report["follow_up"]["cached_tokens"]) if cached < 100]
    if uncached:
        raise RuntimeError(f"sessions {uncached[:8]} did not continue from their cache after offloading")
    return report


def run(args: argparse.Namespace) -> int:
    from bench.cli import _engine
    from bench.common import engine_config, load_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget_s
    failed: list[str] = []
    extra: dict = {}
    config = engine_config(None, model=args.model, device=args.device, dtype=args.dtype, quantize=None,
                           compile=args.compile, max_batch=64)
    loaded = load_model(config)  # once, for every in-process suite
    for suite in args.suites:
        if time.monotonic() > deadline - 10:
            log.error("out of time before %s", suite)
            failed.append(f"{suite} (no time left)")
            continue
        log.info("suite %s", suite)
        try:
            with tempfile.TemporaryDirectory(prefix="sinkserve-bench-gpu-") as data_dir:
                if suite == "decode":
                    from bench.decode import run_decode

                    run_decode(loaded, out, quick=True, compile_decode=args.compile)
                elif suite == "memory":
                    from bench.memory import run_memory

                    run_memory(loaded, out, quick=True)
                elif suite in ("concurrency", "followup", "sampling"):
                    engine = _engine(loaded, config, data_dir)
                    try:
                        if suite == "concurrency":
                            from bench.concurrency import run_concurrency

                            run_concurrency(engine, out, quick=True, streams=[1, 8, 64])
                        elif suite == "followup":
                            from bench.followup import run_followup

                            run_followup(engine, out, quick=True)
                        else:
                            extra["sampling"] = measure_sampling(engine)
                    finally:
                        engine.stop()
                elif suite == "offload":
                    extra["offload"] = measure_offload(loaded, config, Path(data_dir))
                elif suite == "api":
                    from bench.api import run_api

                    flags = ["--device", args.device, "--dtype", args.dtype, "--max-batch", "64"]
                    flags += ["--model", args.model] if args.model else []
                    run_api(out, quick=True, clients=[1, 8, 64], rounds=1, serve_flags=flags)
        except Exception:
            log.error("suite %s failed:\n%s", suite, traceback.format_exc())
            failed.append(suite)
    if extra:
        (out / "gpu_extra.json").write_text(json.dumps(extra, indent=2) + "\n")
        for name, report in extra.items():
            log.info("%s: %s", name, json.dumps({k: v for k, v in report.items() if k != "cached_tokens"})[:600])
    if failed:
        log.error("failed: %s", ", ".join(failed))
        return 1
    log.info("all suites done; results in %s", out)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--make-random-model", nargs=2, metavar=("CONFIG_DIR", "OUT_DIR"))
    parser.add_argument("--out", default="docs/results/gpu")
    parser.add_argument("--model", default=None, help="model directory or .gguf (default: the embedded model)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--suites", type=lambda s: [x for x in s.split(",") if x], default=list(SUITES),
                        help=f"comma list of {', '.join(SUITES)}")
    parser.add_argument("--budget-s", type=float, default=290.0, help="start no suite after this many seconds")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.make_random_model:
        make_random_model(Path(args.make_random_model[0]), Path(args.make_random_model[1]))
        return 0
    unknown = set(args.suites) - set(SUITES)
    if unknown:
        parser.error(f"unknown suites {sorted(unknown)}")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
