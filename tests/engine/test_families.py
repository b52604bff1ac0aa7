"""The family registry (engine/model/families): a family registered there is the one a model of its
``model_type`` decodes through, with no other engine file changed; every other model type keeps
transformers' forward; the start-up path is reported by ``Engine.model_info()`` and ``/health``."""

from __future__ import annotations

import torch

from engine.cache.sink import SinkCache
from engine.config import EngineConfig
from engine.model import families
from engine.model.families import Family, register
from engine.model.loader import prepare
from engine.model.runner import Runner, serving_runner
from tests.engine.generation import greedy_decode
from tests.tiny_models import tiny_engine, tiny_model

CONFIG = EngineConfig(sink_tokens=4, window=28, evict_block=4)


class CountingDecoder:
    """A stand-in owned step: transformers' forward over the step's cache, counting its calls."""

    prefills = False

    def __init__(self, model: torch.nn.Module, cache: SinkCache, quantize: str | None) -> None:
        self.model, self.calls, self.tuned = model, 0, None

    def tune(self, max_rows: int) -> None:
        self.tuned = max_rows

    def __call__(self, step, tokens: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = self.model(input_ids=tokens[:, None], position_ids=step.position_ids(),
                         attention_mask=step.attention_mask(), cache=step, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float()


def cache_for(model: torch.nn.Module, rows: int = 2) -> SinkCache:
    loaded = prepare(model, None, "tiny", CONFIG)
    return SinkCache(loaded.shape, rows, CONFIG.cache_size, 4, 4, loaded.inv_freqs)


def test_a_registered_family_decodes_its_model_type(monkeypatch):
    monkeypatch.setattr(families, "FAMILIES", dict(families.FAMILIES))  # the registration ends with the test
    model = tiny_model("olmo")
    assert serving_runner(model, cache_for(model), None, max_rows=2).model_info()["decode"] == "transformers"
    register(["olmo"], Family("counting", CountingDecoder, lambda model, quantize: None))
    runner = serving_runner(model, cache_for(model), None, max_rows=2)
    assert isinstance(runner.decoder, CountingDecoder) and runner.decoder.tuned == 2
    assert runner.model_info() == {"model_type": "olmo", "family": "counting", "decode": "owned"}
    prompts = [[1, 5, 9, 13, 2], [7, 7, 3]]
    got, _ = greedy_decode(runner, prompts, steps=6)
    assert runner.decoder.calls == 6  # every decode step went through the family's step
    expected, _ = greedy_decode(Runner(model, cache_for(model)), prompts, steps=6)
    assert got == expected


def test_a_family_that_declines_a_model_leaves_it_to_transformers(monkeypatch):
    monkeypatch.setattr(families, "FAMILIES", dict(families.FAMILIES))
    model = tiny_model("olmo")
    register(["olmo"], Family("declining", CountingDecoder, lambda model, quantize: "not this one"))
    assert families.unsupported_reason(model, None) == "not this one"
    runner = serving_runner(model, cache_for(model), None, max_rows=1)
    assert runner.decoder is None
    assert runner.model_info() == {"model_type": "olmo", "family": "declining", "decode": "transformers"}
    register(["olmo"], Family("raising", _raising, lambda model, quantize: None))  # its class declines it
    runner = serving_runner(model, cache_for(model), None, max_rows=1)
    assert runner.decoder is None
    assert runner.model_info() == {"model_type": "olmo", "family": "raising", "decode": "transformers"}


def _raising(model, cache, quantize):
    raise ValueError("the owned decode step does not cover this model: a test")


def test_registered_and_unregistered_model_types():
    assert {t: families.FAMILIES[t].name for t in ("llama", "mistral", "qwen2")} == dict.fromkeys(
        ("llama", "mistral", "qwen2"), "llama")
    for family in ("olmo", "gemma"):
        model = tiny_model(family)
        assert family in families.unsupported_reason(model, None)
        runner = serving_runner(model, cache_for(model), None, max_rows=1)
        assert runner.model_info() == {"model_type": family, "family": None, "decode": "transformers"}


def test_engine_and_health_report_the_decode_path(tmp_path):
    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.settings import Settings

    engine = tiny_engine(tmp_path)
    try:
        assert engine.model_info() == {"model_type": "llama", "family": "llama", "decode": "owned"}
        with TestClient(create_app(Settings(), engine=engine)) as client:
            body = client.get("/health").json()
        assert body["status"] == "ok" and body["model"] == engine.model_info()
    finally:
        engine.stop()
