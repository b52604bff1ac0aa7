"""``sinkserve serve | eval | bench``: each command's parser and runner come from its own package."""

from __future__ import annotations

import argparse
import logging
import sys

from bench.cli import add_bench_parser, run_bench
from engine.evaluate.cli import add_eval_parser, run_eval
from server.cli import add_serve_parser, serve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sinkserve", description="OpenAI-compatible StreamingLLM server")
    commands = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(commands)
    add_eval_parser(commands)
    add_bench_parser(commands)
    return parser


def main(argv: list[str] | None = None, engine_factory=None) -> int:
    """Run the command ``argv`` names; ``engine_factory`` replaces ``Engine`` for ``serve``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve(args, engine_factory)
    if args.command == "eval":
        run_eval(args)
        return 0
    run_bench(args)  # the parser accepts no other command
    return 0


if __name__ == "__main__":
    sys.exit(main())
