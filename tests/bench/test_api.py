"""The HTTP API benchmark: against real tiny servers (as sinkserve, as the "other" server and behind a stand-in
``llama-server`` binary), its pieces on their own, and the real ``llama-server`` where one is built."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from pathlib import Path

import pytest

from bench.api import PromptText, machine, measure_api_async, ratios, run_api, with_nonce
from bench.llama_server import LlamaServer, llama_server_args, slot_tokens_for
from bench.serve_process import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
REAL_LLAMA_SERVER = Path(os.environ.get(
    "SINKSERVE_LLAMA_SERVER",
    Path.home() / ".cache/sinkserve/llama.cpp/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin/llama-server"))


@pytest.fixture(scope="module")
def tokenizer():
    from engine.config import EngineConfig
    from engine.model.loader import load_tokenizer

    return load_tokenizer(None, EngineConfig().cache_dir)


def test_api_bench_interleaves_two_servers(tmp_path):
    with ServerProcess(tmp_path / "data", tiny=True) as server:
        report = run_api(tmp_path / "out", url=server.url, other_url=server.url + "/", clients=[1, 3], rounds=2,
                         max_tokens=6, ttft_tokens=[40], conversation_tokens=60)
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
    assert saved["reference"] == "other" and saved["ratios_by_target"]["other"] == saved["ratios"]
    assert set(saved["ttft"]) == {"fresh 40", "follow-up 60"}
    for name in ("sinkserve", "other"):
        fresh, followup = saved["ttft"]["fresh 40"][name], saved["ttft"]["follow-up 60"][name]
        assert len(fresh["per_round"]) == 2 and fresh["ttft_ms"] > 0
        assert fresh["cached_tokens"] < 40 < fresh["prompt_tokens"]  # the nonce: nothing of the text was cached
        # the follow-up resends the conversation: the session holds all of it but the question
        assert followup["prompt_tokens"] - 40 < followup["cached_tokens"] < followup["prompt_tokens"]
        assert followup["cached_tokens"] >= followup["history_prompt_tokens"] > 60
    assert saved["ratios"]["ttft_ms follow-up 60"] > 0
    md = (tmp_path / "out" / "api.md").read_text()
    assert "| sinkserve | 1 |" in md and "server step ms" in md and "| follow-up 60 | other |" in md
    assert report["targets"]["other"]["url"] == server.url
    assert saved["machine"]["threads"] >= 1 and "Machine:" in md


def test_cli_parses_bench_api():
    from sinkserve.cli import build_parser

    args = build_parser().parse_args(["bench", "api", "--quick", "--other-url", "http://127.0.0.1:8080",
                                      "--rounds", "2", "--lengths", "1,8"])
    assert (args.suite, args.other_url, args.rounds, args.lengths) == ("api", "http://127.0.0.1:8080", 2, [1, 8])
    assert (args.llama_server, args.ttft_tokens, args.conversation_tokens) == (None, None, None)
    args = build_parser().parse_args(["bench", "api", "--llama-server", "/x/llama-server", "--ttft-tokens",
                                      "2000,6000", "--conversation-tokens", "0", "--llama-server-flags", "-kvu -ub 256"])
    assert (args.llama_server, args.ttft_tokens, args.conversation_tokens) == ("/x/llama-server", [2000, 6000], 0)
    assert args.llama_server_flags == "-kvu -ub 256"
    assert build_parser().parse_args(["bench", "api", "--ttft-tokens", "0"]).ttft_tokens == []


def test_cli_refuses_a_missing_llama_server(tmp_path):
    from bench.cli import main

    with pytest.raises(SystemExit, match="no llama-server binary"):
        main(["api", "--llama-server", str(tmp_path / "nothing"), "--out", str(tmp_path)])
    binary = tmp_path / "llama-server"
    binary.write_text("")
    with pytest.raises(SystemExit, match="needs a .gguf"):
        main(["api", "--llama-server", str(binary), "--model", str(tmp_path), "--out", str(tmp_path)])


def test_api_bench_records_the_memory_of_the_server_it_starts(tmp_path):
    report = run_api(tmp_path / "out", tiny=True, clients=[1], rounds=1, max_tokens=4, ttft_tokens=[],
                     conversation_tokens=0)
    memory = report["targets"]["sinkserve"]["memory_mb"]
    assert 50 < memory["rss"] <= memory["peak"]  # a Python process with torch: tens of MB at least
    assert "resident memory" in (tmp_path / "out" / "api.md").read_text()
    assert report["ttft"] == {} and "ratios" not in report


def test_server_steps_need_the_counters_on_both_sides():
    from bench.api import server_step

    before = {"decode_steps": 10, "decode_rows": 30, "decode_forward_seconds": 1.0, "decode_seconds": 1.2}
    after = {"decode_steps": 20, "decode_rows": 110, "decode_forward_seconds": 1.5, "decode_seconds": 1.8}
    step = server_step(before, after)
    assert step["server_rows_per_step"] == 8
    assert abs(step["server_forward_ms"] - 50) < 1e-9 and abs(step["server_step_ms"] - 60) < 1e-9
    assert server_step(None, after) == {} and server_step(before, before) == {}


def test_llama_server_command_line():
    cmd = llama_server_args("/b/llama-server", "/m/x.gguf", port=8123, parallel=16, slot_tokens=7168, threads=2,
                            extra=["-kvu"])
    assert cmd[:3] == ["/b/llama-server", "-m", "/m/x.gguf"]
    assert cmd[-1] == "-kvu"  # the caller's flags come last: they win
    text = " ".join(cmd)
    assert "--host 127.0.0.1 --port 8123" in text and "-np 16 -cb -c 114688 -t 2 -tb 2" in text
    with pytest.raises(ValueError):
        llama_server_args("b", "m", port=1, parallel=0, slot_tokens=1, threads=1)


def test_slots_hold_the_longest_prompt_and_its_reply():
    assert slot_tokens_for(6000 + 192, 128) == 7168  # 6,576 positions needed, rounded up to 1,024
    assert slot_tokens_for(100, 32) == 2048  # the minimum
    assert slot_tokens_for(2048 - 256 - 32, 32) == 2048 and slot_tokens_for(2048 - 256 - 31, 32) == 3072


def test_a_missing_binary_is_refused_before_anything_starts(tmp_path):
    with pytest.raises(FileNotFoundError, match="build_llama_server"):
        LlamaServer(tmp_path / "llama-server", tmp_path / "x.gguf", parallel=1, slot_tokens=2048, threads=1)


def test_ratios_are_ours_over_theirs_per_metric_and_item():
    def row(c, agg, rate, ttft):
        return {"clients": c, "aggregate_tokens_per_s": agg, "stream_decode_tokens_per_s": rate, "ttft_ms": ttft}

    report = {"settings": {"clients": [1, 8]},
              "results": {"sinkserve": [row(1, 50.0, 50.0, 100.0), row(8, 300.0, 40.0, 400.0)],
                          "llama-server": [row(1, 100.0, 90.0, 50.0), row(8, 150.0, None, 200.0)]},
              "ttft": {"fresh 2000": {"sinkserve": {"ttft_ms": 3000.0}, "llama-server": {"ttft_ms": 12000.0}},
                       "follow-up 6000": {"sinkserve": {"ttft_ms": 500.0}, "llama-server": {"ttft_ms": None}}}}
    got = ratios(report, "sinkserve", "llama-server")
    assert got["aggregate_tokens_per_s at 1"] == 0.5 and got["aggregate_tokens_per_s at 8"] == 2.0
    assert got["ttft_ms at 8"] == 2.0 and got["stream_decode_tokens_per_s at 8"] is None
    assert got["ttft_ms fresh 2000"] == 0.25 and got["ttft_ms follow-up 6000"] is None


def test_conversations_are_consecutive_text_of_the_size_asked(tokenizer):
    text = PromptText(tokenizer)
    turns = text.conversation(6000, turns=3)
    sizes = [len(tokenizer.encode(t, add_special_tokens=False)) for t in turns]
    assert len(turns) == 3 and all(abs(size - 2000) < 40 for size in sizes)
    assert len(set(turns)) == 3  # each turn further into the text
    again = with_nonce(turns)
    assert again[1:] == turns[1:] and again[0].endswith(turns[0])
    assert re.match(r"^\[[0-9a-f]{12}\] ", again[0]) and with_nonce(turns)[0] != again[0]
    with pytest.raises(ValueError):
        text.conversation(2, turns=3)


def test_machine_names_the_cpu_and_its_kernel_flags():
    amd = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse avx avx2 fma\n"
    got = machine(2, cpuinfo=amd)
    assert got["cpu"] == "AMD EPYC 7B13" and got["threads"] == 2
    assert got["flags"] == {"avx2": True, "avx512f": False, "avx512_bf16": False, "amx_tile": False}
    intel = "model name\t: Intel Xeon\nflags\t\t: avx2 avx512f avx512_bf16 amx_tile\n"
    assert all(machine(2, cpuinfo=intel)["flags"].values())
    assert re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d UTC$", got["date"])


def _stand_in_llama_server(tmp_path: Path) -> tuple[Path, Path]:
    """An executable that records its arguments and serves the tiny model on the port it is given."""
    record, binary = tmp_path / "args.json", tmp_path / "llama-server"
    binary.write_text(f"""#!{sys.executable}
import json, os, sys
args = sys.argv[1:]
if args == ["--version"]:
    print("version: 1 (stand-in)")
    sys.exit(0)
open({str(record)!r}, "w").write(json.dumps(args))
env = {{**os.environ, "PYTHONPATH": {str(ROOT)!r}, "OMP_NUM_THREADS": "1"}}
os.execve(sys.executable, [sys.executable, "-m", "bench.tiny_server", "serve", "--host", "127.0.0.1",
          "--port", args[args.index("--port") + 1], "--data-dir", {str(tmp_path / "llama-data")!r},
          "--window", "100", "--log-level", "warning"], env)
""")
    binary.chmod(0o755)
    return binary, record


def test_api_bench_starts_and_measures_a_llama_server(tmp_path):
    binary, record = _stand_in_llama_server(tmp_path)
    gguf = tmp_path / "model.gguf"
    report = run_api(tmp_path / "out", tiny=True, llama_server=binary, gguf=gguf, clients=[1, 2], rounds=1,
                     max_tokens=6, threads=2, ttft_tokens=[30], conversation_tokens=45,
                     llama_server_flags=["--no-webui"])
    args = json.loads(record.read_text())
    flags = " ".join(args)
    assert args[:2] == ["-m", str(gguf)] and args[-1] == "--no-webui"
    assert "-np 2 -cb -c 4096 -t 2 -tb 2" in flags  # two slots of 2,048 positions, the bench's threads
    assert list(report["results"]) == ["sinkserve", "llama-server"] and report["reference"] == "llama-server"
    target = report["targets"]["llama-server"]
    assert target["parallel"] == 2 and target["slot_tokens"] == 2048 and target["version"] == "version: 1 (stand-in)"
    assert target["memory_mb"]["rss"] > 0
    assert all(r["aggregate_tokens_per_s"] > 0 for r in report["results"]["llama-server"])
    assert report["ratios"]["ttft_ms fresh 30"] > 0 and report["ratios"]["aggregate_tokens_per_s at 2"] > 0
    md = (tmp_path / "out" / "api.md").read_text()
    assert "| sinkserve / llama-server |" in md and "| TTFT follow-up 45 |" in md and "-np 2 -cb" in md


@pytest.mark.slow
@pytest.mark.skipif(not REAL_LLAMA_SERVER.is_file(), reason=f"no llama-server at {REAL_LLAMA_SERVER}")
def test_real_llama_server_reuses_its_slot_for_a_follow_up(tmp_path, tokenizer):
    from bench.api import default_gguf

    with LlamaServer(REAL_LLAMA_SERVER, default_gguf(None), parallel=2, slot_tokens=2048, threads=2,
                     log_path=tmp_path / "llama-server.log") as server:
        report = asyncio.run(measure_api_async({"llama-server": server.url}, clients=[1, 2], rounds=1, max_tokens=8,
                                               ttft_tokens=[200], conversation_tokens=300, tokenizer=tokenizer))
    assert report["targets"]["llama-server"]["usage"] is True
    assert all(r["aggregate_tokens_per_s"] > 0 for r in report["results"]["llama-server"])
    fresh, followup = report["ttft"]["fresh 200"]["llama-server"], report["ttft"]["follow-up 300"]["llama-server"]
    assert fresh["prompt_tokens"] > 200 and fresh["server_cache_n"] < 50  # the nonce: only the template is shared
    assert followup["server_cache_n"] >= followup["history_prompt_tokens"] > 300  # its slot kept the conversation
