"""A short run of ``scripts/probe.py`` against a real ``serve`` of the tiny model: no 5xx, no hangs, no
leak between keys, no phantom session, nothing lost after kill -9."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_probe_short_run(tmp_path):
    out = tmp_path / "probe.json"
    run = subprocess.run([sys.executable, "scripts/probe.py", "--storm", "24", "--concurrency", "8",
                          "--branches", "8", "--stored", "8", "--kills", "1", "--budget-s", "240",
                          "--data-dir", str(tmp_path / "data"), "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.exists(), run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert run.returncode == 0, (report["failures"], report["examples"])
    assert not any(report["failures"].values()), report["examples"]
    counts = report["counts"]
    assert counts["bad_input_requests"] > 40 and counts["grammar_requests"] > 20
    assert counts["isolation_checks"] >= 5 and counts["kills"] == 1
    assert counts["kill_checked_responses"] + counts["kill_checked_sessions"] > 0
