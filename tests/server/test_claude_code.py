"""Claude Code (``claude -p``) against a real ``sinkserve serve`` (tiny model) through ``ANTHROPIC_BASE_URL``:
its ``HEAD /`` probe and every ``POST /v1/messages?beta=true`` it sends (25 tools, ``thinking``,
``context_management``, ``output_config``, ``max_tokens: 32000``, mid-conversation system turns) answered
200, and an answer printed. The random model picks a tool call or an answer at each turn (Claude Code runs
the calls, its permission checks refusing what they refuse, and sends the results back), so a run takes
a couple of turns. Slow (Claude Code's start-up and its ~21,000-token prompt); skipped where the
``claude`` command is not installed (``npm install -g @anthropic-ai/claude-code``)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from bench.serve_process import ServerProcess

pytestmark = pytest.mark.slow
KEY = "claude-code-key"
MODEL = "tiny-llama"
ACCESS = re.compile(r'"(?P<method>[A-Z]+) (?P<path>/\S*) HTTP/1\.1" (?P<status>\d{3})')


@pytest.mark.skipif(shutil.which("claude") is None, reason="Claude Code is not installed")
def test_claude_code_print_mode_gets_an_answer(tmp_path):
    log = tmp_path / "serve.log"
    with ServerProcess(tmp_path / "data", "--log-level", "info", tiny=True, keys=[KEY], log_path=log) as server:
        env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path / "home"), "ANTHROPIC_BASE_URL": server.url,
               "ANTHROPIC_API_KEY": KEY, "ANTHROPIC_MODEL": MODEL, "ANTHROPIC_SMALL_FAST_MODEL": MODEL,
               "ANTHROPIC_DEFAULT_HAIKU_MODEL": MODEL, "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
               "DISABLE_AUTOUPDATER": "1"}
        (tmp_path / "home").mkdir()
        done = subprocess.run(["claude", "-p", "say hi"], env=env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=600)
    access = [m.groupdict() for m in ACCESS.finditer(log.read_text())]
    messages = [a for a in access if a["path"].startswith("/v1/messages")]
    assert messages, access
    assert all(a["status"] == "200" for a in messages), messages
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert done.stdout.strip()  # the (tiny, random) model's answer
