"""Constrained decoding (engine/scheduling/grammar.py) with the embedded model's real tokenizer and random "models"."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from engine.config import EngineConfig
from engine.errors import InvalidRequest
from engine.model.loader import load_tokenizer
from engine.scheduling.grammar import (
    MAX_GRAMMAR_CHARS,
    BatchMask,
    Grammar,
    GrammarCompiler,
    logits_vocab_size,
)

V = 49152  # the embedded model's logits width

NESTED = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "kind": {"enum": ["city", "town", "village"]},
        "population": {"type": "integer", "minimum": 0, "maximum": 99999},
        "capital": {"type": "boolean"},
        "districts": {
            "type": "array",
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 6},
                    "tags": {"type": "array", "maxItems": 2, "items": {"enum": ["old", "new", "hill"]}},
                },
                "required": ["name", "tags"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["name", "kind", "population", "capital", "districts"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None, EngineConfig().cache_dir)


@pytest.fixture(scope="module")
def compiler(tokenizer):
    return GrammarCompiler(tokenizer, V, {tokenizer.eos_token_id})


def random_greedy(compiler, tokenizer, grammar, seed, steps=400, vocab=V):
    """A "model" whose logits are random, decoded greedily under the mask: the decoded text."""
    constraint, mask = compiler.constraint(grammar), BatchMask(1, vocab)
    generator = torch.Generator().manual_seed(seed)
    tokens = []
    for _ in range(steps):
        logits = torch.randn(1, vocab, generator=generator)  # (1, V)
        assert mask.apply(logits, [constraint]) == []
        token = int(logits.argmax())
        if token in compiler.stop_token_ids:
            assert constraint.can_end()
            return tokenizer.decode(tokens)
        assert constraint.accept(token)
        tokens.append(token)
    raise AssertionError(f"no stop token after {steps} steps: {tokenizer.decode(tokens)!r}")


@pytest.mark.parametrize("seed", range(6))
def test_random_model_always_writes_valid_json(compiler, tokenizer, seed):
    text = random_greedy(compiler, tokenizer, Grammar.json_schema(NESTED), seed)
    jsonschema.validate(json.loads(text), NESTED)


def test_json_object_is_any_object(compiler, tokenizer):
    document = tokenizer.encode('{"a": [1, {"b": null}], "c": "d"}', add_special_tokens=False)
    constraint = compiler.constraint(Grammar.json_object())
    assert all(constraint.accept(t) for t in document) and constraint.is_finished()
    for not_an_object in ("[1]", '"x"', "12"):
        constraint = compiler.constraint(Grammar.json_object())
        assert not constraint.accept(tokenizer.encode(not_an_object, add_special_tokens=False)[0])


def test_stop_tokens_only_where_the_grammar_may_end(tokenizer):
    stops = {tokenizer.eos_token_id, 0}  # two stop tokens, as with a generation config's list
    compiler = GrammarCompiler(tokenizer, V, stops)
    constraint, mask = compiler.constraint(Grammar.json_schema({"type": "array", "items": {"type": "integer"}})), BatchMask(1, V)
    tokens = tokenizer.encode("[1, 22]", add_special_tokens=False)
    for i, token in enumerate(tokens):
        logits = torch.zeros(1, V)
        mask.apply(logits, [constraint])
        allowed = torch.isfinite(logits[0])
        assert not any(allowed[s] for s in stops), f"a stop token allowed after {tokenizer.decode(tokens[:i])!r}"
        assert not constraint.can_end() and not constraint.is_finished()
        assert allowed[token]
        assert constraint.accept(token)
    assert constraint.can_end() and constraint.is_finished()
    logits = torch.zeros(1, V)
    mask.apply(logits, [constraint])
    assert set(torch.isfinite(logits[0]).nonzero().flatten().tolist()) == stops  # nothing but a stop


def test_whitespace_is_bounded(compiler, tokenizer):
    """Between JSON tokens the only blank is the one space of ", " (and ": "): never two in a row."""
    schema = {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}}
    constraint, mask = compiler.constraint(Grammar.json_schema(schema)), BatchMask(1, V)
    blanks = [t for t in range(len(tokenizer)) if tokenizer.decode([t]) and not tokenizer.decode([t]).strip()]
    single_space = tokenizer.convert_tokens_to_ids("\u0120")  # the byte-level BPE token for " "
    document = tokenizer.encode("[[1, 2], [3]]", add_special_tokens=False)
    for i, piece in enumerate(document):
        logits = torch.zeros(1, V)
        mask.apply(logits, [constraint])
        allowed = {t for t in blanks if torch.isfinite(logits[0, t])}
        ends_blank = tokenizer.decode(document[:i]).endswith(" ")
        assert allowed <= ({single_space} if not ends_blank else set())
        assert constraint.accept(piece)


@pytest.mark.parametrize(
    "schema, reason",
    [
        ({"type": "object", "properties": {"a": {"type": "foo"}}}, "foo"),
        ({"type": "array", "uniqueItems": True}, "uniqueItems"),  # unimplemented: refused, not ignored
        ({"$ref": "#/$defs/missing"}, "missing"),
    ],
)
def test_invalid_schema_is_invalid_request(compiler, schema, reason):
    with pytest.raises(InvalidRequest, match=reason):
        compiler.compile(Grammar.json_schema(schema))


def test_bad_grammar_inputs(compiler):
    with pytest.raises(InvalidRequest, match="must be an object"):
        Grammar.json_schema([1])
    with pytest.raises(InvalidRequest, match="limit"):
        Grammar.json_schema({"description": "x" * MAX_GRAMMAR_CHARS})
    with pytest.raises(InvalidRequest, match="unknown grammar kind"):
        Grammar("yaml")
    with pytest.raises(InvalidRequest, match="regex"):
        compiler.compile(Grammar.regex("a("))


def test_cache_hits_and_evicts(tokenizer):
    compiler = GrammarCompiler(tokenizer, V, {tokenizer.eos_token_id}, cache_size=2)
    a, b, c = (Grammar.json_schema({"type": "integer", "maximum": n}) for n in (1, 2, 3))
    first = compiler.compile(a)
    assert compiler.compile(Grammar.json_schema({"type": "integer", "maximum": 1})) is first  # equal spec: a hit
    assert (compiler.hits, compiler.misses) == (1, 1)
    compiler.compile(b), compiler.compile(c)  # a is the least recently used: evicted
    assert compiler.compile(a) is not first and compiler.misses == 4
    # each request gets its own matcher: one advancing leaves the other at the start
    one, two = compiler.constraint(b), compiler.constraint(b)
    assert one.accept(tokenizer.convert_tokens_to_ids("1"))
    assert one.can_end() and not two.can_end()


def test_batch_mask_rows_dead_rows_and_padded_vocab(compiler, tokenizer):
    padded = V + 64  # a padded logits width: the extra ids are never allowed
    wide = GrammarCompiler(tokenizer, padded, compiler.stop_token_ids)
    grammar = Grammar.regex("ab+")
    alive, dead = wide.constraint(grammar), wide.constraint(grammar)
    assert not dead.accept(tokenizer.convert_tokens_to_ids("b"))  # rejected: the matcher is dead
    assert dead.error
    logits = torch.randn(4, padded)  # (B, V)
    before = logits.clone()
    assert BatchMask(8, padded).apply(logits, [None, alive, dead, None]) == [2]
    assert torch.equal(logits[[0, 2, 3]], before[[0, 2, 3]])  # unconstrained and dead rows untouched
    allowed = torch.isfinite(logits[1]).nonzero().flatten().tolist()
    assert allowed and all(tokenizer.decode([t]).startswith("a") for t in allowed)
    assert max(allowed) < V


def test_rollback(compiler, tokenizer):
    constraint = compiler.constraint(Grammar.json_schema({"enum": ["yes", "no"]}))
    tokens = tokenizer.encode('"yes"', add_special_tokens=False)
    assert all(constraint.accept(t) for t in tokens) and constraint.can_end()
    assert constraint.rollback(1) and not constraint.can_end()


def test_logits_vocab_size_is_the_output_width():
    from tests.tiny_models import tiny_model

    assert logits_vocab_size(tiny_model("llama")) == 96
