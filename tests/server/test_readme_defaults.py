"""The README's first curl against the real embedded model: the sampling defaults make it answer "Paris".

Starts ``sinkserve serve`` (embedded SmolLM2-135M-Instruct) through the shared launcher and sends the
README's body (no temperature: the model card's defaults, temperature 0.2 and top_p 0.9, apply) 5 times,
with seeds 0..4 so the test is reproducible. Unseeded, the same body answered "Paris" 10 times in 20
here: the model's first token is nearly a tie between "The" (log-probability -1.88) and "L" (-1.97), so
at temperature 0.2 about 55% of answers start "The capital of France is Paris". At temperature 1 with
no filter (what a request got before the defaults) the same seeds mostly miss.
"""

from __future__ import annotations

import httpx
import pytest

from bench.serve_process import ServerProcess

BODY = {"model": "SmolLM2-135M-Instruct",
        "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 40}


@pytest.mark.slow
def test_readme_curl_answers_paris_and_greedy_is_reproducible(tmp_path):
    with ServerProcess(tmp_path / "sessions", "--window", "252", log_path=tmp_path / "server.log") as server:
        with httpx.Client(base_url=server.url, timeout=120) as http:
            answers = []
            for seed in range(5):
                reply = http.post("/v1/chat/completions", json={**BODY, "seed": seed})
                assert reply.status_code == 200, reply.text
                answers.append(reply.json()["choices"][0]["message"]["content"])
            assert sum("Paris" in a for a in answers) >= 4, answers
            hot = [http.post("/v1/chat/completions", json={**BODY, "seed": seed, "temperature": 1.0, "top_p": 1.0})
                   .json()["choices"][0]["message"]["content"] for seed in range(5)]
            assert sum("Paris" in a for a in hot) <= 2, hot  # the defaults are what made the difference
            greedy = [http.post("/v1/chat/completions", json={**BODY, "temperature": 0}).json() for _ in range(2)]
            texts = [g["choices"][0]["message"]["content"] for g in greedy]
            assert texts[0] == texts[1] and "Paris" in texts[0], texts
