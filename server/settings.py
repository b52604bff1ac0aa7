"""Server settings, declared once: the ``SINKSERVE_*`` environment variables, the ``serve`` flags and the
engine config all come from the one ``Settings`` model.

Two kinds of fields: the server's own, declared below with :func:`setting` (a default and the help), and
the engine's, generated from the fields of ``EngineConfig`` that ``engine/config.py`` declares with
``option(...)``, so an engine option is written once, there. pydantic-settings
(https://docs.pydantic.dev/latest/concepts/pydantic_settings/) reads each field from ``SINKSERVE_<NAME>``;
``server/cli.py`` makes a flag of each field (:func:`flag_of`, help from its description);
``engine_config()`` hands the engine fields to ``EngineConfig``, which validates them.
"""

from __future__ import annotations

from dataclasses import MISSING
from pathlib import Path
from typing import Annotated, Any, ClassVar, get_type_hints

from pydantic import Field, create_model, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from engine import EngineConfig, check_sampling_defaults, engine_options, parse_quantize

MiB = 1024 * 1024
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def setting(default: Any = None, *, help: str, default_factory=None, **cli) -> Any:
    """A server setting: ``help`` is its flag's help; ``cli``: ``flag`` (when not ``--name``), ``choices``."""
    extra = cli or None
    if default_factory is not None:
        return Field(default_factory=default_factory, description=help, json_schema_extra=extra)
    return Field(default, description=help, json_schema_extra=extra)


class ServerSettings(BaseSettings):
    """The server's own settings; :data:`Settings` adds the engine's."""

    model_config = SettingsConfigDict(env_prefix="SINKSERVE_", env_ignore_empty=True, extra="ignore")
    engine_class: ClassVar[type] = EngineConfig  # what engine_config() builds; settings_model() sets it

    # listening
    host: str = setting("127.0.0.1", help="address to listen on (127.0.0.1)")
    port: int = setting(8000, help="port to listen on (8000)")
    log_level: str = setting("info", choices=LOG_LEVELS, help="log level (info)")
    timeout_graceful_shutdown: float = setting(10.0, flag="--graceful-timeout", help="seconds to finish requests")
    cors_origins: Annotated[list[str], NoDecode] = setting(
        default_factory=list, flag="--cors-origin",
        help="an origin browsers may call from (repeatable; the environment variable: a comma list)")

    # the cache
    pin_system_prompt: bool = setting(False, help="keep system prompts in the cache's pinned sink region")

    # access
    api_keys: Annotated[list[str], NoDecode] = setting(
        default_factory=list, flag="--api-key",
        help="accepted bearer key (repeatable; the environment variable: a comma list); none: no authentication")
    api_key_file: Path | None = setting(None, help="a file of accepted keys, one a line; '#' starts a comment")

    # limits on what one request may ask for
    max_body_bytes: int = setting(4 * MiB, help="largest request body in bytes (4 MiB)")
    max_messages: int = setting(2048, help="most messages in one request (2048)")
    max_prompt_tokens: int = setting(1_000_000, help="most prompt tokens in one request (1000000)")
    max_tokens_cap: int = setting(4096, help="largest max_tokens a request may ask for (4096)")
    default_max_tokens: int = setting(1024, help="max_tokens of a request that sets none (1024)")
    max_concurrent_per_key: int = setting(16, help="requests one API key may have in flight (16)")

    @field_validator("quantize", mode="before", check_fields=False)
    @classmethod
    def _quantize(cls, value):
        return parse_quantize(value)

    @field_validator("sampling_defaults", mode="before", check_fields=False)
    @classmethod
    def _sampling_defaults(cls, value):
        if value is not None:
            check_sampling_defaults(value)  # unknown names and bad values stop the start
        return value

    @field_validator("api_keys", "cors_origins", mode="before")
    @classmethod
    def _split_commas(cls, value):
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    def allowed_keys(self) -> frozenset[str]:
        """Keys from ``api_keys`` and ``api_key_file`` together; empty means authentication is off."""
        keys = set(self.api_keys)
        if self.api_key_file is not None:
            for line in Path(self.api_key_file).read_text().splitlines():
                line = line.split("#", 1)[0].strip()
                if line:
                    keys.add(line)
        return frozenset(keys)

    def engine_config(self) -> EngineConfig:
        """The engine fields as an ``EngineConfig``; a path left unset keeps the engine's default."""
        values, declared_fields = {}, engine_options(self.engine_class)
        for name, target in engine_settings(type(self)).items():
            value, declared = getattr(self, name), declared_fields[target]
            if value is None and declared.default_factory is not MISSING:
                continue
            scale = declared.metadata["option"].scale
            values[target] = value if value is None or scale == 1 else value * scale
        # the default eviction block (64) cannot exceed a small window: evict in smaller blocks then
        values["evict_block"] = min(EngineConfig.evict_block, self.window) if self.window >= 1 else 1
        return self.engine_class(**values)


def _engine_fields(config: type) -> dict[str, tuple[Any, FieldInfo]]:
    """One settings field per field ``config`` offers: its type, default, help and flag."""
    hints = get_type_hints(config)
    generated = {}
    for name, declared in engine_options(config).items():
        offered = declared.metadata["option"]
        kind, default = hints[name], declared.default
        if declared.default_factory is not MISSING:  # a path under SINKSERVE_HOME: None until given
            kind, default = kind | None, None
        elif default is not None and offered.scale != 1:
            default //= offered.scale
        cli = {"engine": name, "flag": offered.flag, "choices": offered.choices, "metavar": offered.metavar}
        extra = {key: value for key, value in cli.items() if value is not None}
        generated[offered.name or name] = (kind, Field(default, description=offered.help, json_schema_extra=extra))
    return generated


def settings_model(config: type = EngineConfig) -> type[ServerSettings]:
    """ServerSettings plus a field for each option ``config`` (EngineConfig or a subclass) offers."""
    model = create_model("Settings", __base__=ServerSettings, __module__=__name__, **_engine_fields(config))
    model.__doc__ = "Every setting: the server's (ServerSettings) and the options EngineConfig offers."
    model.engine_class = config
    return model


Settings = settings_model()


def engine_settings(model: type[ServerSettings] = Settings) -> dict[str, str]:
    """The settings of ``model`` that are engine options, mapped to their engine field."""
    return {name: info.json_schema_extra["engine"] for name, info in model.model_fields.items()
            if isinstance(info.json_schema_extra, dict) and "engine" in info.json_schema_extra}
