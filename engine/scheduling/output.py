"""Output processing: a forward pass's logits turned into each request's next token and its token event.

In order, for the rows of a pass: grammar masks (:class:`~engine.scheduling.grammar.BatchMask`; a row its
grammar leaves no token ends with an error), sampling (rows with plain settings drawn together in one
batched op sequence, the others one by one through the reference path, engine/scheduling/sampling.py),
the end checks (a grammar's acceptance, end-of-sequence tokens, ``max_tokens``), detokenization and stop
sequences (engine/scheduling/stops.py), and logprobs. The scheduler calls it after each pass
(:meth:`OutputProcessor.after_prefill`, :meth:`OutputProcessor.after_decode`) and is called back to
finish a request.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from engine.events import TokenEvent, TokenLogprob
from engine.scheduling.grammar import BatchMask
from engine.scheduling.sampling import (
    SamplingParams,
    filter_logits,
    penalize_logits,
    plain,
    sample,
    sample_batch,
    token_logprobs,
)

if TYPE_CHECKING:
    from engine.scheduling.scheduler import Request

REPETITION_CONTEXT = 64  # prompt tokens the repetition penalty looks at, besides every generated token

# finish(request, reason, error=None, flush=True): the scheduler's end of a request
Finish = Callable[..., None]


class OutputProcessor:
    """Samples, checks and hands out each request's next token after a forward pass."""

    def __init__(self, tokenizer, eos_ids: set[int], max_batch: int, counters: dict, finish: Finish) -> None:
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.max_batch = max_batch
        self.counters = counters  # the scheduler's: generated_tokens is counted here
        self.finish = finish
        self.masks: BatchMask | None = None  # built at the first constrained request

    def after_prefill(self, request: Request, logits: torch.Tensor) -> None:
        """The last chunk of ``request``'s prompt was fed: its first token from ``logits`` (1, V)."""
        if self.constrain([request], logits):
            self.sample(request, logits[0])

    def after_decode(self, requests: list[Request], logits: torch.Tensor) -> None:
        """A batched decode step fed ``requests``: their next tokens from ``logits`` (B, V)."""
        live = self.constrain(requests, logits)
        # rows with plain settings (no penalties, bias, seed or logprobs) are drawn together: one op sequence
        plain_rows = [i for i, r in enumerate(requests) if r in live and plain(r.params)]
        batch = logits if len(plain_rows) == len(requests) else logits[plain_rows]  # (B', V)
        drawn = dict(zip(plain_rows, sample_batch(batch, [requests[i].params for i in plain_rows]), strict=True)) \
            if plain_rows else {}
        for i, (request, row_logits) in enumerate(zip(requests, logits, strict=True)):
            if request in live:
                self.sample(request, row_logits, drawn.get(i))  # the others: the per-row reference path

    def constrain(self, requests: list[Request], logits: torch.Tensor) -> list[Request]:
        """Mask the constrained rows' ``logits`` (B, V) in place to their grammar's allowed tokens; the
        requests whose grammar allows none end with an error. Returns the requests still live."""
        constraints = [r.constraint for r in requests]
        if all(c is None for c in constraints):
            return requests
        if self.masks is None:
            self.masks = BatchMask(self.max_batch, logits.shape[-1])
        with torch.inference_mode():  # the logits are inference tensors: masked in place
            dead = set(self.masks.apply(logits, constraints))
        for i in sorted(dead):
            why = requests[i].constraint.error or "no token can continue the required format"
            self.finish(requests[i], "error", error=f"constrained decoding stopped: {why}")
        return [r for i, r in enumerate(requests) if i not in dead]

    def sample(self, request: Request, logits: torch.Tensor, token: int | None = None) -> None:
        """Take the next token from ``logits`` (V,), or ``token`` when the batched sampler drew it already."""
        params = request.params
        penalized = None  # only rows with logprobs need it, and those are never drawn in the batch
        if token is None:
            context = request.prompt[-REPETITION_CONTEXT:] + request.generated
            penalized = penalize_logits(logits, params, context, request.generated)
            token = sample(filter_logits(penalized, params), params, request.generator)
        request.generated.append(token)
        self.counters["generated_tokens"] += 1
        constraint = request.constraint
        if constraint is not None and not constraint.accept(token):  # the mask allowed it: a grammar bug
            self.finish(request, "error", error=f"constrained decoding stopped: {constraint.error}")
            return
        if token in self.eos_ids and (not params.ignore_eos or constraint is not None):
            self.finish(request, "stop")  # under a grammar, a stop token comes only where it may end
            return
        logprob, top = self.logprobs(penalized, token, params)
        text, stopped = request.stops.push(request.detok.push(token))
        request.emit(TokenEvent(text=text, token_id=token, logprob=logprob, top_logprobs=top))
        if stopped or (constraint is not None and constraint.is_finished()):
            self.finish(request, "stop", flush=not stopped)
        elif len(request.generated) >= params.max_tokens:
            self.finish(request, "length")
        else:
            request.next_token = token

    def logprobs(self, penalized: torch.Tensor, token: int, params: SamplingParams):
        """The chosen token's logprob and the top alternatives, when ``params`` asks for them."""
        if not params.logprobs:
            return None, []
        chosen, alternatives = token_logprobs(penalized, token, params.top_logprobs)
        return self.token_logprob(token, chosen), [self.token_logprob(t, lp) for t, lp in alternatives]

    def token_logprob(self, token: int, logprob: float) -> TokenLogprob:
        text = self.tokenizer.decode([token])
        return TokenLogprob(token=text, logprob=logprob, bytes=list(text.encode("utf-8")))
