"""The package boundaries the README's architecture section states: the engine knows nothing of HTTP,
the benchmarks or the tests."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_engine_imports_neither_server_bench_nor_tests():
    offenders = {str(p.relative_to(ROOT)): sorted(imported_packages(p) & {"server", "bench", "tests"})
                 for p in (ROOT / "engine").rglob("*.py")}
    assert {p: bad for p, bad in offenders.items() if bad} == {}
    assert len(offenders) > 10  # the walk found the package


def test_server_never_imports_tests():
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "server").rglob("*.py") if "tests" in imported_packages(p)]
    assert offenders == []
