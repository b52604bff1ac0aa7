"""sinkserve's engine: model loading, the sink cache, sessions, sampling and scheduling (no HTTP here)."""

from engine.config import EngineConfig
from engine.engine import Engine
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
from engine.scheduling.sampling import SamplingParams

__all__ = [
    "Admission",
    "Engine",
    "EngineConfig",
    "EngineError",
    "FinishEvent",
    "Generation",
    "InvalidRequest",
    "NotReady",
    "Overloaded",
    "SamplingParams",
    "SessionBusy",
    "SessionNotFound",
    "ShuttingDown",
    "TokenEvent",
    "TokenLogprob",
    "Usage",
]
