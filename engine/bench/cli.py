"""Command line of the benchmarks: ``sinkserve bench SUITE [--out DIR] [--quick] ...``.

Mounted under a CLI with :func:`add_bench_parser` and dispatched with :func:`run_bench`; also runnable on
its own: ``python -m engine.bench.cli decode --quick``. Each suite writes ``OUT/<suite>.json``,
``OUT/<suite>.png`` and ``OUT/<suite>.md``. The baselines are StreamingLLM's (arXiv 2309.17453, section
4.5): dense attention with a growing cache and the sliding window with re-computation.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

from engine.bench import SUITES
from engine.config import DTYPES

log = logging.getLogger(__name__)

ORDER = ("memory", "decode", "followup", "concurrency", "llamacpp")  # memory first: its peak RSS stays clean


def _ints(value: str) -> list[int]:
    try:
        numbers = [int(float(v)) for v in value.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError("expected a comma list of numbers, e.g. 1000,8000") from exc
    if not numbers or min(numbers) < 1:
        raise argparse.ArgumentTypeError("expected positive numbers")
    return numbers


def _fill_bench_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("suite", choices=[*SUITES, "all"], help="which benchmark to run")
    parser.add_argument("--out", default="results/bench", help="output folder for <suite>.json/.png/.md")
    parser.add_argument("--quick", action="store_true", help="short sizes (a smoke run, minutes on a CPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch (and llama.cpp) CPU threads")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--model", default=None, help="model directory or .gguf (default: the embedded model)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--lengths", type=_ints, default=None,
                        help="override the sizes: decode/followup history lengths, concurrency stream counts, "
                             "memory total tokens (its last number)")
    parser.add_argument("--dense-budget-s", type=float, default=120.0,
                        help="decode: skip dense prefills estimated to take longer than this")


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``bench`` command to a CLI's sub-parsers."""
    parser = subparsers.add_parser("bench", help="benchmarks: decode, followup, concurrency, memory, llamacpp, all")
    _fill_bench_parser(parser)
    return parser


def _engine(loaded, config, data_dir: str):
    from dataclasses import replace

    from engine.engine import Engine

    return Engine(replace(config, data_dir=Path(data_dir)), loaded).start()


def run_bench(args: argparse.Namespace) -> dict:
    """Run the suite(s) ``args`` describe (parsed by :func:`add_bench_parser`); returns the reports."""
    from engine.bench.common import engine_config, load_model

    suites = ORDER if args.suite == "all" else (args.suite,)
    config = engine_config(args, max_batch=16)
    loaded = load_model(config)
    reports: dict[str, dict] = {}
    sizes = args.lengths
    for suite in suites:
        log.info("running the %s benchmark%s", suite, " (quick)" if args.quick else "")
        if suite == "decode":
            from engine.bench.decode import run_decode

            reports[suite] = run_decode(loaded, args.out, quick=args.quick, lengths=sizes,
                                        dense_budget_s=args.dense_budget_s)
        elif suite == "memory":
            from engine.bench.memory import run_memory

            reports[suite] = run_memory(loaded, args.out, quick=args.quick, tokens=sizes[-1] if sizes else None)
        elif suite == "llamacpp":
            from engine.bench.llamacpp import run_llamacpp

            reports[suite] = run_llamacpp(loaded, args.out, quick=args.quick)
        else:
            with tempfile.TemporaryDirectory(prefix="sinkserve-bench-") as data_dir:
                engine = _engine(loaded, config, data_dir)
                try:
                    if suite == "followup":
                        from engine.bench.followup import run_followup

                        reports[suite] = run_followup(engine, args.out, quick=args.quick, lengths=sizes)
                    else:
                        from engine.bench.concurrency import run_concurrency

                        reports[suite] = run_concurrency(engine, args.out, quick=args.quick, streams=sizes)
                finally:
                    engine.stop()
    return reports


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.bench.cli", description="sinkserve benchmarks")
    _fill_bench_parser(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    reports = run_bench(args)
    for report in reports.values():
        md = report.get("files", {}).get("md")
        if md:
            sys.stdout.write(Path(md).read_text() + "\n")  # the CLI shows the tables
    return 0


if __name__ == "__main__":
    sys.exit(main())
