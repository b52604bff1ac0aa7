"""The evaluations (streaming perplexity, attention shares) on a tiny random model: fields, exactness, files."""

from __future__ import annotations

import argparse
import json
import random

import pytest

from engine.cache.sink import CacheShape, SinkCache
from engine.config import EngineConfig
from engine.evaluate.attention import FIRST, run_attention
from engine.evaluate.cli import add_eval_parser
from engine.evaluate.ppl import MODES, SEGMENT, held_tokens, run_ppl
from engine.model.loader import prepare
from tests.tiny_models import tiny_model

SINKS, WINDOW, BLOCK, CHUNK = 4, 60, 16, 16


class CharTokenizer:
    """A stand-in tokenizer: one id (< 96, the tiny models' vocabulary) per character."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) % 96 for c in text]


@pytest.fixture(scope="module")
def loaded():
    config = EngineConfig(sink_tokens=SINKS, window=WINDOW, evict_block=BLOCK)
    return prepare(tiny_model("llama"), CharTokenizer(), "tiny-llama", config)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    rng = random.Random(0)
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789 "
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text("".join(rng.choice(alphabet[:12]) for _ in range(4000)))
    return path


@pytest.fixture(scope="module")
def long_report(loaded, text, tmp_path_factory):
    out = tmp_path_factory.mktemp("ppl")
    report = run_ppl(text, 2 * SEGMENT + 300, MODES, SINKS, WINDOW, out, evict_block=BLOCK, chunk=CHUNK,
                     loaded=loaded)
    return report, out


def test_reports_have_every_field_and_files(long_report):
    report, out = long_report
    on_disk = json.loads((out / "ppl.json").read_text())
    assert set(on_disk["modes"]) == set(MODES)
    for mode, r in on_disk["modes"].items():
        for field in ("ppl", "segments", "tokens", "seconds", "peak_cache_bytes", "cache_bytes_trace"):
            assert field in r, (mode, field)
        assert r["tokens"] == 2 * SEGMENT + 300
        assert len(r["segments"]) == 3 and all(p > 1 for p in r["segments"])
        assert [t for t, _ in r["cache_bytes_trace"]] == [SEGMENT, 2 * SEGMENT]
    for name in ("ppl.png", "ppl.md"):
        assert (out / name).stat().st_size > 0
    assert "| recompute |" in (out / "ppl.md").read_text()


def test_cache_bytes_constant_once_the_window_is_full(long_report, loaded):
    report, _ = long_report
    per_token = loaded.shape.bytes_per_token(loaded.dtype)
    for mode, capacity in (("sink", SINKS + WINDOW), ("window", WINDOW)):
        r = report["modes"][mode]
        sizes = {size for _, size in r["cache_bytes_trace"]}
        assert len(sizes) == 1, (mode, r["cache_bytes_trace"])
        assert r["peak_cache_bytes"] <= capacity * per_token
        assert r["evicted"] > 0
    dense = report["modes"]["dense"]["cache_bytes_trace"]
    assert dense == [[SEGMENT, SEGMENT * per_token], [2 * SEGMENT, 2 * SEGMENT * per_token]]


def test_without_eviction_sink_recompute_and_dense_agree(loaded, text, tmp_path):
    tokens = SINKS + WINDOW  # fills the sink cache exactly: nothing evicted
    report = run_ppl(text, tokens, ["sink", "dense", "recompute"], SINKS, WINDOW, tmp_path,
                     evict_block=BLOCK, chunk=CHUNK, loaded=loaded)
    sink = report["modes"]["sink"]
    assert sink["evicted"] == 0
    for mode in ("dense", "recompute"):
        other = report["modes"][mode]
        assert other["ppl"] == pytest.approx(sink["ppl"], rel=1e-4), mode
        assert other["segments"] == pytest.approx(sink["segments"], rel=1e-4), mode


def test_held_tokens_follow_block_eviction():
    plan = SinkCache(CacheShape(0, 1, 1), 1, SINKS + WINDOW, SINKS, BLOCK, [])
    seen = 0
    for n in (3, 16, 16, 16, 13):  # 64 tokens: full, nothing evicted
        plan.step([0], n)
        seen += n
    assert held_tokens(plan, seen) == (SINKS, SINKS)
    plan.step([0], 5)  # 5 more do not fit: one block of 16 window tokens goes
    assert held_tokens(plan, seen + 5) == (SINKS, SINKS + BLOCK)
    plan = SinkCache(CacheShape(0, 1, 1), 1, SINKS + WINDOW, SINKS, BLOCK, [])
    plan.step([0], 2)
    assert held_tokens(plan, 2) == (2, 2)  # fewer tokens than sinks so far


def test_attention_shares(loaded, text, tmp_path):
    report = run_attention(text, tmp_path, tokens=64, loaded=loaded)
    assert len(report["layers"]) == 2
    for layer in report["layers"]:
        assert len(layer["shares"]) == FIRST
        assert sum(layer["shares"]) + layer["rest"] == pytest.approx(1.0, abs=1e-6)
    assert json.loads((tmp_path / "attention.json").read_text())["tokens"] == 64
    assert (tmp_path / "attention.png").stat().st_size > 0
    assert loaded.model.config._attn_implementation == "sdpa"  # restored after the eager pass


def test_cli_parser():
    parser = argparse.ArgumentParser()
    add_eval_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "ppl", "--tokens", "100", "--mode", "sink,recompute", "--window", "252"])
    assert (args.command, args.eval_command, args.tokens, args.mode, args.window) == (
        "eval", "ppl", 100, ["sink", "recompute"], 252)
    args = parser.parse_args(["eval", "attention", "--tokens", "32", "--out", "x"])
    assert (args.eval_command, args.tokens, args.out) == ("attention", 32, "x")
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "ppl", "--mode", "bogus"])
