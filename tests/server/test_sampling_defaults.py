"""Sampling defaults fill only the fields a request omits; the operator's are checked at start."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from server.cli import main
from server.protocol import ChatCompletionRequest
from server.settings import Settings

MESSAGES = [{"role": "user", "content": "hi"}]
DEFAULTS = {"temperature": 0.2, "top_p": 0.9, "top_k": 40.0}


def params(**fields):
    return ChatCompletionRequest(messages=MESSAGES, **fields).to_sampling_params(16, 100, DEFAULTS)


def test_defaults_fill_omitted_fields_only():
    omitted = params()
    assert (omitted.temperature, omitted.top_p, omitted.top_k, omitted.min_p) == (0.2, 0.9, 40, 0.0)
    explicit = params(temperature=0, top_p=1.0)  # an explicit value wins, even the default's own value
    assert (explicit.temperature, explicit.top_p, explicit.top_k) == (0.0, 1.0, 40)
    plain = ChatCompletionRequest(messages=MESSAGES).to_sampling_params(16, 100)
    assert (plain.temperature, plain.top_p, plain.top_k) == (1.0, 1.0, 0)  # no defaults: OpenAI's


def test_operator_defaults_from_the_environment(monkeypatch):
    monkeypatch.setenv("SINKSERVE_SAMPLING_DEFAULTS", '{"temperature": 0.7, "min_p": 0.05}')
    settings = Settings()
    assert settings.sampling_defaults == {"temperature": 0.7, "min_p": 0.05}
    assert settings.engine_config().sampling_defaults == {"temperature": 0.7, "min_p": 0.05}


@pytest.mark.parametrize("bad", [{"temprature": 0.7}, {"temperature": -1}, {"top_p": "high"}])
def test_bad_operator_defaults_are_refused_at_start(bad):
    with pytest.raises(ValidationError, match="sampling_defaults|temperature|top_p"):
        Settings(sampling_defaults=bad)


@pytest.mark.parametrize("flag", ["not json", "[0.7]", '{"temprature": 0.7}'])
def test_bad_flag_stops_serve(flag, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["serve", "--sampling-defaults", flag, "--port", "1"])
    assert stop.value.code not in (0, None)
