"""Cluster packaging checks (no Docker engine, no model): docker/haproxy.cfg validates with ``haproxy -c``
and says what the router must do; docker/compose.cluster.yaml validates with ``docker-compose config``;
scripts/cluster.sh parses, is shellcheck clean and rejects bad options."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.test_docker import compose_config, find_tool

ROOT = Path(__file__).resolve().parents[2]
HAPROXY_CFG = ROOT / "docker/haproxy.cfg"
CLUSTER_SH = ROOT / "scripts/cluster.sh"


def test_haproxy_config_is_valid() -> None:
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy not installed (apt-get install haproxy)")
    proc = subprocess.run(["haproxy", "-c", "-f", str(HAPROXY_CFG)], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "SINKSERVE_ROUTER_BIND": "127.0.0.1:8000"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # without the bind address the file is refused: nothing listens on a silently chosen default
    proc = subprocess.run(["haproxy", "-c", "-f", str(HAPROXY_CFG)], capture_output=True, text=True, timeout=30,
                          env={k: v for k, v in os.environ.items() if k != "SINKSERVE_ROUTER_BIND"})
    assert proc.returncode != 0


def test_haproxy_config_routes_by_conversation() -> None:
    text = HAPROXY_CFG.read_text()
    lines = [ln.split("#", 1)[0].strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln]
    assert "option http-buffer-request" in lines
    assert int(re.search(r"^tune\.bufsize (\d+)$", "\n".join(lines), re.M).group(1)) >= 1 << 20
    assert "balance hash var(txn.affinity)" in lines
    assert any(ln.startswith("hash-type consistent") for ln in lines)
    assert any(re.fullmatch(r"hash-balance-factor \d+", ln) for ln in lines)
    key_rules = [ln for ln in lines if ln.startswith("http-request set-var(txn.key)")]
    assert "req.hdr(x-session-id)" in key_rules[0]  # the header wins over anything in the body
    assert any("json_query('$.messages[1].content')" in r and "system" in r for r in key_rules)
    assert any(ln.startswith("stick-table ") for ln in lines) and "stick on var(txn.affinity)" in lines
    assert "option httpchk GET /health" in lines
    assert any(ln.startswith("http-response set-header x-sinkserve-replica %s") for ln in lines)
    # compose finds the replicas under the network alias "replica"; cluster.sh replaces the marked line
    server_line = text.splitlines()[[i for i, ln in enumerate(text.splitlines()) if "# SERVERS" in ln][0] + 1]
    assert re.match(r"\s+server-template replica \d+ replica:8000 check resolvers docker", server_line)


def test_compose_cluster_config() -> None:
    config = compose_config("compose.yaml", "docker/compose.cluster.yaml")
    services = config["services"]
    assert set(services) == {"sinkserve", "redis", "haproxy"}
    replica, redis, haproxy = services["sinkserve"], services["redis"], services["haproxy"]
    assert replica["deploy"]["replicas"] == 3
    assert not replica.get("ports"), "replicas must not publish ports: HAProxy does"
    assert "replica" in replica["networks"]["default"]["aliases"]
    assert replica["environment"]["SINKSERVE_SESSION_STORE"] == "redis://redis:6379/0"
    assert replica["environment"]["SINKSERVE_DATA_DIR"].startswith("/data/")
    assert any(v["source"] == "sinkserve-data" and v["target"] == "/data" for v in replica["volumes"])
    assert replica["depends_on"]["redis"]["condition"] == "service_healthy"
    assert redis["image"].split(":")[0] == "redis" and ":" in redis["image"]
    assert "redis-cli" in redis["healthcheck"]["test"]
    assert haproxy["image"].startswith("haproxy:2.")
    assert [(p["target"], str(p["published"])) for p in haproxy["ports"]] == [(8000, "8000")]
    assert haproxy["environment"]["SINKSERVE_ROUTER_BIND"].endswith(":8000")
    (mount,) = haproxy["volumes"]
    assert Path(mount["source"]) == HAPROXY_CFG and mount["read_only"]
    assert mount["target"] == "/usr/local/etc/haproxy/haproxy.cfg"
    # the count is set in one place
    assert compose_config("compose.yaml", "docker/compose.cluster.yaml", SINKSERVE_REPLICAS="5")[
        "services"]["sinkserve"]["deploy"]["replicas"] == 5
    # stacks with the CPU override
    cpu = compose_config("compose.yaml", "docker/compose.cpu.yaml", "docker/compose.cluster.yaml")["services"]
    assert cpu["sinkserve"]["environment"]["SINKSERVE_DEVICE"] == "cpu" and cpu["sinkserve"]["deploy"]["replicas"] == 3


def test_cluster_script_is_clean_and_rejects_bad_options() -> None:
    assert os.access(CLUSTER_SH, os.X_OK)
    assert subprocess.run(["bash", "-n", str(CLUSTER_SH)], timeout=30).returncode == 0
    tool = find_tool("shellcheck")
    if tool is not None:
        proc = subprocess.run([tool, str(CLUSTER_SH)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    helped = subprocess.run([str(CLUSTER_SH), "--help"], capture_output=True, text=True, timeout=30)
    assert helped.returncode == 0 and "--replicas" in helped.stdout and "SINKSERVE_SESSION_STORE" in helped.stdout
    for bad in (["--bogus"], ["--replicas", "0"], ["--port", "eighty"]):
        proc = subprocess.run([str(CLUSTER_SH), *bad], capture_output=True, text=True, timeout=30)
        assert proc.returncode != 0 and "error" in proc.stderr, bad
