"""bench constrained on the tiny model: both kinds generate the same tokens, the constrained replies follow
the schema (the suite checks every reply), and the cost is computed from the medians it reports."""

from __future__ import annotations

import pytest

from bench.constrained import run_constrained
from tests.tiny_models import tiny_engine


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    eng = tiny_engine(tmp_path_factory.mktemp("bench-constrained"), window=124, max_positions=256)
    yield eng
    eng.stop()


def test_constrained_suite_reports_consistent_figures(engine, tmp_path):
    report = run_constrained(engine, tmp_path, sessions=2, rounds=2, max_tokens=24, prompt_tokens=16)
    free, constrained = report["results"]["free"], report["results"]["constrained"]
    assert free["generated_tokens"] == constrained["generated_tokens"] == 2 * 24
    assert all(len(r["per_round"]) == 2 for r in (free, constrained))
    expected = 1 - constrained["decode_tokens_per_s"] / free["decode_tokens_per_s"]
    assert report["cost"]["decode_tokens_per_s"] == pytest.approx(expected)
    assert (tmp_path / "constrained.json").exists() and "constrained decoding costs" in (tmp_path / "constrained.md").read_text()
