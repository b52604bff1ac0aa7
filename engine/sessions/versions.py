"""Session files on a shared directory, written as immutable versions: ``<id>.v<version>.safetensors``.

In a cluster (engine/sessions/shared_index.py) every save of a session writes a new file under a version number
the index hands out, and the index then points at it; a file is never rewritten in place, so a replica
reading version 7 is never disturbed by another writing version 8. This module names those files, lists
them, and deletes the ones nobody needs any more (old versions, temporary files of crashed writers).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

VERSION_FILE = re.compile(r"^(?P<id>[A-Za-z0-9_-]{1,128})\.v(?P<version>\d+)\.safetensors$")


def version_path(data_dir: Path, session_id: str, version: int) -> Path:
    """``data_dir/<id>.v<version>.safetensors`` (the id must already be checked: a plain token)."""
    name = f"{session_id}.v{int(version)}.safetensors"
    if not VERSION_FILE.match(name):
        raise ValueError(f"bad session id or version: {session_id!r} v{version!r}")
    return Path(data_dir) / name


def parse_version_path(path: Path | str) -> tuple[str, int] | None:
    """(session id, version) of a versioned session file name, else None."""
    match = VERSION_FILE.match(Path(path).name)
    return (match["id"], int(match["version"])) if match else None


def saved_versions(data_dir: Path, session_id: str) -> list[tuple[int, Path]]:
    """The session's version files present in ``data_dir``, newest first."""
    found = []
    for path in Path(data_dir).glob(f"{session_id}.v*.safetensors"):
        parsed = parse_version_path(path)
        if parsed and parsed[0] == session_id:
            found.append((parsed[1], path))
    return sorted(found, reverse=True)


def next_local_version(data_dir: Path, session_id: str) -> int:
    """One above the newest version file present: the version to write when Redis cannot allocate one."""
    found = saved_versions(data_dir, session_id)
    return found[0][0] + 1 if found else 1


def collect_garbage(data_dir: Path, session_id: str, current: int, keep: int = 2) -> list[Path]:
    """Delete the session's version files older than the ``keep`` newest at or below ``current``.

    Versions above ``current`` are left alone (a writer may be about to publish them); keeping the
    previous version too lets a replica that looked up the index just before a publish still open the
    file it was told about. Returns the deleted paths."""
    removed = []
    older = [(v, p) for v, p in saved_versions(data_dir, session_id) if v <= current]
    for _, path in older[keep:]:
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def collect_temp_files(data_dir: Path, older_than_s: float = 3600.0) -> list[Path]:
    """Delete temporary files (``.*.tmp``) untouched for ``older_than_s``: on a shared directory a fresh
    one may be another replica's write in progress, so only old ones are abandoned."""
    removed, cutoff = [], time.time() - older_than_s
    for path in Path(data_dir).glob(".*.tmp"):
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink(missing_ok=True)
                removed.append(path)
        except FileNotFoundError:
            continue
    return removed
