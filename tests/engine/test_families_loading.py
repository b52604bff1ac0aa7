"""Loading a model of any family from a Hugging Face directory (engine/model/loader.py): the families without
sliding layers start on their owned step; a model type transformers cannot load, or cannot build as a
causal LM, fails at start naming it; one transformers loads but no owned step covers decodes through
transformers' forward, with a warning on a CPU, and on a GPU only when the operator opts in."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from transformers import ViTConfig

from engine.cache.rope import UnsupportedModelError
from engine.config import EngineConfig
from engine.engine import Engine
from engine.model import loader
from engine.model.loader import check_decode_path, load
from tests.tiny_models import tiny_chat_family_parts, tiny_model


def saved(tmp_path, family: str):
    """A directory holding a tiny random model of ``family`` with the embedded tokenizer."""
    model, tokenizer = tiny_chat_family_parts(family)
    folder = tmp_path / family
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model


def config_for(folder, **fields) -> EngineConfig:
    return EngineConfig(model=str(folder), sink_tokens=4, window=60, evict_block=8, device="cpu", dtype="float32",
                        data_dir=folder / "sessions", **fields)


@pytest.mark.parametrize("family,name", [("qwen3", "qwen3"), ("phi3_longrope", "phi3"), ("llama3", "llama")])
def test_a_directory_of_each_family_starts_on_its_owned_step(tmp_path, family, name):
    folder, model = saved(tmp_path, family)
    engine = Engine(config_for(folder)).start()
    try:
        assert engine.model_info() == {"model_type": model.config.model_type, "family": name, "decode": "owned"}
        ids = torch.tensor([[5, 6, 7]])
        torch.testing.assert_close(engine.loaded.model(ids).logits, model(ids).logits)
    finally:
        engine.stop()


def test_a_model_type_transformers_cannot_load_fails_at_start_naming_it(tmp_path):
    folder, _ = saved(tmp_path, "qwen3")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="sinkserve_no_such_arch", architectures=["NoSuchArchForCausalLM"])
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="'sinkserve_no_such_arch'.*NoSuchArchForCausalLM"):
        Engine(config_for(folder)).start()


def test_a_model_type_that_is_no_causal_lm_fails_at_start_naming_it(tmp_path):
    folder, _ = saved(tmp_path, "qwen3")
    (folder / "config.json").write_text(ViTConfig().to_json_string())
    with pytest.raises(UnsupportedModelError, match="model type 'vit' cannot be served as a causal LM"):
        load(config_for(folder))


def test_a_family_no_owned_step_covers_decodes_through_transformers_on_a_cpu(tmp_path, caplog):
    folder, _ = saved(tmp_path, "olmo")
    with caplog.at_level(logging.WARNING, logger="engine.model.loader"):
        engine = Engine(config_for(folder)).start()
    try:
        assert engine.model_info() == {"model_type": "olmo", "family": None, "decode": "transformers"}
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("'olmo' decodes through transformers' forward" in w for w in warnings), warnings
    finally:
        engine.stop()


def test_on_a_gpu_a_family_no_owned_step_covers_fails_unless_the_operator_opts_in(caplog):
    gpu = torch.device("cuda")  # the decision only; nothing runs on the device
    olmo = tiny_model("olmo")
    with pytest.raises(UnsupportedModelError, match="model type 'olmo'.*allow_transformers_decode=True"):
        check_decode_path(olmo, None, gpu)
    with caplog.at_level(logging.WARNING, logger="engine.model.loader"):
        assert "olmo" in check_decode_path(olmo, None, gpu, allow_transformers_decode=True)
    assert "'olmo' decodes through transformers' forward" in caplog.text
    assert check_decode_path(olmo, None, gpu, compile_decode=True)  # --compile chose transformers' forward
    with pytest.raises(UnsupportedModelError, match="quantize=int8"):  # a covered family, weights it cannot run
        check_decode_path(tiny_model("qwen3"), "int8", gpu)
    for family in ("qwen3", "phi3", "llama3", "mistral", "qwen2_5"):
        assert check_decode_path(tiny_model(family), None, gpu) is None


def test_load_hands_the_opt_in_to_the_check(tmp_path, monkeypatch):
    folder, _ = saved(tmp_path, "olmo")
    seen = []

    def check(model, mode, device, allow=False, compile_decode=False):
        seen.append((model.config.model_type, device.type, allow))

    monkeypatch.setattr(loader, "check_decode_path", check)
    load(config_for(folder), allow_transformers_decode=True)
    load(config_for(folder))
    assert seen == [("olmo", "cpu", True), ("olmo", "cpu", False)]
