"""Settings are declared once: every ``serve`` flag is a ``Settings`` field with its ``SINKSERVE_`` variable,
and every engine setting is an ``EngineConfig`` field, all derived from that one declaration."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from engine.config import EngineConfig, engine_options, option
from server.cli import _value_type, add_setting_flags, build_parser, flag_of
from server.settings import Settings, engine_settings, settings_model
from sinkserve.cli import main as sinkserve_main

# the flags and variables the README, compose.yaml, the Dockerfile and the scripts use: they keep working
KNOWN_FLAGS = {
    "--host", "--port", "--model", "--device", "--dtype", "--sink-tokens", "--window", "--api-key-file",
    "--data-dir", "--cache-dir", "--memory-budget-mb", "--quantize", "--max-batch", "--prefill-chunk",
    "--threads", "--log-level", "--sampling-defaults", "--graceful-timeout", "--session-store",
    "--replica-name", "--api-key", "--pin-system-prompt", "--compile",
}
KNOWN_VARIABLES = {
    "SINKSERVE_HOST", "SINKSERVE_PORT", "SINKSERVE_MODEL", "SINKSERVE_DEVICE", "SINKSERVE_DTYPE",
    "SINKSERVE_SINK_TOKENS", "SINKSERVE_WINDOW", "SINKSERVE_PIN_SYSTEM_PROMPT", "SINKSERVE_API_KEYS",
    "SINKSERVE_API_KEY_FILE", "SINKSERVE_MEMORY_BUDGET_MB", "SINKSERVE_DATA_DIR", "SINKSERVE_CACHE_DIR",
    "SINKSERVE_COMPILE", "SINKSERVE_QUANTIZE", "SINKSERVE_THREADS", "SINKSERVE_MAX_BATCH",
    "SINKSERVE_PREFILL_CHUNK", "SINKSERVE_SAMPLING_DEFAULTS", "SINKSERVE_TIMEOUT_GRACEFUL_SHUTDOWN",
    "SINKSERVE_SESSION_STORE", "SINKSERVE_REPLICA", "SINKSERVE_MAX_BODY_BYTES", "SINKSERVE_MAX_MESSAGES",
    "SINKSERVE_MAX_PROMPT_TOKENS", "SINKSERVE_MAX_TOKENS_CAP", "SINKSERVE_MAX_CONCURRENT_PER_KEY",
    "SINKSERVE_DEFAULT_MAX_TOKENS", "SINKSERVE_MAX_QUEUE", "SINKSERVE_CORS_ORIGINS", "SINKSERVE_LOG_LEVEL",
}


def serve_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return [a for a in commands.choices["serve"]._actions if a.dest != "help"]


def sample(flag: str, info) -> tuple[list[str], str]:
    """A value unlike the setting's default: as command line words and as the variable's text."""
    extra, kind = info.json_schema_extra or {}, _value_type(info.annotation)
    if "choices" in extra:
        value = next(c for c in extra["choices"] if c != info.default)
        return [flag, value], value
    if kind is bool:
        return [flag], "true"
    if kind is list:
        return [flag, "a", flag, "b"], "a,b"
    text = {dict: '{"temperature": 0.5}', int: "7", float: "7.5", Path: "/tmp/sinkserve-sample"}.get(kind, "sample")
    return [flag, text], text


def test_every_serve_flag_has_its_variable_and_engine_field(monkeypatch):
    """For each flag: the same value given as the flag and as SINKSERVE_<FIELD> gives the same setting, not the
    default; for each engine setting, that value arrives in the EngineConfig field it is mapped to."""
    actions = serve_actions(build_parser())
    assert {a.dest for a in actions} == set(Settings.model_fields)  # one flag per setting, nothing else
    assert KNOWN_FLAGS <= {s for a in actions for s in a.option_strings}
    assert KNOWN_VARIABLES <= {f"SINKSERVE_{name.upper()}" for name in Settings.model_fields}
    mapped = engine_settings()
    assert {"window", "quantize", "memory_budget_mb", "replica"} <= set(mapped)
    for action in actions:
        name, info = action.dest, Settings.model_fields[action.dest]
        assert action.help and action.option_strings == [flag_of(name, info)]
        words, text = sample(action.option_strings[0], info)
        given = vars(build_parser().parse_args(["serve", *words]))
        from_flag = Settings(**{k: v for k, v in given.items() if k in Settings.model_fields and v is not None})
        monkeypatch.setenv(f"SINKSERVE_{name.upper()}", text)
        from_env = Settings()
        monkeypatch.delenv(f"SINKSERVE_{name.upper()}")
        value = getattr(from_env, name)
        assert value == getattr(from_flag, name) and value != getattr(Settings(), name), name
        if name in mapped:
            scale = engine_options()[mapped[name]].metadata["option"].scale
            assert getattr(from_env.engine_config(), mapped[name]) == (value if scale == 1 else value * scale), name


def test_engine_defaults_come_from_the_engine():
    assert Settings().engine_config() == EngineConfig()
    assert Settings(window=16).engine_config().evict_block == 16  # the one derived field
    assert "evict_block" not in Settings.model_fields and "session_ttl_s" not in Settings.model_fields


@dataclass(frozen=True)
class WiderConfig(EngineConfig):
    """EngineConfig with one more option, declared only here."""

    draft_tokens: int = option(3, help="tokens a draft model proposes per step")


def test_an_option_declared_once_is_a_flag_a_variable_and_an_engine_field(monkeypatch):
    model = settings_model(WiderConfig)
    parser = argparse.ArgumentParser()
    add_setting_flags(parser, model)
    assert parser.parse_args(["--draft-tokens", "5"]).draft_tokens == 5
    assert "tokens a draft model proposes" in parser.format_help()
    monkeypatch.setenv("SINKSERVE_DRAFT_TOKENS", "9")
    config = model().engine_config()
    assert isinstance(config, WiderConfig) and config.draft_tokens == 9
    assert engine_settings(model)["draft_tokens"] == "draft_tokens"
    assert "draft_tokens" not in Settings.model_fields  # the real settings are untouched


def test_environment_variables_parse_as_before(monkeypatch):
    monkeypatch.setenv("SINKSERVE_API_KEYS", "k1, k2")
    monkeypatch.setenv("SINKSERVE_QUANTIZE", "none")
    monkeypatch.setenv("SINKSERVE_SAMPLING_DEFAULTS", json.dumps({"top_k": 40}))
    monkeypatch.setenv("SINKSERVE_MEMORY_BUDGET_MB", "3")
    settings = Settings()
    assert settings.api_keys == ["k1", "k2"] and settings.quantize is None
    config = settings.engine_config()
    assert (config.quantize, config.sampling_defaults, config.memory_budget_bytes) == (None, {"top_k": 40}, 3 << 20)


def test_bad_values_are_refused():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--quantize", "int3"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--port", "eighty"])
    with pytest.raises(ValueError, match="quantize"):
        Settings(quantize="int3")


def test_the_sinkserve_command_mounts_serve_eval_and_bench(capsys):
    for argv in (["serve", "--help"], ["eval", "--help"], ["bench", "--help"]):
        with pytest.raises(SystemExit) as stop:
            sinkserve_main(argv)
        assert stop.value.code == 0
        assert f"sinkserve {argv[0]}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        sinkserve_main(["bench"])  # no suite
    assert stop.value.code == 2 and "suite" in capsys.readouterr().err
