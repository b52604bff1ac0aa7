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
    assert "buckets" in out  # a feature not built yet is named in its skip reason
    assert " passed" not in out.split("[gpu_check] all passed")[0]  # nothing ran on the CPU
    assert "all passed" in out


def test_gpu_check_rejects_unknown_options():
    proc = subprocess.run(["bash", str(ROOT / "scripts/gpu_check.sh"), "--bogus"], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 2 and "unknown option" in proc.stderr
