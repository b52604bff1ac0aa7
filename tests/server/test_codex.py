"""Codex CLI, unchanged, against a real ``serve`` (the embedded model) over the Responses API (slow).

``codex exec`` runs with a custom provider (``wire_api = "responses"``, a temporary ``CODEX_HOME``) on a
task that needs one shell command. A recording proxy between Codex and the server keeps every request
body and every final event, so the test checks what Codex sent and what it got: every request answered
2xx, and the usage of each turn. Whether the 135M model chooses to call the tool is up to the model, so
the tool round trip is checked where it happened (the command ran and its output went back in the next
request), and the cache on the turns after the first in every case: Codex resends its whole history
(``store: false``), so a later turn must be served from the session cache (at least 90% cached). Last, the
turn Codex sends after a command ran is built from its own recorded first request (its history, an
``exec_command`` call, the output) and must be accepted and served from the cache, whatever the model chose.

Needs ``codex`` on the path (``npm install -g @openai/codex``); skipped otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from bench.serve_process import ServerProcess, free_port

pytestmark = pytest.mark.slow

KEY = "codex-test-key"
TASK = "Run the shell command `echo hi` and tell me its output."
CODEX_TIMEOUT_S = 1800  # the first prefill of Codex's ~6,000-token prompt on a busy 2-core host


class Recorder(BaseHTTPRequestHandler):
    """Forwards each request to the server, streaming the reply back, and records both."""

    upstream = ""
    exchanges: list[dict] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
        exchange = {"path": self.path, "body": json.loads(body or b"{}"), "events": []}
        self.exchanges.append(exchange)
        with httpx.Client(timeout=None) as client, \
                client.stream("POST", self.upstream + self.path, content=body, headers=headers) as reply:
            exchange["status"] = reply.status_code
            self.send_response(reply.status_code)
            for name, value in reply.headers.items():
                if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                    self.send_header(name, value)
            self.send_header("connection", "close")
            self.end_headers()
            for line in reply.iter_lines():
                if line.startswith("data: "):
                    exchange["events"].append(json.loads(line[6:]))
                self.wfile.write(line.encode() + b"\n")
                self.wfile.flush()

    def log_message(self, *args) -> None:  # the server's own log has the status lines
        pass


def final_usage(exchange: dict) -> dict | None:
    for event in reversed(exchange["events"]):
        if event.get("type") in ("response.completed", "response.incomplete"):
            return event["response"]["usage"]
    return None


def codex_config(home, base_url: str, model: str) -> None:
    home.mkdir()
    (home / "config.toml").write_text(f'''model = "{model}"
model_provider = "sinkserve"

[model_providers.sinkserve]
name = "sinkserve"
base_url = "{base_url}"
env_key = "SINKSERVE_TEST_KEY"
wire_api = "responses"
stream_idle_timeout_ms = {CODEX_TIMEOUT_S * 1000}
request_max_retries = 0
stream_max_retries = 0
''')


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    if shutil.which("codex") is None:
        pytest.skip("codex is not installed (npm install -g @openai/codex)")
    root = tmp_path_factory.mktemp("codex")
    log_path = root / "serve.log"
    server = ServerProcess(root / "data", "--log-level", "info", keys=[KEY], log_path=log_path).start(timeout=900)
    yield server, log_path, root
    server.stop()


def test_codex_exec_runs_a_tool_turn_against_serve(served):
    server, log_path, root = served
    model = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"][0]["id"]
    Recorder.upstream, Recorder.exchanges = server.url, []
    proxy = ThreadingHTTPServer(("127.0.0.1", free_port()), Recorder)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    codex_config(root / "home", f"http://127.0.0.1:{proxy.server_port}/v1", model)
    work = root / "work"
    work.mkdir()
    try:
        run = subprocess.run(
            ["codex", "exec", "--skip-git-repo-check", "--ephemeral", "--json", "--color", "never",
             "--dangerously-bypass-approvals-and-sandbox", "-C", str(work), TASK],
            env={**os.environ, "CODEX_HOME": str(root / "home"), "SINKSERVE_TEST_KEY": KEY},
            capture_output=True, text=True, timeout=CODEX_TIMEOUT_S, stdin=subprocess.DEVNULL)
    finally:
        proxy.shutdown()
    events = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    statuses = [line for line in log_path.read_text().splitlines() if '"POST /v1/responses' in line]
    exchanges = Recorder.exchanges
    report = {"rc": run.returncode, "stderr": run.stderr[-2000:], "events": events[-6:], "statuses": statuses,
              "usage": [final_usage(e) for e in exchanges]}
    assert exchanges and statuses, report
    assert all(200 <= e["status"] < 300 for e in exchanges), report  # every request answered 2xx
    assert all(" 200 " in line for line in statuses), report
    assert all(final_usage(e) is not None for e in exchanges), report  # every stream ended with a response
    commands = [e for e in events if e.get("type") == "item.completed"
                and e["item"].get("type") == "command_execution"]
    if commands:  # the model called the tool: the command ran and its output went back to the server
        assert len(exchanges) >= 2, report
        later = [item for e in exchanges[1:] for item in e["body"]["input"]]
        outputs = [item for item in later if item.get("type") == "function_call_output"]
        assert outputs, report
    for exchange in exchanges[1:]:  # later turns resend the history: served from the cache
        usage = final_usage(exchange)
        assert usage["input_tokens_details"]["cached_tokens"] >= 0.9 * usage["input_tokens"], report
    assert run.returncode == 0, report
    tool_turn_of_codex_request(server, exchanges[0]["body"])


def tool_turn_of_codex_request(server: ServerProcess, first: dict) -> None:
    """The turn Codex sends after running a command, built from its own first request: its history, the
    ``exec_command`` call and the command's output. Whatever the model chose to do, this request must be
    accepted and served from the cache of the first turn."""
    call = {"type": "function_call", "call_id": "call_test_1", "name": "exec_command",
            "arguments": json.dumps({"cmd": "echo hi"})}
    output = {"type": "function_call_output", "call_id": "call_test_1", "output": "hi\n"}
    body = {**first, "input": [*first["input"], call, output], "stream": False, "max_output_tokens": 16}
    reply = httpx.post(f"{server.url}/v1/responses", json=body, headers={"Authorization": f"Bearer {KEY}"},
                       timeout=CODEX_TIMEOUT_S)
    assert reply.status_code == 200, reply.text
    assert reply.headers["x-sinkserve-ignored-tools"] == "web_search"
    usage = reply.json()["usage"]
    assert usage["input_tokens_details"]["cached_tokens"] >= 0.9 * usage["input_tokens"], usage
