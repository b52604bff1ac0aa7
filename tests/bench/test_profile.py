"""The per-step profile on the tiny model: every category measured, the wrappers removed afterwards."""

from __future__ import annotations

import json

import engine.scheduling.output as output_module
import engine.scheduling.scheduler as scheduler_module
from bench.profile import CATEGORIES, run_profile
from engine.scheduling.stops import IncrementalDetokenizer
from tests.tiny_models import tiny_engine


def test_profile_splits_decode_steps(tmp_path):
    engine = tiny_engine(tmp_path, window=60, max_positions=128, max_batch=4)
    originals = (engine.scheduler.runner.forward, output_module.sample, IncrementalDetokenizer.push,
                 scheduler_module.Request.emit)
    try:
        report = run_profile(engine, tmp_path / "out", batches=[1, 3, 8], prompt_tokens=12, max_tokens=6)
        assert (engine.scheduler.runner.forward, output_module.sample, IncrementalDetokenizer.push,
                scheduler_module.Request.emit) == originals
        assert "step" not in vars(engine.scheduler)
    finally:
        engine.stop()
    saved = json.loads((tmp_path / "out" / "profile.json").read_text())
    one, three, eight = saved["results"]
    assert eight["steps"] == 0 and "max_batch" in eight["skipped"]
    for result in (one, three):
        assert 3 <= result["steps"] <= 5  # 6 tokens: the first comes from the prefill step
        for category in CATEGORIES:
            assert result["ms"][category] >= 0
        assert result["ms"]["forward"] > 0 and result["ms"]["sampling"] > 0 and result["ms"]["detokenize"] > 0
        assert result["ms"]["handoff"] > 0
        parts = sum(result["ms"][c] for c in CATEGORIES)
        assert parts <= result["ms"]["total"] * 1.5 and result["ms"]["step"] <= result["ms"]["total"]  # medians of parts need not add up exactly
        assert 0 < result["outside_forward_share"] < 1 and result["client_gap_ms"] > 0
    assert report["files"]["md"].endswith("profile.md")
