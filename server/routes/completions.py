"""``POST /v1/completions``: the legacy text completion API over the same engine (no chat template).

Wire format: https://platform.openai.com/docs/api-reference/completions (``text_completion`` objects,
legacy logprobs with ``tokens``/``token_logprobs``/``top_logprobs``/``text_offset``). One prompt per
request (a string, a list of one string, or a list of token ids, which the engine range-checks);
``echo``, ``suffix`` and ``best_of > 1`` are refused; ``max_tokens`` defaults to 16, as OpenAI's does. The serving path is ``server/generation.py``'s;
this module keeps only the shapes.
"""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import APIRouter

from engine import FinishEvent, TokenEvent
from server.generation import Collected, Formatter, Run, ServingDep, sinkserve_info, usage_info
from server.protocol import (
    STREAM_RESPONSE,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
)

router = APIRouter(tags=["completions"])
ENDPOINT = "/v1/completions"


def legacy_logprobs(tokens: list[TokenEvent], offset: int = 0) -> CompletionLogprobs:
    out = CompletionLogprobs()
    for event in tokens:
        if event.logprob is None:
            continue
        out.tokens.append(event.logprob.token)
        out.token_logprobs.append(event.logprob.logprob)
        out.top_logprobs.append({t.token: t.logprob for t in event.top_logprobs})
        out.text_offset.append(offset)
        offset += len(event.text)
    return out


class CompletionFormatter(Formatter):
    """``text_completion`` objects, streamed as chunks of the same shape (without ``sinkserve``)."""

    def __init__(self) -> None:
        self.base: CompletionResponse | None = None
        self.offset = 0
        self.pending: list[TokenEvent] = []  # tokens whose text is still held back

    def _chunk(self, run: Run, choices: list[CompletionChoice], usage=None) -> dict:
        data = self.base.model_copy(update={"choices": choices, "usage": usage})
        return data.sse(exclude={"sinkserve"} if run.include_usage else {"sinkserve", "usage"})

    def _logprobs(self, run: Run) -> CompletionLogprobs | None:
        return legacy_logprobs(self.pending, self.offset) if run.params.logprobs else None

    def start(self, run: Run) -> Iterator[dict]:
        self.base = CompletionResponse(model=run.model, system_fingerprint=run.fingerprint)
        return iter(())

    def token(self, run: Run, event: TokenEvent) -> Iterator[dict]:
        self.pending.append(event)
        if event.text:
            yield self._chunk(run, [CompletionChoice(text=event.text, logprobs=self._logprobs(run))])
            self.offset += sum(len(e.text) for e in self.pending)
            self.pending = []

    def finish(self, run: Run, finish: FinishEvent, reason: str) -> Iterator[dict]:
        yield self._chunk(run, [CompletionChoice(text=finish.text, logprobs=self._logprobs(run),
                                                 finish_reason=reason)])
        if run.include_usage:
            yield self._chunk(run, [], usage=usage_info(finish))

    def response(self, run: Run, collected: Collected) -> CompletionResponse:
        finish = collected.finish
        logprobs = legacy_logprobs(collected.tokens) if run.params.logprobs else None
        return CompletionResponse(
            model=run.model, system_fingerprint=run.fingerprint,
            choices=[CompletionChoice(text=collected.text, logprobs=logprobs, finish_reason=finish.finish_reason)],
            usage=usage_info(finish), sinkserve=sinkserve_info(run, finish),
        )


@router.post(ENDPOINT, response_model=CompletionResponse, responses=STREAM_RESPONSE)
async def create_completion(body: CompletionRequest, serving: ServingDep):
    serving.check_model(body.model)
    params = serving.parameters(body)
    if isinstance(body.prompt, list):  # token ids: the engine range-checks them
        prompt = body.prompt
    else:
        prompt = await serving.tokenize(serving.engine.encode, body.prompt)
    serving.check_prompt_length(prompt, "prompt")
    return await serving.generate(body, prompt, CompletionFormatter(), endpoint=ENDPOINT, params=params,
                                  prompt_param="prompt")
