"""The HTTP API benchmark against a real tiny server (twice: as sinkserve and as the "other" server)."""

from __future__ import annotations

import json

from bench.api import run_api
from bench.serve_process import ServerProcess


def test_api_bench_interleaves_two_servers(tmp_path):
    with ServerProcess(tmp_path / "data", tiny=True) as server:
        report = run_api(tmp_path / "out", url=server.url, other_url=server.url + "/", clients=[1, 3], rounds=2,
                         max_tokens=6)
    saved = json.loads((tmp_path / "out" / "api.json").read_text())
    assert set(saved["results"]) == {"sinkserve", "other"}
    for results in saved["results"].values():
        assert [r["clients"] for r in results] == [1, 3]
        for r in results:
            assert len(r["per_round"]) == 2
            assert all(run["chunks"] <= 6 * r["clients"] for run in r["per_round"])
            assert r["aggregate_tokens_per_s"] > 0 and r["ttft_ms"] > 0
            # the server's own count of its decode steps meanwhile (a sinkserve server exposes it)
            assert 0 < r["server_forward_ms"] < r["server_step_ms"]
            assert 1 <= r["server_rows_per_step"] <= r["clients"]
    assert saved["ratios"]["aggregate_tokens_per_s at 3"] > 0
    assert "| sinkserve | 1 |" in (tmp_path / "out" / "api.md").read_text()
    assert "server step ms" in (tmp_path / "out" / "api.md").read_text()
    assert report["targets"]["other"]["url"] == server.url


def test_cli_parses_bench_api():
    from sinkserve.cli import build_parser

    args = build_parser().parse_args(["bench", "api", "--quick", "--other-url", "http://127.0.0.1:8080",
                                      "--rounds", "2", "--lengths", "1,8"])
    assert (args.suite, args.other_url, args.rounds, args.lengths) == ("api", "http://127.0.0.1:8080", 2, [1, 8])


def test_api_bench_records_the_memory_of_the_server_it_starts(tmp_path):
    report = run_api(tmp_path / "out", tiny=True, clients=[1], rounds=1, max_tokens=4)
    memory = report["targets"]["sinkserve"]["memory_mb"]
    assert 50 < memory["rss"] <= memory["peak"]  # a Python process with torch: tens of MB at least
    assert "resident memory" in (tmp_path / "out" / "api.md").read_text()


def test_server_steps_need_the_counters_on_both_sides():
    from bench.api import server_step

    before = {"decode_steps": 10, "decode_rows": 30, "decode_forward_seconds": 1.0, "decode_seconds": 1.2}
    after = {"decode_steps": 20, "decode_rows": 110, "decode_forward_seconds": 1.5, "decode_seconds": 1.8}
    step = server_step(before, after)
    assert step["server_rows_per_step"] == 8
    assert abs(step["server_forward_ms"] - 50) < 1e-9 and abs(step["server_step_ms"] - 60) < 1e-9
    assert server_step(None, after) == {} and server_step(before, before) == {}
