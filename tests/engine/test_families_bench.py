"""Timing a family's decode step on a model directory: scripts/make_shaped_model.py writes a random model
with a real family's shapes, and ``bench decode --model DIR`` loads it and compares the owned step with
transformers' forward step for step (bench/decode.py ``step_comparison``). Tiny sizes; the numbers mean
nothing here."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from bench.cli import main as bench_main
from bench.decode import step_comparison
from engine.config import EngineConfig
from engine.model.loader import load, prepare
from tests.tiny_models import tiny_chat_family_parts

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "make_shaped_model.py"


def make_shaped_model():
    spec = importlib.util.spec_from_file_location("make_shaped_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_shaped_model_has_qwen3_0_6b_shapes(tmp_path):
    folder = make_shaped_model().make_shaped_model("qwen3-0.6b", tmp_path / "q", layers=1)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "qwen3"
    assert {k: config[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                                   "intermediate_size", "tie_word_embeddings", "num_hidden_layers")} == {
        "hidden_size": 1024, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
        "intermediate_size": 3072, "tie_word_embeddings": True, "num_hidden_layers": 1}
    assert make_shaped_model().SHAPES["qwen3-0.6b"]().num_hidden_layers == 28
    loaded = load(EngineConfig(model=str(folder), device="cpu", dtype="float32", sink_tokens=4, window=60,
                               evict_block=8))
    assert loaded.vocab_size == len(loaded.tokenizer) == config["vocab_size"]


@pytest.mark.parametrize("family,name", [("qwen3", "qwen3"), ("phi3", "phi3")])
def test_step_comparison_times_both_paths_at_each_row_count(family, name):
    model, tokenizer = tiny_chat_family_parts(family)
    loaded = prepare(model, tokenizer, "tiny", EngineConfig(sink_tokens=4, window=60, evict_block=8))
    report = step_comparison(loaded, (1, 3), history=20, sink_tokens=4, window=60, evict_block=8, chunk=16,
                             step_count=4, rounds=2)
    assert report["family"] == name and report["history_tokens"] == 20
    assert set(report["rows"]) == {"1", "3"}
    for entry in report["rows"].values():
        assert entry["owned"]["steps"] == entry["transformers"]["steps"] == 4
        assert entry["owned"]["ms_per_step"] > 0 and entry["transformers_over_owned"] > 0
    # every row got its history, then (warm-up and timed) steps of both paths: 3 rounds of 2 steps, twice
    assert report["cache_tokens"] == 20 + 2 * (3 * 2) * 2


def test_step_comparison_says_why_it_skips_a_model_no_owned_step_covers():
    model, tokenizer = tiny_chat_family_parts("olmo")
    loaded = prepare(model, tokenizer, "tiny", EngineConfig(sink_tokens=4, window=60, evict_block=8))
    report = step_comparison(loaded, (1, 2), history=8, sink_tokens=4, window=60, evict_block=8, chunk=8)
    assert report == {"skipped": "no owned decode step covers model type 'olmo'"}


def test_bench_decode_runs_on_a_model_directory(tmp_path):
    folder = make_shaped_model().make_shaped_model("qwen3-0.6b", tmp_path / "q", layers=1)
    out = tmp_path / "out"
    assert bench_main(["decode", "--model", str(folder), "--device", "cpu", "--dtype", "float32", "--lengths", "24",
                       "--out", str(out), "--dense-budget-s", "0"]) == 0
    report = json.loads((out / "decode.json").read_text())
    assert report["environment"]["model"] == "q"
    assert report["steps"]["family"] == "qwen3" and set(report["steps"]["rows"]) == {"1", "8"}
    assert "transformers' forward ms/step" in (out / "decode.md").read_text()
