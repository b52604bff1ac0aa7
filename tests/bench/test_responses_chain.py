"""The follow-up benchmark's Responses-chain row on a tiny engine: the chain grows, each timed response
reuses the chain behind it from the session cache."""

from __future__ import annotations

from bench.responses_chain import measure_responses_chain
from tests.tiny_models import tiny_engine


def test_responses_chain_row(tmp_path):
    engine = tiny_engine(tmp_path, window=60, max_positions=128)
    try:
        rows = measure_responses_chain(engine, [60, 200], feed=50)
    finally:
        engine.stop()
    first, last = rows
    assert first["chain_tokens"] >= 60 and last["chain_tokens"] >= 200
    for row in rows:
        assert row["ttft_ms"] > 0
        assert row["cached_tokens"] >= 0.9 * row["chain_tokens"], row  # only the question was prefilled
        assert row["input_tokens"] > row["chain_tokens"]


def test_followup_report_has_the_responses_row(tmp_path):
    from bench.followup import run_followup

    engine = tiny_engine(tmp_path, window=60, max_positions=128)
    try:
        report = run_followup(engine, tmp_path / "out", lengths=[30, 120], followup_tokens=5, feed=50)
    finally:
        engine.stop()
    assert [r["chain_tokens"] >= n for r, n in zip(report["responses_chain"], (30, 120), strict=True)] == [True, True]
    assert report["ratios"]["responses_longest_over_shortest"] > 0
    assert "Responses chain" in (tmp_path / "out" / "followup.md").read_text()
    assert (tmp_path / "out" / "followup.png").stat().st_size > 0
