"""scripts/gpu_check.sh --dry-run on this CPU: the wheel list covers what the GPU machine lacks, bench_gpu.sh
parses, and every CUDA test is collected and skipped with its reason (tests/gpu/)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is usable here: scripts/gpu_check.sh runs the real suite")
def test_gpu_check_dry_run_skips_with_reasons(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SINKSERVE_")}
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts/gpu_check.sh"), "--dry-run", "--wheels", str(tmp_path / "no-wheels")],
        cwd=ROOT, env={**env, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "[wheels] " in out and "requirements and imports: OK" in out
    assert "SKIPPED" in out and "needs a CUDA GPU: torch.cuda.is_available() is False" in out
    assert "tests/gpu/test_graphs_cuda.py" in out  # the CUDA graphs of the decode buckets are collected
    assert " passed" not in out.split("[gpu_check] all passed")[0]  # nothing ran on the CPU
    assert "all passed" in out


def test_gpu_check_rejects_unknown_options():
    proc = subprocess.run(["bash", str(ROOT / "scripts/gpu_check.sh"), "--bogus"], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 2 and "unknown option" in proc.stderr


def _report(ppl: float, tokens: int = 20000, model: str = "smollm2-random") -> dict:
    return {"tokens": tokens, "model": model, "device": "cuda:0", "modes": {"sink": {"ppl": ppl}}}


def test_the_perplexity_check_allows_one_percent(tmp_path):
    import json

    script = ROOT / "scripts/gpu_check_ppl.py"

    def check(bf16: dict, f32: dict) -> subprocess.CompletedProcess:
        (tmp_path / "a.json").write_text(json.dumps(bf16))
        (tmp_path / "b.json").write_text(json.dumps(f32))
        return subprocess.run([sys.executable, str(script), str(tmp_path / "a.json"), str(tmp_path / "b.json")],
                              capture_output=True, text=True, timeout=60)

    close = check(_report(10.09), _report(10.0))
    assert close.returncode == 0 and "0.90% apart (within 1%)" in close.stdout
    far = check(_report(10.2), _report(10.0))
    assert far.returncode == 1 and "2.00% apart (FAILED: over 1%)" in far.stdout
    other = check(_report(10.0, tokens=1000), _report(10.0))
    assert other.returncode == 1 and "different streams" in other.stdout
