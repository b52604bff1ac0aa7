"""The benchmark suites' code paths, on tiny models and tiny sizes (the numbers mean nothing here)."""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import types

import pytest

from bench import common
from bench.concurrency import run_concurrency
from bench.decode import measure_decode, run_decode
from bench.followup import measure_followup
from bench.llamacpp import SKIPPED, measure_llamacpp, run_llamacpp
from bench.memory import run_memory
from engine.config import EngineConfig
from engine.model.loader import prepare
from tests.tiny_models import tiny_chat_engine_parts, tiny_engine


@pytest.fixture(scope="module")
def loaded():
    model, tokenizer = tiny_chat_engine_parts(max_positions=128)
    return prepare(model, tokenizer, "tiny-llama", EngineConfig(sink_tokens=4, window=60, evict_block=8))


def test_history_ids_repeat_the_text(loaded):
    ids = common.history_ids(loaded.tokenizer, 50)
    assert len(ids) == 50 and all(isinstance(i, int) for i in ids)


def test_decode_suite(loaded, tmp_path):
    report = run_decode(loaded, tmp_path, lengths=[40, 150], sink_tokens=4, window=60, evict_block=8, chunk=32,
                        decode_steps=4, recompute_window=64, recompute_steps=2, rounds=2)
    saved = json.loads((tmp_path / "decode.json").read_text())
    assert (tmp_path / "decode.png").stat().st_size > 0 and "| history tokens |" in (tmp_path / "decode.md").read_text()
    assert [r["history_tokens"] for r in saved["results"]] == [40, 150]
    for entry in saved["results"]:
        assert entry["sinkserve"]["cache_tokens"] <= 64 and "prefill_s" in entry["dense"]
        for method in ("sinkserve", "dense", "recompute"):  # a mean of positive step times, near their median
            timing = entry[method]
            assert 0 < timing["ms_per_token_median"] and 0.2 < timing["ms_per_token"] / timing["ms_per_token_median"] < 5
        n = str(entry["history_tokens"])
        assert saved["ratios"]["recompute_over_sinkserve"][n] == pytest.approx(
            entry["recompute"]["ms_per_token"] / entry["sinkserve"]["ms_per_token"])
    first, last = saved["results"]
    assert last["dense"]["beyond_trained_positions"] is True and first["dense"]["beyond_trained_positions"] is False
    # each length decodes on a row of its own: every token its stream saw (history, 8 warm-up, 4 timed) is in
    # its cache or counted as evicted, and nothing else (the other length's tokens are not in it)
    for entry in (first, last):
        timing = entry["sinkserve"]
        assert timing["stream_tokens"] == entry["history_tokens"] + 8 + 4
        assert timing["evicted_tokens"] + timing["cache_tokens"] == timing["stream_tokens"]
        assert timing["rounds"] == 2 and len(timing["ms_per_token_round_means"]) == 2
        assert timing["ms_per_token"] == pytest.approx(sum(timing["ms_per_token_round_means"]) / 2)
    assert first["sinkserve"]["evicted_tokens"] == 0 and first["sinkserve"]["cache_tokens"] == 52
    assert last["sinkserve"]["evicted_tokens"] > 0
    assert first["sinkserve"]["history_feed_tokens"] == 40 and last["sinkserve"]["history_feed_tokens"] == 110
    assert saved["settings"]["rounds"] == 2
    assert saved["ratios"]["sinkserve_longest_over_shortest"] == pytest.approx(
        last["sinkserve"]["ms_per_token"] / first["sinkserve"]["ms_per_token"])
    assert saved["ratios"]["sinkserve_longest_over_shortest_median"] == pytest.approx(
        last["sinkserve"]["ms_per_token_median"] / first["sinkserve"]["ms_per_token_median"])
    assert "medians" in (tmp_path / "decode.md").read_text()
    assert report["files"]["json"].endswith("decode.json")


def test_decode_skips_dense_over_budget(loaded):
    report = measure_decode(loaded, [40, 150], sink_tokens=4, window=60, evict_block=8, chunk=32, decode_steps=2,
                            dense_budget_s=0.0, methods=("sinkserve", "dense"))
    dense = [r["dense"] for r in report["results"]]
    assert all(isinstance(d, str) and d.startswith("skipped:") for d in dense)
    assert report["ratios"]["dense_longest_measured"] is None


def test_memory_suite(loaded, tmp_path):
    report = run_memory(loaded, tmp_path, tokens=200, sink_tokens=4, window=60, evict_block=8, chunk=32,
                        sample_every=50)
    saved = json.loads((tmp_path / "memory.json").read_text())
    assert (tmp_path / "memory.png").exists() and (tmp_path / "memory.md").exists()
    assert [s["tokens"] for s in saved["samples"]] == [0, 50, 100, 150, 200]
    assert all(s["cache_bytes"] <= report["cache_bytes_per_row"] for s in saved["samples"])
    assert saved["samples"][-1]["peak_rss_bytes"] > 0 and saved["samples"][-1]["rss_bytes"] > 0
    assert saved["summary"]["cache_bytes_at_end"] <= report["cache_bytes_per_row"]
    assert saved["samples"][-1]["dense_cache_bytes"] > saved["samples"][-1]["cache_bytes"]


def test_followup_suite(tmp_path):
    engine = tiny_engine(tmp_path, window=60, max_positions=128)
    try:
        report = measure_followup(engine, [30, 120], followup_tokens=5, feed=50, rounds=3)
        left = asyncio.run(engine.list_sessions("bench"))
    finally:
        engine.stop()
    assert left == []  # the stream session and each length's session were deleted
    assert report["settings"]["rounds"] == 3
    first, last = report["results"]
    for entry in (first, last):  # every round's follow-up reused the whole history of its own session
        session, n = entry["session"], entry["history_tokens"]
        assert len(session["ttft_ms_samples"]) == 3 and session["ttft_ms"] == statistics.median(session["ttft_ms_samples"])
        assert session["cached_tokens_samples"] == [n] * 3 and session["cached_tokens"] == n
        assert session["prompt_tokens"] == n + 5 and session["location"] == "device"
    assert last["reprefill"]["cached_tokens"] == 0
    assert report["ratios"]["session_longest_over_shortest"] == pytest.approx(
        last["session"]["ttft_ms"] / first["session"]["ttft_ms"])
    for entry in (first, last):
        assert report["ratios"]["reprefill_over_session"][str(entry["history_tokens"])] == pytest.approx(
            entry["reprefill"]["ttft_ms"] / entry["session"]["ttft_ms"])
    json.dumps(report)  # serialisable


def test_concurrency_suite(tmp_path):
    engine = tiny_engine(tmp_path, window=60, max_positions=128, max_batch=16)
    try:
        report = run_concurrency(engine, tmp_path / "out", streams=[1, 3], prompt_tokens=20, max_tokens=6)
    finally:
        engine.stop()
    saved = json.loads((tmp_path / "out" / "concurrency.json").read_text())
    assert (tmp_path / "out" / "concurrency.png").exists()
    assert [r["streams"] for r in saved["results"]] == [1, 3]
    assert [r["generated_tokens"] for r in saved["results"]] == [6, 18]
    for r in saved["results"]:  # tokens/s is what it says: the generated tokens over the wall time
        assert r["tokens_per_s"] == pytest.approx(r["generated_tokens"] / r["wall_s"], rel=1e-6)
        assert r["mean_itl_ms"] <= r["max_itl_ms"]
    one, three = saved["results"]
    assert report["ratios"]["compared"] == [3, 1]
    assert report["ratios"]["tokens_per_s"] == pytest.approx(three["tokens_per_s"] / one["tokens_per_s"])


def test_llamacpp_skipped_without_the_package(loaded, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails
    report = run_llamacpp(loaded, tmp_path)
    saved = json.loads((tmp_path / "llamacpp.json").read_text())
    assert saved["status"] == SKIPPED == report["status"]


def test_llamacpp_comparison_with_a_stand_in(loaded, tmp_path):
    class FakeLlama:
        def __init__(self, model_path, n_threads, **kwargs):
            self.kwargs = kwargs
            self.seen = 0

        def eval(self, tokens):
            self.seen += len(tokens)

        def reset(self):
            self.seen = 0

    module = types.SimpleNamespace(Llama=FakeLlama, __version__="fake")
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"")
    report = measure_llamacpp(loaded, prefill_tokens=20, decode_steps=3, gguf=gguf, module=module, chunk=16)
    assert report["status"] == "ok"
    ours, theirs = report["sinkserve"], report["llamacpp"]
    assert report["ratios"]["decode_sinkserve_over_llamacpp"] == pytest.approx(
        ours["decode_tokens_per_s"] / theirs["decode_tokens_per_s"])
    assert report["ratios"]["prefill_sinkserve_over_llamacpp"] == pytest.approx(
        ours["prefill_tokens_per_s"] / theirs["prefill_tokens_per_s"])


def test_cli_parses_bench():
    from sinkserve.cli import build_parser

    args = build_parser().parse_args(["bench", "decode", "--quick", "--threads", "1", "--device", "cpu",
                                      "--lengths", "1000,4000"])
    assert (args.command, args.suite, args.quick, args.threads, args.lengths) == ("bench", "decode", True, 1, [1000, 4000])
