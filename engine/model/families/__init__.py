"""The family registry: which model types decode through a step this server owns, and which through
transformers' forward.

A family is one module in this folder with a decoder class (built from ``(model, cache, quantize)``;
raises ValueError for a model it does not cover) and an ``unsupported_reason(model, quantize)`` saying why
it cannot run a model (None: it can). One :func:`register` line at the bottom of this file maps the
``model_type`` values of ``config.json`` it serves to it. Every other model type decodes through
transformers' forward (engine/model/runner.py), which stays the reference for the owned steps.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import torch

from engine.cache.sink import CacheStep, SinkCache
from engine.model.linear import release_freed_memory

log = logging.getLogger(__name__)

OWNED = "owned"  # decode paths, as the start-up log and /health's model info name them
TRANSFORMERS = "transformers"


class Decoder(Protocol):
    """What the runner asks of a family's owned decode step."""

    prefills: bool  # whether it also runs prompt chunks (``prefill``, ``prefill_rows``)

    def __call__(self, step: CacheStep, tokens: torch.Tensor) -> torch.Tensor: ...

    def tune(self, max_rows: int) -> object: ...


@dataclass(frozen=True)
class Family:
    """A family whose decode step this server owns."""

    name: str
    decoder: Callable[[torch.nn.Module, SinkCache, str | None], Decoder]
    unsupported_reason: Callable[[torch.nn.Module, str | None], str | None]


FAMILIES: dict[str, Family] = {}  # model_type -> its family


def register(model_types: Iterable[str], family: Family) -> None:
    """Decode the models of ``model_types`` through ``family``'s owned step."""
    for model_type in model_types:
        FAMILIES[model_type] = family


def family_of(model: torch.nn.Module) -> Family | None:
    """The registered family of ``model``'s ``model_type`` (None: transformers' forward)."""
    return FAMILIES.get(model.config.model_type)


def unsupported_reason(model: torch.nn.Module, quantize: str | None) -> str | None:
    """Why no owned step can decode ``model`` with ``quantize`` (None: its family's can)."""
    family = family_of(model)
    if family is None:
        return f"model type {model.config.model_type!r} (owned: {sorted(FAMILIES)})"
    return family.unsupported_reason(model, quantize)


def owned_decoder(model: torch.nn.Module, cache: SinkCache, quantize: str | None, max_rows: int) -> Decoder | None:
    """The owned decode step for ``model``, its kernels tuned for up to ``max_rows`` rows; None (logged)
    when the model needs transformers' forward."""
    family, reason = family_of(model), unsupported_reason(model, quantize)
    try:
        if reason is not None:
            raise ValueError(reason)
        decoder = family.decoder(model, cache, quantize)  # may still decline the model (ValueError)
    except ValueError as exc:
        log.info("decoding %s with transformers' forward: %s", model.config.model_type, exc)
        return None
    decoder.tune(max_rows)
    release_freed_memory()
    log.info("decoding %s through the owned %s step", model.config.model_type, family.name)
    return decoder


def model_info(model: torch.nn.Module, decoder: Decoder | None) -> dict[str, str | None]:
    """What /health says of the model: its ``model_type``, its registered family (None when it has none)
    and the path its decode steps take (``owned`` or ``transformers``)."""
    family = family_of(model)
    return {
        "model_type": model.config.model_type,
        "family": family.name if family is not None else None,
        "decode": OWNED if decoder is not None else TRANSFORMERS,
    }


from engine.model.families import llama  # noqa: E402 (the families register below, after the registry)

register(llama.MODEL_TYPES, Family("llama", llama.LlamaDecoder, llama.unsupported_reason))

from engine.model.families import gemma  # noqa: E402

register(gemma.MODEL_TYPES, Family("gemma", gemma.GemmaDecoder, gemma.unsupported_reason))

from engine.model.families import gpt_oss  # noqa: E402

register(gpt_oss.MODEL_TYPES, Family("gpt_oss", gpt_oss.GptOssDecoder, gpt_oss.unsupported_reason))

from engine.model.families import qwen3  # noqa: E402

register(qwen3.MODEL_TYPES, Family("qwen3", qwen3.Qwen3Decoder, qwen3.unsupported_reason))

from engine.model.families import phi3  # noqa: E402

register(phi3.MODEL_TYPES, Family("phi3", phi3.Phi3Decoder, phi3.unsupported_reason))
