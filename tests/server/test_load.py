"""CI-short run of the load benchmark (bench/load.py) against the tiny server process (bench/serve_process.py)."""

from __future__ import annotations

import pytest

from bench.load import check_loopback, measure_load, table
from bench.serve_process import ServerProcess

CLIENTS = 4
KEYS = [f"load-{i}" for i in range(CLIENTS)]


@pytest.mark.parametrize("url", ["http://10.0.0.1:8000", "http://example.com", "http://127.0.0.2:1", "ftp://127.0.0.1"])
def test_refuses_non_loopback(url):
    with pytest.raises(ValueError, match="loopback"):
        check_loopback(url)


def test_accepts_loopback():
    for url in ("http://127.0.0.1:8000/", "http://localhost:1", "http://[::1]:8000"):
        assert check_loopback(url) == url.rstrip("/")


def test_short_load(tmp_path):
    flags = [arg for key in KEYS for arg in ("--api-key", key)]
    server = ServerProcess(tmp_path / "data", *flags, tiny=True, log_path=tmp_path / "server.log").start()
    try:
        report = measure_load(server.url, clients=CLIENTS, seconds=5, api_keys=KEYS, pid=server.proc.pid,
                              turns=4, max_tokens=16, drain_s=30, request_timeout=30)
    finally:
        server.kill()
    summary = report["summary"]
    for name in ("requests", "completed", "rejected_429", "errors", "errors_by_kind", "generated_tokens",
                 "tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms"):
        assert name in summary, name
    for name in ("peak_mib", "post_warmup_mib", "end_mib", "growth_after_warmup_mib"):
        assert name in report["memory"], name
    assert summary["requests"] > 0 and summary["completed"] > 0
    assert summary["errors"] == 0, summary["errors_by_kind"]  # 429s are allowed, anything else is not
    assert summary["tokens_per_s"] > 0 and summary["ttft_p50_ms"] is not None
    assert report["memory"]["peak_mib"] > 0 and report["rss"]
    consistency = report["consistency"]
    assert consistency["ok"], consistency
    assert consistency["listed"] > 0 and consistency["followups"]
    assert "| clients |" in table(report)
    assert {"start_s", "ttft_s", "itl_s", "tokens", "status", "kind"} <= set(report["requests"][0])
