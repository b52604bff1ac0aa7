"""``sinkserve bench load --serve --quick`` from a non-editable install: a wheel built from this checkout.

The wheel is built from a copy of the packaged sources (so the shared checkout gets no ``build/``),
installed with ``pip install --no-deps --target``, and run with only that folder on ``PYTHONPATH`` from a
working directory outside the repository, so nothing is imported from the checkout (checked). The
server it starts is the tiny random model (``--tiny``), to keep it quick.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGED = ("pyproject.toml", "README.md", "sinkserve", "engine", "server", "bench")


def test_bench_load_serve_quick_from_a_wheel(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in PACKAGED:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", str(source), "-w", str(tmp_path / "dist")],
                   check=True, timeout=300, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("sinkserve-*.whl"))
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    where = subprocess.run([sys.executable, "-c", "import bench, engine, server; print(bench.__file__, "
                            "engine.__file__, server.__file__)"], cwd=elsewhere, env=env, capture_output=True,
                           text=True, check=True)
    assert all(path.startswith(str(site)) for path in where.stdout.split()), where.stdout
    run = subprocess.run([sys.executable, "-m", "sinkserve", "bench", "load", "--serve", "--quick", "--tiny",
                          "--out", str(tmp_path / "out")], cwd=elsewhere, env=env, capture_output=True, text=True,
                         timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "load.json").read_text())
    assert report["summary"]["completed"] > 0 and report["summary"]["errors"] == 0, report["summary"]
    assert report["environment"]["server"].startswith("bench.tiny_server")
