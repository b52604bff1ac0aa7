"""``sinkserve`` command line: ``serve`` (uvicorn around ``create_app``), ``eval``, ``bench``.

Flags only fill in ``Settings``; anything not given on the command line comes from ``SINKSERVE_*``
environment variables or the defaults. Uvicorn's programmatic API: https://www.uvicorn.org/deployment/
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys

from bench.cli import add_bench_parser, run_bench
from engine.config import QUANTIZE_CHOICES
from engine.evaluate.cli import add_eval_parser, run_eval

log = logging.getLogger("sinkserve")

def _json_object(value: str) -> dict:
    try:
        parsed = json.loads(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from exc
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError("expected a JSON object, e.g. '{\"temperature\": 0.7}'")
    return parsed


SERVE_FLAGS = {  # flag -> (Settings field, argparse keyword arguments)
    "--host": ("host", {}),
    "--port": ("port", {"type": int}),
    "--model": ("model", {"help": "HF directory or .gguf file; default: the embedded SmolLM2-135M-Instruct"}),
    "--device": ("device", {"help": "auto, cpu, cuda, cuda:1, ..."}),
    "--dtype": ("dtype", {"choices": ["auto", "float32", "bfloat16", "float16"],
                          "help": "auto (default): bfloat16 on a GPU, float32 on a CPU"}),
    "--sink-tokens": ("sink_tokens", {"type": int}),
    "--window": ("window", {"type": int}),
    "--api-key-file": ("api_key_file", {}),
    "--data-dir": ("data_dir", {}),
    "--cache-dir": ("cache_dir", {}),
    "--memory-budget-mb": ("memory_budget_mb", {"type": int}),
    "--quantize": ("quantize", {"choices": list(QUANTIZE_CHOICES),
                                "help": "auto (default: int4 on CPU for Q4_1 GGUF weights), none, int4, int8"}),
    "--max-batch": ("max_batch", {"type": int, "help": "sessions decoding together in one forward pass (default 64 on a GPU, 8 on a CPU)"}),
    "--prefill-chunk": ("prefill_chunk", {"type": int, "help": "prompt tokens fed per step (256)"}),
    "--threads": ("threads", {"type": int, "help": "torch threads on CPU (default: torch's choice)"}),
    "--log-level": ("log_level", {"choices": ["critical", "error", "warning", "info", "debug"]}),
    "--sampling-defaults": ("sampling_defaults", {
        "type": _json_object, "help": "JSON object of defaults for sampling fields a request omits, over the "
        "model's, e.g. '{\"temperature\": 0.7}' (temperature, top_p, top_k, min_p, repetition_penalty)"}),
    "--graceful-timeout": ("timeout_graceful_shutdown", {"type": float, "help": "seconds to finish requests"}),
    "--session-store": ("session_store", {"metavar": "URL", "help": "redis://host:port/db of a cluster's shared "
                                          "session store (README: Scale-out); default: none, a single server"}),
    "--replica-name": ("replica", {"help": "this replica's name in the cluster (default: the host name)"}),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sinkserve", description="OpenAI-compatible StreamingLLM server")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the HTTP server")
    for flag, (dest, kwargs) in SERVE_FLAGS.items():
        serve.add_argument(flag, dest=dest, default=None, **kwargs)
    serve.add_argument("--api-key", dest="api_keys", action="append", default=None,
                       help="accepted bearer key (repeatable); none: no authentication")
    serve.add_argument("--pin-system-prompt", dest="pin_system_prompt", action="store_const", const=True,
                       default=None, help="keep system prompts in the cache's pinned sink region")
    serve.add_argument("--compile", dest="compile", action="store_const", const=True, default=None,
                       help="torch.compile the decode step (a faster decode after a slow first start)")

    add_eval_parser(commands)
    add_bench_parser(commands)
    return parser


def serve(args: argparse.Namespace, engine_factory=None) -> int:
    import uvicorn
    from pydantic import ValidationError

    from server.app import create_app
    from server.settings import Settings

    overrides = {dest: getattr(args, dest) for dest, _ in SERVE_FLAGS.values() if getattr(args, dest) is not None}
    for dest in ("api_keys", "pin_system_prompt"):
        if getattr(args, dest) is not None:
            overrides[dest] = getattr(args, dest)
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:  # e.g. an unknown sampling default: stop before loading anything
        raise SystemExit(f"sinkserve serve: invalid settings: {exc}") from exc
    logging.getLogger().setLevel(settings.log_level.upper())
    log.info("serving on http://%s:%d (sink_tokens=%d, window=%d)", settings.host, settings.port,
             settings.sink_tokens, settings.window)
    # uvicorn shuts down gracefully on SIGTERM (stops accepting, lets requests finish for
    # timeout_graceful_shutdown seconds, runs the lifespan shutdown that persists sessions) and then
    # re-raises the signal; with the default handler that would kill the process (exit status -15)
    # after a clean shutdown. A SIGTERM is a requested stop, so it exits 0.
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        uvicorn.run(create_app(settings, engine_factory=engine_factory), host=settings.host, port=settings.port, log_level=settings.log_level,
                    timeout_graceful_shutdown=settings.timeout_graceful_shutdown)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None, engine_factory=None) -> int:
    """Run the command ``argv`` names; ``engine_factory`` replaces ``Engine`` for ``serve`` (bench.tiny_server)."""
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
