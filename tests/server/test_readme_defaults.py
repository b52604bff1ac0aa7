"""The README's first curl against the real embedded model: the sampling defaults make it answer "Paris".

Starts ``sinkserve serve`` (embedded SmolLM2-135M-Instruct) through the shared launcher and sends the
README's own first request body (parsed from README.md, so the test follows the README), unseeded, 5
times: the model card's defaults (temperature 0.2, top_p 0.9) apply and at least 4 answers name Paris.
Greedy (``temperature: 0``) must stay reproducible, and the same body at temperature 1 with no filter (what
a request got before the defaults) must not look as good.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest

from bench.serve_process import ServerProcess

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_first_body() -> dict:
    """The JSON body of the README's first ``curl ... -d '{...}'``."""
    match = re.search(r"curl -s \S+/v1/chat/completions [^\n]*-d '(\{.*?\})'", README.read_text(), re.S)
    assert match, "the README has no chat completions curl"
    return json.loads(match.group(1))


@pytest.mark.slow
def test_readme_curl_answers_paris_and_greedy_is_reproducible(tmp_path):
    body = readme_first_body()
    assert "temperature" not in body and "seed" not in body  # the defaults are what is tested
    with ServerProcess(tmp_path / "sessions", "--window", "252", log_path=tmp_path / "server.log") as server:
        with httpx.Client(base_url=server.url, timeout=120) as http:
            answers = []
            for _ in range(5):
                reply = http.post("/v1/chat/completions", json=body)
                assert reply.status_code == 200, reply.text
                answers.append(reply.json()["choices"][0]["message"]["content"])
            assert sum("Paris" in a for a in answers) >= 4, answers
            greedy = [http.post("/v1/chat/completions", json={**body, "temperature": 0}).json() for _ in range(2)]
            texts = [g["choices"][0]["message"]["content"] for g in greedy]
            assert texts[0] == texts[1] and "Paris" in texts[0], texts
            hot = [http.post("/v1/chat/completions", json={**body, "seed": seed, "temperature": 1.0, "top_p": 1.0})
                   .json()["choices"][0]["message"]["content"] for seed in range(5)]
            assert hot != [texts[0]] * 5  # temperature 1 wanders: the defaults made the difference
