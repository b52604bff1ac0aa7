#!/usr/bin/env python
"""Crash safety: kill -9 the server at random moments while it serves sessions; check what survives.

Each round starts the server (``bench/serve_process.py``, ``bench/tiny_server.py``: the real ``serve`` command around a tiny
model, or ``--real`` for the embedded model), drives streaming chats on a pool of named sessions from a
few client threads, and SIGKILLs it after a random delay. After every kill each ``*.safetensors`` file in
the data dir must open with safetensors' ``safe_open`` and carry sinkserve metadata and tensors; the next
start must come up healthy, list sessions without error (damaged files, if any, ignored) and serve a
request on a surviving session. Results go to a JSON file; the exit status is 1 on any failure.

    python scripts/crash_loop.py --kills 50 --out crash_results.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from safetensors import safe_open  # noqa: E402

from bench.serve_process import ServerProcess  # noqa: E402
from bench.tiny_server import BAN_SPECIAL  # noqa: E402

TENSORS = {"k", "v", "meta", "tokens"}
META = {"format", "id", "owner", "created", "last_used", "shape", "dtype"}


def check_file(path: Path) -> str | None:
    """None when the session file is complete and readable, else why not."""
    try:
        with safe_open(str(path), "pt") as handle:
            meta = handle.metadata() or {}
            missing = (META - set(meta)) | (TENSORS - set(handle.keys()))
            if missing:
                return f"missing {sorted(missing)}"
            if meta["id"] != path.stem:
                return f"id {meta['id']!r} in {path.name}"
            tokens = handle.get_tensor("tokens")
            n, pinned, evicted = handle.get_tensor("meta").tolist()
            handle.get_tensor("k"), handle.get_tensor("v")
            if n < 0 or pinned < 0 or evicted < 0 or tokens.ndim != 1:
                return "inconsistent metadata"
    except Exception as exc:  # noqa: BLE001 - any failure to read is what we count
        return f"{type(exc).__name__}: {exc}"
    return None


def drive(url: str, sessions: list[str], stop: threading.Event, rng: random.Random, counts: dict) -> None:
    """Streaming chats on random sessions until ``stop``; every outcome is counted, none raises."""
    with httpx.Client(base_url=url, timeout=10) as client:
        while not stop.is_set():
            sid = rng.choice(sessions)
            body = {"messages": [{"role": "user", "content": f"turn {rng.randint(0, 999)}"}], "stream": True,
                    "max_tokens": rng.randint(1, 40), "logit_bias": BAN_SPECIAL, "session_id": sid}
            try:
                if rng.random() < 0.05:
                    client.delete(f"/v1/sessions/{sid}")
                    counts["deletes"] += 1
                    continue
                with client.stream("POST", "/v1/chat/completions", json=body) as response:
                    for _ in response.iter_lines():
                        pass
                counts["requests"] += 1
            except httpx.HTTPError:
                counts["interrupted"] += 1
                return


def run(kills: int, data_dir: Path, seed: int, clients: int, real: bool, log_path: Path | None) -> dict:
    rng = random.Random(seed)
    sessions = [f"crash-{i}" for i in range(8)]
    results = {"kills": 0, "files_checked": 0, "files_ok": 0, "files_bad": 0, "bad": [], "tmp_left": 0,
               "restarts_ok": 0, "restart_failures": [], "requests": 0, "deletes": 0, "interrupted": 0,
               "seed": seed, "data_dir": str(data_dir)}
    counts = {"requests": 0, "deletes": 0, "interrupted": 0}
    flags = ["--window", "252"] if real else []
    for round_ in range(kills + 1):
        server = ServerProcess(data_dir, *flags, tiny=not real, log_path=log_path)
        try:
            server.start()
            with httpx.Client(base_url=server.url, timeout=10) as client:
                listed = client.get("/v1/sessions")
                if listed.status_code != 200:
                    raise RuntimeError(f"GET /v1/sessions answered {listed.status_code}")
                ids = {s["id"] for s in listed.json()["data"]}
                if ids - set(sessions):
                    raise RuntimeError(f"unknown sessions listed: {sorted(ids - set(sessions))}")
                if ids:  # a surviving session serves the next turn
                    sid = sorted(ids)[0]
                    reply = client.post("/v1/chat/completions", json={
                        "messages": [{"role": "user", "content": "again"}], "max_tokens": 2, "session_id": sid})
                    if reply.status_code != 200:
                        raise RuntimeError(f"continuing {sid} answered {reply.status_code}: {reply.text[:200]}")
            results["restarts_ok"] += round_ > 0
        except Exception as exc:  # noqa: BLE001
            results["restart_failures"].append({"round": round_, "error": str(exc)})
            server.kill()
            continue
        if round_ == kills:
            server.kill()
            break
        stop = threading.Event()
        threads = [threading.Thread(target=drive, args=(server.url, sessions, stop, random.Random(rng.random()),
                                                        counts), daemon=True) for _ in range(clients)]
        for t in threads:
            t.start()
        time.sleep(rng.uniform(0.1, 1.5))
        server.kill()  # SIGKILL: no shutdown, no flush
        results["kills"] += 1
        stop.set()
        for t in threads:
            t.join(timeout=15)
        for path in sorted(data_dir.glob("*.safetensors")):
            results["files_checked"] += 1
            problem = check_file(path)
            if problem is None:
                results["files_ok"] += 1
            else:
                results["files_bad"] += 1
                results["bad"].append({"round": round_, "file": path.name, "problem": problem})
        results["tmp_left"] += len(list(data_dir.glob(".*.tmp")))
    results.update(counts)
    results["ok"] = not results["restart_failures"] and not results["files_bad"]
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--data-dir", type=Path, default=None, help="default: a new temporary directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clients", type=int, default=3, help="client threads driving sessions")
    parser.add_argument("--real", action="store_true", help="the embedded model instead of the tiny one")
    parser.add_argument("--out", type=Path, default=Path("crash_results.json"))
    parser.add_argument("--log", type=Path, default=None, help="append the servers' output here")
    args = parser.parse_args(argv)
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="sinkserve-crash-"))
    data_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    results = run(args.kills, data_dir, args.seed, args.clients, args.real, args.log)
    results["seconds"] = round(time.monotonic() - started, 1)
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if k not in ("bad",)}, indent=2))
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
