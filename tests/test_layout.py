"""The package boundaries the README's architecture section states, checked on every import statement
(module level or inside a function, since a lazy import is a dependency too):

- ``engine/`` knows nothing of HTTP, the benchmarks, the tests or the command line (``sinkserve/``);
- ``server/`` reaches the engine only through the names ``engine/__init__.py`` exports, never a module
  inside it, and imports neither the benchmarks nor the tests nor the command line;
- inside ``engine/`` the rooms point one way: ``cache/`` imports no other room; ``model/`` and
  ``sessions/`` may import ``cache/``; ``scheduling/`` may import those three; ``engine.py`` and
  ``evaluate/`` may import any; the lower modules (config, errors, events, prompts) import no room; no
  room imports the ``engine`` package's own facade (``engine/__init__.py`` imports every room).

Each check is a function over a source tree, so the tests at the bottom run it on a synthetic tree with
one violation of each kind and see it reported: the checks can fail.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ROOMS = ("cache", "model", "sessions", "scheduling")
LOWER = ("config", "errors", "events", "prompts")
# what each part of the engine may import of the engine ("facade": ``engine`` itself, its __init__)
MAY_IMPORT = {
    **{lower: set(LOWER) for lower in LOWER},
    "cache": {*LOWER, "cache"},
    "model": {*LOWER, "cache", "model"},
    "sessions": {*LOWER, "cache", "sessions"},
    "scheduling": {*LOWER, "cache", "model", "sessions", "scheduling"},
}
# imports that break a direction on purpose, each with its reason
EXCEPTIONS = {
    ("engine/config.py", "scheduling"): "check_sampling_defaults range-checks the operator's defaults with "
    "SamplingParams itself, the one place those rules live; imported inside the check, not at import time",
}


def imported_modules(path: Path, root: Path) -> set[str]:
    """Absolute names of the modules ``path`` imports; ``from pkg import name`` counts as ``pkg.name``
    when that is a module or package in the tree, else as ``pkg``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = path.relative_to(root).with_suffix("").parts[:-1]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join([*package[:len(package) - node.level + 1], *([node.module] if node.module else [])]) \
                if node.level else node.module
            for alias in node.names:
                candidate = root.joinpath(*base.split("."), alias.name)
                is_module = candidate.is_dir() or candidate.with_suffix(".py").is_file()
                names.add(f"{base}.{alias.name}" if is_module else base)
    return names


def engine_part(module: str) -> str | None:
    """``engine.cache.sink`` -> ``cache``, ``engine`` -> ``facade``; None for anything outside the engine."""
    parts = module.split(".")
    if parts[0] != "engine":
        return None
    return parts[1] if len(parts) > 1 else "facade"


def python_files(root: Path, package: str) -> list[Path]:
    return sorted((root / package).rglob("*.py"))


def foreign_imports(root: Path, package: str, forbidden: set[str]) -> dict[str, list[str]]:
    """Files of ``package`` that import a top-level package in ``forbidden``, with what they import."""
    found = {}
    for path in python_files(root, package):
        bad = sorted(m for m in imported_modules(path, root) if m.split(".")[0] in forbidden)
        if bad:
            found[str(path.relative_to(root))] = bad
    return found


def engine_direction_violations(root: Path) -> dict[str, list[str]]:
    """Files of ``engine/`` whose imports go against MAY_IMPORT (less the listed EXCEPTIONS)."""
    found = {}
    for path in python_files(root, "engine"):
        relative = path.relative_to(root)
        part = relative.parts[1] if len(relative.parts) > 2 else relative.stem
        if part not in MAY_IMPORT:
            continue  # __init__.py, engine.py, evaluate/: the top, which may import any room
        bad = sorted(m for m in imported_modules(path, root)
                     if (target := engine_part(m)) is not None and target not in MAY_IMPORT[part]
                     and (relative.as_posix(), target) not in EXCEPTIONS)
        if bad:
            found[relative.as_posix()] = bad
    return found


def public_engine_names(root: Path) -> set[str]:
    """The names in ``engine/__init__.py``'s ``__all__``."""
    tree = ast.parse((root / "engine" / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return set(ast.literal_eval(node.value))
    return set()


def server_engine_violations(root: Path) -> dict[str, list[str]]:
    """Imports in ``server/`` of an engine module other than ``engine``, or of a name ``engine`` does not
    export (``from engine import config`` reaches a module, too)."""
    public, found = public_engine_names(root), {}
    for path in python_files(root, "server"):
        tree = ast.parse(path.read_text(), filename=str(path))
        bad = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                bad += [a.name for a in node.names if a.name.startswith("engine.")]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if node.module.startswith("engine."):
                    bad.append(node.module)
                elif node.module == "engine":
                    bad += [f"engine.{a.name}" for a in node.names if a.name not in public]
        if bad:
            found[str(path.relative_to(root))] = sorted(bad)
    return found


def test_engine_imports_neither_server_bench_tests_nor_the_command():
    assert foreign_imports(ROOT, "engine", {"server", "bench", "tests", "sinkserve"}) == {}
    assert len(python_files(ROOT, "engine")) > 10  # the walk found the package


def test_server_imports_neither_bench_tests_nor_the_command():
    assert foreign_imports(ROOT, "server", {"bench", "tests", "sinkserve"}) == {}


def test_server_reaches_the_engine_only_through_its_public_names():
    assert server_engine_violations(ROOT) == {}
    assert "Engine" in public_engine_names(ROOT)


def test_the_engine_rooms_point_one_way():
    for room in ROOMS:
        assert python_files(ROOT, f"engine/{room}"), room  # every room exists
    assert engine_direction_violations(ROOT) == {}


def test_every_exception_is_still_needed():
    """An exception the code no longer needs is removed, so that it cannot hide a later violation."""
    for (file, target) in EXCEPTIONS:
        assert any(engine_part(m) == target for m in imported_modules(ROOT / file, ROOT)), (file, target)


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_the_checks_report_violations(tmp_path):
    """A synthetic tree with one violation of each kind: every check names the offending file."""
    root = write(tmp_path, {
        "engine/__init__.py": '__all__ = ["Engine"]\n',
        "engine/config.py": "def f():\n    from engine.sessions.store import x\n",  # lazy, upward
        "engine/errors.py": "",
        "engine/cache/__init__.py": "",
        "engine/cache/sink.py": "from engine.model import loader\n",  # a room the cache may not use
        "engine/model/__init__.py": "",
        "engine/model/loader.py": "from engine.cache.sink import SinkCache\nimport server.app\n",
        "engine/sessions/__init__.py": "",
        "engine/sessions/store.py": "from engine import Engine\n",  # the facade
        "engine/scheduling/__init__.py": "",
        "engine/scheduling/scheduler.py": "from ..model.loader import load\nfrom . import sampling\n",
        "engine/scheduling/sampling.py": "",
        "server/__init__.py": "",
        "server/app.py": "from engine import Engine\nfrom engine import errors\nimport engine.config\n",
        "server/cli.py": "def main():\n    from bench.cli import run_bench\n",
        "server/routes/chat.py": "from engine.events import TokenEvent\n",
    })
    assert foreign_imports(root, "engine", {"server", "bench"}) == {"engine/model/loader.py": ["server.app"]}
    assert foreign_imports(root, "server", {"bench"}) == {"server/cli.py": ["bench.cli"]}
    assert server_engine_violations(root) == {"server/app.py": ["engine.config", "engine.errors"],
                                              "server/routes/chat.py": ["engine.events"]}
    assert engine_direction_violations(root) == {
        "engine/config.py": ["engine.sessions.store"],
        "engine/cache/sink.py": ["engine.model.loader"],
        "engine/sessions/store.py": ["engine"],
    }  # scheduler.py's relative imports resolve to rooms it may use


def test_relative_imports_resolve(tmp_path):
    root = write(tmp_path, {"engine/__init__.py": "", "engine/cache/__init__.py": "", "engine/cache/rope.py": "",
                            "engine/cache/sink.py": "from .rope import rerotate\nfrom ..scheduling import grammar\n",
                            "engine/scheduling/__init__.py": "", "engine/scheduling/grammar.py": ""})
    assert imported_modules(root / "engine/cache/sink.py", root) == {"engine.cache.rope", "engine.scheduling.grammar"}
    assert engine_direction_violations(root) == {"engine/cache/sink.py": ["engine.scheduling.grammar"]}
