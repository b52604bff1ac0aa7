"""Server settings: typed, read from ``SINKSERVE_*`` environment variables, filled in by the CLI.

pydantic-settings (https://docs.pydantic.dev/latest/concepts/pydantic_settings/) does the parsing;
``engine_config()`` turns the engine half into ``engine.config.EngineConfig``, which validates it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from engine.config import EngineConfig, check_sampling_defaults, parse_quantize

MiB = 1024 * 1024


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SINKSERVE_", env_ignore_empty=True, extra="ignore")

    # listening
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "info"
    timeout_graceful_shutdown: float = 10.0
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # model and cache
    model: str | None = None  # None: the embedded SmolLM2-135M-Instruct
    device: str = "auto"
    dtype: str = "auto"  # bfloat16 on a GPU, float32 on a CPU
    sink_tokens: int = 4
    window: int = 1020
    memory_budget_mb: int | None = None  # resident session caches; None: the engine default
    data_dir: Path | None = None
    cache_dir: Path | None = None
    pin_system_prompt: bool = False
    quantize: str | None = "auto"  # auto (int4 on CPU for Q4_1 GGUF weights), none, int4, int8
    compile: bool = False  # torch.compile the decode step (slower first start)
    threads: int | None = None  # torch intra-op threads on CPU
    max_batch: int | None = None  # sessions decoding together in one forward pass; None: 64 on a GPU, 8 on a CPU
    prefill_chunk: int = EngineConfig.prefill_chunk  # prompt tokens fed per scheduler step (token budget)
    # defaults for sampling fields a request omits, over the model's (a JSON object in the environment)
    sampling_defaults: dict[str, float] | None = None
    # a cluster (README: Scale-out): the shared session store's redis:// URL, and this replica's name
    session_store: str | None = None
    replica: str | None = None  # None: the host name

    # access
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)  # empty: no authentication
    api_key_file: Path | None = None  # one key a line; '#' starts a comment

    # limits on what one request may ask for
    max_body_bytes: int = 4 * MiB
    max_messages: int = 2048
    max_prompt_tokens: int = 1_000_000
    max_tokens_cap: int = 4096
    default_max_tokens: int = 1024
    max_concurrent_per_key: int = 16
    max_queue: int = 256  # requests waiting for admission; beyond it 429 (engine Overloaded)

    @field_validator("quantize", mode="before")
    @classmethod
    def _quantize(cls, value):
        return parse_quantize(value)

    @field_validator("sampling_defaults", mode="before")
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
        extra = {}
        if self.data_dir is not None:
            extra["data_dir"] = self.data_dir
        if self.cache_dir is not None:
            extra["cache_dir"] = self.cache_dir
        if self.memory_budget_mb is not None:
            extra["memory_budget_bytes"] = self.memory_budget_mb * MiB
        # the default eviction block (64) cannot exceed a small window: evict in smaller blocks then
        extra["evict_block"] = min(EngineConfig.evict_block, self.window) if self.window >= 1 else 1
        return EngineConfig(
            model=self.model, device=self.device, dtype=self.dtype,
            sink_tokens=self.sink_tokens, window=self.window, max_queue=self.max_queue,
            compile=self.compile, threads=self.threads, quantize=self.quantize, max_batch=self.max_batch,
            prefill_chunk=self.prefill_chunk, sampling_defaults=self.sampling_defaults,
            session_store=self.session_store, replica=self.replica, **extra,
        )
