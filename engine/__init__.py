"""sinkserve's engine: model loading, the sink cache, sessions, sampling and scheduling (no HTTP here).

These names are the engine's public face: the server imports the engine only through them
(tests/test_layout.py checks it); the rooms behind them (model/, cache/, sessions/, scheduling/) may move.
"""

from engine.config import (
    QUANTIZE_CHOICES,
    SAMPLING_DEFAULT_FIELDS,
    EngineConfig,
    Option,
    check_sampling_defaults,
    engine_options,
    parse_quantize,
)
from engine.engine import Engine, owner_of
from engine.errors import (
    EngineError,
    InvalidRequest,
    NotReady,
    Overloaded,
    SessionBusy,
    SessionNotFound,
    ShuttingDown,
)
from engine.events import Admission, FinishEvent, Generation, TokenEvent, TokenLogprob, Usage
from engine.scheduling.grammar import MAX_GRAMMAR_CHARS, Constraint, Grammar
from engine.scheduling.sampling import SamplingParams
from engine.sessions.store import check_session_id

__all__ = [
    "MAX_GRAMMAR_CHARS",
    "QUANTIZE_CHOICES",
    "SAMPLING_DEFAULT_FIELDS",
    "Admission",
    "Constraint",
    "Engine",
    "EngineConfig",
    "EngineError",
    "FinishEvent",
    "Generation",
    "Grammar",
    "InvalidRequest",
    "NotReady",
    "Option",
    "Overloaded",
    "SamplingParams",
    "SessionBusy",
    "SessionNotFound",
    "ShuttingDown",
    "TokenEvent",
    "TokenLogprob",
    "Usage",
    "check_sampling_defaults",
    "check_session_id",
    "engine_options",
    "owner_of",
    "parse_quantize",
]
