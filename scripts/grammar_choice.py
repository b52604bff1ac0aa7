"""Measure the candidate grammar engines for constrained decoding on this CPU (issue 12).

Compares llguidance (https://github.com/guidance-ai/llguidance) and xgrammar
(https://github.com/mlc-ai/xgrammar) with the embedded model's tokenizer (SmolLM2-135M-Instruct, logits
vocabulary 49152): the one-off tokenizer-info build, the compile time of a nested JSON schema (objects,
arrays, enums, required, ``additionalProperties: false``), the time to compute one token's mask while a
valid document is replayed, and JSON-Schema coverage: for each feature a schema, one valid and one invalid
instance; a feature counts as covered when the schema compiles, the valid instance (tokenized as the
model would write it) is accepted up to the stop token and the invalid one is rejected. A library that
is not installed is skipped (only llguidance is a dependency; ``pip install xgrammar==0.2.8`` to compare).

    .venv/bin/python scripts/grammar_choice.py
"""

from __future__ import annotations

import json
import statistics
import time
from importlib.metadata import version

from engine.config import EngineConfig
from engine.model.loader import load_tokenizer

VOCAB = 49152  # the embedded model's logits width
SEPARATORS = (", ", ": ")

NESTED = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "kind": {"enum": ["city", "town", "village"]},
        "population": {"type": "integer", "minimum": 0},
        "location": {
            "type": "object",
            "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
            "required": ["lat", "lon"],
            "additionalProperties": False,
        },
        "districts": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}}},
                "required": ["name", "tags"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["name", "kind", "population", "location", "districts"],
    "additionalProperties": False,
}
NESTED_VALID = {
    "name": "Lyon", "kind": "city", "population": 522250, "location": {"lat": 45.76, "lon": 4.84},
    "districts": [{"name": "Croix-Rousse", "tags": ["hill", "silk"]}, {"name": "Vieux Lyon", "tags": []}],
}

# feature: (schema, valid instance, invalid instance)
FEATURES = {
    "nested objects/arrays/enum/required/additionalProperties": (NESTED, NESTED_VALID, {**NESTED_VALID, "x": 1}),
    "string minLength/maxLength": ({"type": "string", "minLength": 2, "maxLength": 4}, "abc", "abcdef"),
    "string pattern": ({"type": "string", "pattern": "^[a-z]+-[0-9]{2}$"}, "ab-12", "ab-123"),
    "format date-time": ({"type": "string", "format": "date-time"}, "2024-05-01T10:00:00Z", "yesterday"),
    "format email": ({"type": "string", "format": "email"}, "a@b.io", "not an email"),
    "format uuid": ({"type": "string", "format": "uuid"}, "123e4567-e89b-12d3-a456-426614174000", "123"),
    "integer minimum/maximum": ({"type": "integer", "minimum": 1, "maximum": 5}, 3, 7),
    "number exclusiveMinimum": ({"type": "number", "exclusiveMinimum": 0}, 0.5, -1),
    "multipleOf": ({"type": "integer", "multipleOf": 5}, 15, 7),
    "array minItems/maxItems": ({"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 2},
                                [1, 2], [1, 2, 3]),
    "prefixItems": ({"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "items": False},
                    [1, "a"], ["a", 1]),
    "uniqueItems": ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, [1, 2], [1, 1]),
    "anyOf": ({"anyOf": [{"type": "integer"}, {"type": "string"}]}, "x", [1]),
    "oneOf": ({"oneOf": [{"type": "integer"}, {"type": "boolean"}]}, True, "x"),
    "allOf": ({"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                         {"type": "object", "properties": {"b": {"type": "integer"}}, "required": ["b"]}]},
              {"a": 1, "b": 2}, {"a": 1}),
    "$ref/$defs": ({"$defs": {"P": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}},
                    "type": "array", "items": {"$ref": "#/$defs/P"}}, [{"x": 1}], [{"y": 1}]),
    "recursive $ref": ({"$defs": {"T": {"type": "object", "properties": {"kids": {"type": "array",
                        "items": {"$ref": "#/$defs/T"}}}, "required": ["kids"], "additionalProperties": False}},
                        "$ref": "#/$defs/T"}, {"kids": [{"kids": []}]}, {"kids": [{}]}),
    "const": ({"const": "fixed"}, "fixed", "other"),
    "type list (nullable)": ({"type": ["string", "null"]}, None, 1),
    "additionalProperties schema": ({"type": "object", "additionalProperties": {"type": "integer"}},
                                    {"a": 1, "b": 2}, {"a": "x"}),
    "patternProperties": ({"type": "object", "patternProperties": {"^n_": {"type": "integer"}},
                           "additionalProperties": False}, {"n_a": 1}, {"m": 1}),
    "minProperties/maxProperties": ({"type": "object", "additionalProperties": {"type": "integer"},
                                     "maxProperties": 1}, {"a": 1}, {"a": 1, "b": 2}),
}


class Llguidance:
    name = "llguidance"

    def __init__(self, tokenizer) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.llg, self.lt = llguidance, llguidance.torch
        self.version = llguidance.__version__
        self.info = llguidance.hf.from_tokenizer(tokenizer, n_vocab=VOCAB, eos_token=[tokenizer.eos_token_id])
        self.bitmask = llguidance.torch.allocate_token_bitmask(1, VOCAB)

    def compile(self, schema):
        options = {"whitespace_flexible": False, "item_separator": SEPARATORS[0], "key_separator": SEPARATORS[1]}
        grammar = self.llg.LLMatcher.grammar_from_json_schema(schema, defaults=options)
        matcher = self.llg.LLMatcher(self.info, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher

    def fill(self, matcher) -> None:
        self.lt.fill_next_token_bitmask(matcher, self.bitmask)

    def accept(self, matcher, token: int) -> bool:
        return matcher.consume_token(token)


class Xgrammar:
    name = "xgrammar"

    def __init__(self, tokenizer) -> None:
        import xgrammar

        self.xgr, self.version = xgrammar, version("xgrammar")
        self.info = xgrammar.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=VOCAB, stop_token_ids=[tokenizer.eos_token_id]
        )
        self.bitmask = xgrammar.allocate_token_bitmask(1, VOCAB)

    def compile(self, schema):
        compiler = self.xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=SEPARATORS)
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matcher) -> None:
        matcher.fill_next_token_bitmask(self.bitmask, 0)

    def accept(self, matcher, token: int) -> bool:
        return matcher.accept_token(token)


def tokens_of(tokenizer, instance) -> list[int]:
    return tokenizer.encode(json.dumps(instance, separators=SEPARATORS), add_special_tokens=False)


def accepts(lib, matcher, tokens: list[int], stop: int) -> bool:
    return all(lib.accept(matcher, t) for t in [*tokens, stop])


def measure(lib, tokenizer) -> dict:
    stop = tokenizer.eos_token_id
    compile_s = []
    for _ in range(5):
        start = time.perf_counter()
        lib.compile(NESTED)
        compile_s.append(time.perf_counter() - start)
    tokens = tokens_of(tokenizer, NESTED_VALID)
    mask_us = []
    for _ in range(3):
        matcher = lib.compile(NESTED)
        for token in tokens:
            start = time.perf_counter()
            lib.fill(matcher)
            mask_us.append((time.perf_counter() - start) * 1e6)
            assert lib.accept(matcher, token)
    covered, missing = 0, []
    for feature, (schema, valid, invalid) in FEATURES.items():
        try:
            ok = accepts(lib, lib.compile(schema), tokens_of(tokenizer, valid), stop)
            ok = ok and not accepts(lib, lib.compile(schema), tokens_of(tokenizer, invalid), stop)
        except Exception:  # noqa: BLE001 - a schema the library refuses counts as not covered
            ok = False
        covered += ok
        if not ok:
            missing.append(feature)
    return {
        "compile_ms": 1000 * statistics.median(compile_s[1:]),
        "first_compile_ms": 1000 * compile_s[0],
        "mask_us_mean": statistics.mean(mask_us),
        "mask_us_p99": sorted(mask_us)[int(0.99 * (len(mask_us) - 1))],
        "covered": covered,
        "missing": missing,
    }


def engine_step_cost(tokenizer, rows: int = 8) -> float:
    """engine/scheduling/grammar.py's BatchMask.apply for ``rows`` constrained rows inside a string (best of 30, ms)."""
    import torch

    from engine.scheduling.grammar import BatchMask, Grammar, GrammarCompiler

    compiler = GrammarCompiler(tokenizer, VOCAB, {tokenizer.eos_token_id})
    constraints = [compiler.constraint(Grammar.json_schema(NESTED)) for _ in range(rows)]
    for constraint in constraints:
        for token in tokenizer.encode('{"name": "Ly', add_special_tokens=False):
            assert constraint.accept(token)
    mask, logits = BatchMask(rows, VOCAB), torch.randn(rows, VOCAB)
    times = []
    for _ in range(30):
        start = time.perf_counter()
        mask.apply(logits, constraints)
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


def main() -> None:
    tokenizer = load_tokenizer(None, EngineConfig().cache_dir)
    print(f"tokenizer: SmolLM2-135M-Instruct, logits vocab {VOCAB}; {len(FEATURES)} JSON-Schema features")
    for cls in (Llguidance, Xgrammar):
        start = time.perf_counter()
        try:
            lib = cls(tokenizer)
        except ImportError:
            print(f"{cls.name}: not installed, skipped")
            continue
        info_s = time.perf_counter() - start
        r = measure(lib, tokenizer)
        print(
            f"{lib.name} {lib.version}: tokenizer info {info_s:.2f} s; nested schema compile "
            f"{r['compile_ms']:.1f} ms (first {r['first_compile_ms']:.1f} ms); mask per token "
            f"{r['mask_us_mean']:.0f} us mean, {r['mask_us_p99']:.0f} us p99; "
            f"coverage {r['covered']}/{len(FEATURES)}; not covered: {', '.join(r['missing']) or 'none'}"
        )
    print(f"engine/scheduling/grammar.py BatchMask.apply, 8 constrained rows (masks + -inf fill): {engine_step_cost(tokenizer):.2f} ms")


if __name__ == "__main__":
    main()
