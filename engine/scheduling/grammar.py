"""Constrained decoding: grammars compiled for one model's tokenizer, per-request matchers, batch masks.

The grammar engine is llguidance (https://github.com/guidance-ai/llguidance, the Earley parser with a
token-trie lexer behind Guidance; chosen over xgrammar by ``scripts/grammar_choice.py``). Three layers:

- ``Grammar``: what a request asks for (a JSON schema, any JSON object, a Lark grammar or a regex),
  hashable, so it keys the compile cache.
- ``GrammarCompiler``: one per model. It wraps the tokenizer for llguidance with the vocabulary size of
  the **logits** (padded vocabularies are wider than the tokenizer) and the model's complete stop set (the
  one the engine's stop check uses: ``LoadedModel.eos_token_ids``), so a stop token is allowed exactly
  where the grammar may end. ``compile`` is blocking (milliseconds, more for huge schemas): call it in a
  thread (``asyncio.to_thread``), never on the event loop. Compiled grammars are kept in a bounded LRU
  cache keyed by the ``Grammar``; a bad grammar raises ``InvalidRequest`` with llguidance's reason.
  Some grammars compile and fail only at their first token (a schema that refers to itself with nothing
  else, a regex too large for the lexer, thousands of optional properties, a required recursive object):
  ``compile`` tries a first token on a copy (``probe``), so those are refused before any request starts.
- ``Constraint``: one request's matcher (fill its mask row, accept the sampled token, ask whether it may
  or must end), and ``BatchMask``: one preallocated bitmask for the whole batch, filled only for the
  constrained rows and applied to their logits before sampling.

JSON is generated compact with Python's default separators (``", "`` and ``": "``) and no other
whitespace between tokens: a small model cannot loop on blanks until ``max_tokens``.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

import llguidance
import llguidance.hf
import torch

from engine.errors import InvalidRequest

log = logging.getLogger(__name__)

MAX_GRAMMAR_CHARS = 65_536  # a schema or grammar text longer than this is refused (InvalidRequest)
# Overrides applied after the schema's own "x-guidance" options, so no request can turn free whitespace
# back on or make the compiler ignore keywords it does not implement.
JSON_OPTIONS = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
    "lenient": False,
}
KINDS = ("json_schema", "json_object", "lark", "regex")
PROBE_STEPS = 8  # tokens a new grammar must accept before it is cached (see ``probe``)


@dataclass(frozen=True)
class Grammar:
    """A constraint on the generated text. ``source``: the schema as JSON text, the Lark grammar or the regex."""

    kind: str
    source: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidRequest(f"unknown grammar kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        if len(self.source) > MAX_GRAMMAR_CHARS:
            raise InvalidRequest(
                f"the {self.kind.replace('_', ' ')} is {len(self.source)} characters; the limit is {MAX_GRAMMAR_CHARS}"
            )

    @classmethod
    def json_schema(cls, schema: dict) -> Grammar:
        """JSON that validates against ``schema`` (a JSON Schema object; property order is kept)."""
        if not isinstance(schema, dict):
            raise InvalidRequest(f"a JSON schema must be an object, not {type(schema).__name__}")
        try:
            text = json.dumps(schema, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InvalidRequest(f"the JSON schema is not serializable JSON: {exc}") from exc
        return cls("json_schema", text)

    @classmethod
    def json_object(cls) -> Grammar:
        """Any JSON object (OpenAI's ``response_format: {"type": "json_object"}``)."""
        return cls("json_object")

    @classmethod
    def lark(cls, text: str) -> Grammar:
        return cls("lark", text)

    @classmethod
    def regex(cls, pattern: str) -> Grammar:
        return cls("regex", pattern)

    def llguidance_text(self) -> str:
        """The grammar in llguidance's serialized form (not yet checked)."""
        if self.kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=JSON_OPTIONS)
        if self.kind == "json_schema":
            return llguidance.LLMatcher.grammar_from_json_schema(self.source, overrides=JSON_OPTIONS)
        if self.kind == "lark":
            return llguidance.LLMatcher.grammar_from_lark(self.source)
        return llguidance.LLMatcher.grammar_from_regex(self.source)


class Constraint:
    """One request's position in its grammar. Not thread-safe: used by the scheduler's thread only."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self.matcher = matcher

    def fill_mask(self, bitmask_row: torch.Tensor) -> bool:
        """Write the allowed next tokens into ``bitmask_row`` ((ceil(V/32),) int32, CPU, contiguous).

        Returns False when no token is allowed (the grammar is dead: a rejected token, or a grammar that
        matches nothing); the caller must end the request with an error instead of sampling.
        """
        if self.matcher.is_error():
            bitmask_row.zero_()
            return False
        self.matcher.unsafe_compute_mask_ptr(bitmask_row.data_ptr(), bitmask_row.numel() * 4)
        return not self.matcher.is_error() and bool(bitmask_row.any())

    def accept(self, token: int) -> bool:
        """Advance by the sampled ``token``; False if the grammar rejects it (the matcher is then dead)."""
        return self.matcher.consume_token(token)

    def can_end(self) -> bool:
        """The text so far is complete: a stop token is allowed now."""
        return self.matcher.is_accepting()

    def is_finished(self) -> bool:
        """The grammar is complete and only a stop token may follow: the caller may end the request now."""
        return self.matcher.is_stopped()

    def rollback(self, num_tokens: int) -> bool:
        """Undo the last ``num_tokens`` accepted tokens (cheap in llguidance); False if it cannot."""
        return self.matcher.rollback(num_tokens)

    @property
    def error(self) -> str | None:
        """Why the matcher is dead (llguidance's message), or None while it is alive."""
        return self.matcher.get_error() if self.matcher.is_error() else None


class GrammarCompiler:
    """Compiles ``Grammar``s for one model's tokenizer; thread-safe; keeps the last ``cache_size`` compiled."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: Iterable[int], cache_size: int = 64) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size  # the logits' width
        self.stop_token_ids = frozenset(int(t) for t in stop_token_ids)
        if not self.stop_token_ids:
            raise ValueError("a grammar needs at least one stop token")
        self.cache_size = cache_size
        self._cache: OrderedDict[Grammar, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()
        self._info: llguidance.LLTokenizer | None = None
        self.hits = self.misses = 0

    @classmethod
    def for_model(cls, loaded, cache_size: int = 64) -> GrammarCompiler:
        """For an ``engine.model.loader.LoadedModel``: its logits width and its stop set."""
        return cls(loaded.tokenizer, logits_vocab_size(loaded.model), loaded.eos_token_ids, cache_size)

    def tokenizer_info(self) -> llguidance.LLTokenizer:
        """llguidance's view of the tokenizer, built once on first use (about a second)."""
        with self._lock:
            if self._info is None:
                try:
                    self._info = llguidance.hf.from_tokenizer(
                        self.tokenizer, n_vocab=self.vocab_size, eos_token=sorted(self.stop_token_ids)
                    )
                except ValueError as exc:  # a slow (non-Rust) tokenizer
                    raise InvalidRequest(f"this model's tokenizer does not support constrained decoding: {exc}") from exc
            return self._info

    def compile(self, grammar: Grammar) -> llguidance.LLMatcher:
        """The compiled grammar (a pristine matcher), from the cache or built now. Blocking: run in a thread."""
        with self._lock:
            cached = self._cache.get(grammar)
            if cached is not None:
                self._cache.move_to_end(grammar)
                self.hits += 1
                return cached
        matcher = self._build(grammar)
        with self._lock:
            self.misses += 1
            self._cache[grammar] = matcher
            self._cache.move_to_end(grammar)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return matcher

    def _build(self, grammar: Grammar) -> llguidance.LLMatcher:
        try:
            text = grammar.llguidance_text()
        except ValueError as exc:
            raise InvalidRequest(f"invalid {grammar.kind.replace('_', ' ')}: {exc}") from exc
        matcher = llguidance.LLMatcher(self.tokenizer_info(), text, log_level=0)
        if matcher.is_error():
            raise InvalidRequest(f"invalid or unsupported {grammar.kind.replace('_', ' ')}: {matcher.get_error()}")
        why = probe(matcher.deep_copy(), self.vocab_size)
        if why is not None:
            why = why.strip().splitlines()[0][:200] if why.strip() else "no token can start it"
            why = "it matches no text" if why.startswith("NoExtensionBias") else why
            raise InvalidRequest(f"unsupported {grammar.kind.replace('_', ' ')}: it cannot start ({why})")
        return matcher


    def constraint(self, grammar: Grammar) -> Constraint:
        """A fresh matcher for one request (compiles on a cache miss: blocking, run in a thread)."""
        compiled = self.compile(grammar)
        with self._lock:  # deep_copy only reads the pristine matcher; the lock keeps copies one at a time
            return Constraint(compiled.deep_copy())


def probe(matcher: llguidance.LLMatcher, vocab_size: int, steps: int = PROBE_STEPS) -> str | None:
    """Why ``matcher`` (a copy: it is consumed) cannot produce its first tokens, or None when it can.

    Walks ``steps`` tokens, each the lowest id the mask allows; a grammar that may end before then passes."""
    row = torch.zeros((vocab_size + 31) // 32, dtype=torch.int32)
    for _ in range(steps):
        if matcher.is_stopped():
            return None
        if not Constraint(matcher).fill_mask(row):
            return matcher.get_error() or "no token can start it"
        words = row.nonzero()
        first = int(words[0, 0])
        word = int(row[first]) & 0xFFFFFFFF
        token = first * 32 + ((word & -word).bit_length() - 1)
        if not matcher.consume_token(token) or matcher.is_error():
            return matcher.get_error() or "its first token is rejected"
    return None


class BatchMask:
    """One preallocated bitmask for the batch; masks the logits of the constrained rows only."""

    def __init__(self, max_batch: int, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.bitmask = torch.zeros(max_batch, (vocab_size + 31) // 32, dtype=torch.int32)  # (B_max, W)
        self._bits = torch.tensor([1 << b for b in range(32)], dtype=torch.int64).to(torch.int32)  # (32,)

    def apply(self, logits: torch.Tensor, constraints: list[Constraint | None]) -> list[int]:
        """Set the logits of disallowed tokens to -inf in the rows that have a constraint, in place.

        ``logits`` (B, V) with V = the vocab size given at construction; ``constraints[i]`` belongs to
        row i. Returns the rows whose grammar allows no token at all: their logits are left as they are
        and the caller must end them with an error rather than emit what it samples.
        """
        rows = [i for i, c in enumerate(constraints) if c is not None]
        if not rows:
            return []
        if len(constraints) != logits.shape[0] or logits.shape[-1] != self.vocab_size:
            raise ValueError(f"logits {tuple(logits.shape)} do not match {len(constraints)} rows x {self.vocab_size}")
        dead = [i for k, i in enumerate(rows) if not constraints[i].fill_mask(self.bitmask[k])]
        live = [k for k, i in enumerate(rows) if i not in dead]
        if live:
            words = self.bitmask[live].to(logits.device, non_blocking=True)  # (n, W) int32
            bits = self._bits.to(logits.device)  # (32,) the value of each bit
            banned = (words.unsqueeze(-1) & bits).eq(0).flatten(1)[:, : self.vocab_size]  # (n, V)
            for j, k in enumerate(live):  # in place, row by row: no copy of the batch's logits
                logits[rows[k]].masked_fill_(banned[j], float("-inf"))
        return dead


def logits_vocab_size(model: torch.nn.Module) -> int:
    """The width of the model's logits: its output projection's, which may exceed the tokenizer's length."""
    head = model.get_output_embeddings()
    width = getattr(head, "out_features", None)
    if width is None and getattr(head, "weight", None) is not None:
        width = head.weight.shape[0]
    return int(width or model.config.get_text_config().vocab_size)
