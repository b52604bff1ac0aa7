"""The ``serve`` command: uvicorn around ``create_app``; ``python -m server.cli serve ...`` runs it alone.

Its flags are derived from ``Settings`` (one per field, help from the field's description, see
``server/settings.py``) and only fill it in; anything not given on the command line comes from
``SINKSERVE_*`` environment variables or the defaults. The ``sinkserve`` command (``sinkserve/cli.py``)
mounts this next to ``eval`` and ``bench``. Uvicorn's programmatic API: https://www.uvicorn.org/deployment/
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import types
import typing

from server.settings import Settings

log = logging.getLogger("sinkserve")


def _json_object(value: str) -> dict:
    try:
        parsed = json.loads(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from exc
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError("expected a JSON object, e.g. '{\"temperature\": 0.7}'")
    return parsed


def _value_type(annotation) -> type:
    """The type a setting holds besides ``None``: ``int | None`` -> int, ``list[str]`` -> list."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        (annotation,) = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    return typing.get_origin(annotation) or annotation


def flag_of(name: str, info) -> str:
    """The flag of setting ``name`` (``info``: its FieldInfo): ``--`` and the name with dashes, or its own."""
    return (info.json_schema_extra or {}).get("flag") or "--" + name.replace("_", "-")


def flag_arguments(name: str, info) -> dict:
    """argparse keyword arguments of the flag of setting ``name`` (``info``: its FieldInfo)."""
    extra = info.json_schema_extra or {}
    kwargs = {"dest": name, "default": None, "help": info.description.replace("%", "%%")}
    kind = _value_type(info.annotation)
    if kind is bool:
        kwargs.update(action="store_const", const=True)
    elif kind is list:
        kwargs["action"] = "append"
    elif kind in (int, float):
        kwargs["type"] = kind
    elif kind is dict:
        kwargs["type"] = _json_object
    if "choices" in extra:
        kwargs["choices"] = list(extra["choices"])
    if "metavar" in extra:
        kwargs["metavar"] = extra["metavar"]
    return kwargs


def add_setting_flags(parser: argparse.ArgumentParser, model=Settings) -> None:
    """One flag per field of the settings ``model``."""
    for name, info in model.model_fields.items():
        parser.add_argument(flag_of(name, info), **flag_arguments(name, info))


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``serve`` command to a CLI's sub-parsers."""
    serve = subparsers.add_parser("serve", help="run the HTTP server")
    add_setting_flags(serve)
    return serve


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m server.cli``: the ``serve`` command alone."""
    parser = argparse.ArgumentParser(prog="python -m server.cli", description="OpenAI-compatible StreamingLLM server")
    add_serve_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def serve(args: argparse.Namespace, engine_factory=None) -> int:
    import uvicorn
    from pydantic import ValidationError

    from server.app import create_app

    overrides = {name: getattr(args, name) for name in Settings.model_fields if getattr(args, name) is not None}
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
        uvicorn.run(create_app(settings, engine_factory=engine_factory), host=settings.host, port=settings.port,
                    log_level=settings.log_level, timeout_graceful_shutdown=settings.timeout_graceful_shutdown)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None, engine_factory=None) -> int:
    """Run ``serve`` as ``argv`` asks; ``engine_factory`` replaces ``Engine`` (bench.tiny_server)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return serve(build_parser().parse_args(argv), engine_factory)


if __name__ == "__main__":
    sys.exit(main())
