"""Command line of the benchmarks: ``sinkserve bench SUITE [--out DIR] [--quick] ...``.

Mounted under a CLI with :func:`add_bench_parser` and dispatched with :func:`run_bench`; also runnable on
its own: ``python -m bench.cli decode --quick``. Each suite writes ``OUT/<suite>.json``,
``OUT/<suite>.png`` and ``OUT/<suite>.md``. The baselines are StreamingLLM's (arXiv 2309.17453, section
4.5): dense attention with a growing cache and the sliding window with re-computation.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import tempfile
from pathlib import Path

from bench import SUITES
from engine.config import DTYPES, parse_quantize

log = logging.getLogger(__name__)

LOAD_QUICK = {"clients": 4, "seconds": 5.0}  # bench load --quick: a smoke run
ORDER = ("memory", "decode", "followup", "concurrency", "llamacpp")  # memory first: its peak RSS stays clean
# ``load`` is not in ``all``: it runs HTTP clients against a server (``--url`` or ``--serve``), no model here.


def _ints(value: str) -> list[int]:
    try:
        numbers = [int(float(v)) for v in value.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError("expected a comma list of numbers, e.g. 1000,8000") from exc
    if not numbers or min(numbers) < 1:
        raise argparse.ArgumentTypeError("expected positive numbers")
    return numbers


def _sizes(value: str) -> list[int]:
    """A comma list of positive numbers, or 0 for none."""
    return [] if value.strip() in ("0", "") else _ints(value)


def _fill_bench_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("suite", choices=[*SUITES, "all"], help="which benchmark to run")
    parser.add_argument("--out", default="results/bench", help="output folder for <suite>.json/.png/.md")
    parser.add_argument("--quick", action="store_true", help="short sizes (a smoke run, minutes on a CPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch (and llama.cpp) CPU threads")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: bfloat16 on a GPU, else float32")
    parser.add_argument("--model", default=None, help="model directory or .gguf (default: the embedded model)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--quantize", default="auto", type=parse_quantize,
                        help="auto (int4 on CPU for Q4_1 GGUF weights), none, int4 or int8 (see README)")
    parser.add_argument("--max-batch", type=int, default=16,
                        help="sessions decoding together (concurrency, followup); 64 for the GPU target")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the decode step, as serve --compile does (decode, concurrency)")
    parser.add_argument("--lengths", type=_ints, default=None,
                        help="override the sizes: decode/followup history lengths, concurrency stream counts, "
                             "memory total tokens (its last number)")
    parser.add_argument("--dense-budget-s", type=float, default=120.0,
                        help="decode: skip dense prefills estimated to take longer than this")
    load = parser.add_argument_group("load (HTTP load on a loopback server; see bench/load.py)")
    target = load.add_mutually_exclusive_group()
    target.add_argument("--url", default=None, help="a running server, e.g. http://127.0.0.1:8000 (loopback only)")
    target.add_argument("--serve", action="store_true", help="start `sinkserve serve` on a free 127.0.0.1 port")
    load.add_argument("--tiny", action="store_true", help="with --serve: the tests' tiny random model (smoke runs)")
    load.add_argument("--clients", type=int, default=None, help="concurrent streaming clients (32; --quick 4)")
    load.add_argument("--seconds", type=float, default=None, help="how long new turns are started (60; --quick 5)")
    load.add_argument("--turns", type=int, default=8, help="turns a conversation before a client starts a new one")
    load.add_argument("--max-tokens", type=int, default=32, help="tokens generated a turn")
    load.add_argument("--max-requests", type=int, default=100_000, help="stop after this many requests")
    load.add_argument("--api-key", dest="api_keys", action="append", default=None,
                      help="with --url: bearer key(s), cycled over the clients (repeatable)")
    api = parser.add_argument_group("api (streaming clients through the HTTP API; see bench/api.py)")
    api.add_argument("--other-url", default=None,
                     help="another OpenAI-compatible server to run the same workload against, interleaved")
    api.add_argument("--rounds", type=int, default=None,
                     help="api, concurrency, constrained: rounds (medians reported); default 3, --quick 1")
    api.add_argument("--llama-server", default=None, metavar="PATH",
                     help="llama.cpp's llama-server binary (scripts/build_llama_server.sh): started on the same "
                          "GGUF, -np the most clients, -cb, the same threads, and measured beside sinkserve; "
                          "clients then default to 1,8,16")
    api.add_argument("--llama-server-flags", default="", metavar="FLAGS",
                     help="more llama-server flags, one string after '=' (later flags win): --llama-server-flags='-kvu'")
    api.add_argument("--ttft-tokens", type=_sizes, default=None, metavar="LIST",
                     help="time to first token of fresh prompts of these sizes (2000,6000; --quick 500; 0: none)")
    api.add_argument("--conversation-tokens", type=int, default=None, metavar="N",
                     help="time to first token of a follow-up after an N-token conversation (6000; --quick "
                          "1500; 0: none)")


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``bench`` command to a CLI's sub-parsers."""
    parser = subparsers.add_parser("bench", help="benchmarks: decode, followup, concurrency, memory, llamacpp, load, api, profile, constrained, all")
    _fill_bench_parser(parser)
    return parser


def _engine(loaded, config, data_dir: str):
    from dataclasses import replace

    from engine.engine import Engine

    return Engine(replace(config, data_dir=Path(data_dir)), loaded).start()


def _run_load(args: argparse.Namespace) -> dict:
    from bench.load import run_load

    if not args.serve and args.url is None:
        raise SystemExit("bench load needs --url URL (a loopback server) or --serve")
    flags, env = [], {}
    for flag, name in (("--model", "model"), ("--device", "device"), ("--dtype", "dtype")):
        value = getattr(args, name, None)
        if args.serve and value is not None and not (name == "device" and value == "auto") \
                and not (name == "dtype" and value == "auto"):
            flags += [flag, str(value)]
    if args.serve and args.threads:
        env["SINKSERVE_THREADS"] = str(args.threads)
    try:
        clients = args.clients or (LOAD_QUICK["clients"] if args.quick else 32)
        seconds = args.seconds or (LOAD_QUICK["seconds"] if args.quick else 60.0)
        return run_load(args.out, url=args.url, serve=args.serve, tiny=args.tiny, clients=clients,
                        seconds=seconds, api_keys=args.api_keys, serve_flags=flags, serve_env=env,
                        turns=args.turns, max_tokens=args.max_tokens, max_requests=args.max_requests)
    except ValueError as exc:  # not a loopback URL
        raise SystemExit(str(exc)) from exc


def _run_api(args: argparse.Namespace) -> dict:
    from bench.api import run_api

    env = {"SINKSERVE_THREADS": str(args.threads)} if args.threads else {}
    flags = [] if args.model is None else ["--model", args.model]
    gguf = None
    if args.llama_server:
        from bench.api import default_gguf

        if not Path(args.llama_server).is_file():
            raise SystemExit(f"no llama-server binary at {args.llama_server} (scripts/build_llama_server.sh)")
        try:
            gguf = default_gguf(args.model)
        except (FileNotFoundError, ValueError) as exc:  # a model directory, or no embedded model
            raise SystemExit(str(exc)) from exc
    return run_api(args.out, url=args.url, other_url=args.other_url, quick=args.quick, clients=args.lengths,
                   rounds=args.rounds, tiny=args.tiny, serve_flags=flags, serve_env=env,
                   llama_server=args.llama_server, llama_server_flags=shlex.split(args.llama_server_flags),
                   gguf=gguf, model=args.model, threads=args.threads, ttft_tokens=args.ttft_tokens,
                   conversation_tokens=args.conversation_tokens)


def run_bench(args: argparse.Namespace) -> dict:
    """Run the suite(s) ``args`` describe (parsed by :func:`add_bench_parser`); returns the reports."""
    if args.suite == "load":
        return {"load": _run_load(args)}
    if args.suite == "api":
        return {"api": _run_api(args)}
    from bench.common import engine_config, load_model

    suites = ORDER if args.suite == "all" else (args.suite,)
    config = engine_config(args, max_batch=args.max_batch)
    loaded = load_model(config)
    reports: dict[str, dict] = {}
    sizes = args.lengths
    for suite in suites:
        log.info("running the %s benchmark%s", suite, " (quick)" if args.quick else "")
        if suite == "decode":
            from bench.decode import run_decode

            reports[suite] = run_decode(loaded, args.out, quick=args.quick, lengths=sizes,
                                        dense_budget_s=args.dense_budget_s, compile_decode=config.compile)
        elif suite == "memory":
            from bench.memory import run_memory

            reports[suite] = run_memory(loaded, args.out, quick=args.quick, tokens=sizes[-1] if sizes else None)
        elif suite == "llamacpp":
            from bench.llamacpp import run_llamacpp

            reports[suite] = run_llamacpp(loaded, args.out, quick=args.quick)
        else:
            with tempfile.TemporaryDirectory(prefix="sinkserve-bench-") as data_dir:
                engine = _engine(loaded, config, data_dir)
                try:
                    if suite == "followup":
                        from bench.followup import run_followup

                        reports[suite] = run_followup(engine, args.out, quick=args.quick, lengths=sizes)
                    elif suite == "constrained":
                        from bench.constrained import run_constrained

                        reports[suite] = run_constrained(engine, args.out, quick=args.quick,
                                                         sessions=sizes[0] if sizes else None,
                                                         **({"rounds": args.rounds} if args.rounds else {}))
                    elif suite == "profile":
                        from bench.profile import run_profile

                        reports[suite] = run_profile(engine, args.out, quick=args.quick, batches=sizes)
                    else:
                        from bench.concurrency import run_concurrency

                        reports[suite] = run_concurrency(engine, args.out, quick=args.quick, streams=sizes,
                                                         **({"rounds": args.rounds} if args.rounds else {}))
                finally:
                    engine.stop()
    return reports


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cli", description="sinkserve benchmarks")
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
