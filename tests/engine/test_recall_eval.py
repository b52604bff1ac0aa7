"""``eval recall``'s pieces that need no model: the cases, the answer check, the scores and the command line."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

from engine.evaluate.cli import _fill_eval_parser
from engine.evaluate.recall import answer_loglik, answered, make_case, summarize


class _Letters:
    """A stand-in tokenizer: one token per character."""

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_a_case_puts_the_passkey_after_the_prefix_and_depth_tokens_before_the_question():
    tok = _Letters()
    text = list(range(1000, 4000))
    case = make_case(tok, text, seed=3, depth=500, prefix=200)
    needle = tok.decode(case["context"][200:]).split(".")[0]
    assert needle == f" The pass key is {case['key']}"
    assert len(case["context"]) == 200 + len(tok.encode(f" The pass key is {case['key']}. Remember it.")) + 500
    assert tok.decode(case["answer"]) == " " + case["key"] and len(case["key"]) == 5
    assert make_case(tok, text, seed=3, depth=500)["key"] == case["key"]  # seeded
    assert make_case(tok, text, seed=4, depth=500)["context"] != case["context"]


def test_the_answer_is_the_first_number_generated():
    tok = _Letters()
    assert answered(tok, tok.encode(" 12345.\n"), "12345") == (True, " 12345.\n")
    assert not answered(tok, tok.encode(" 1234 and 12345"), "12345")[0]
    assert not answered(tok, tok.encode(" mine."), "12345")[0]


def test_the_answer_loglik_sums_the_teacher_forced_log_probabilities():
    first = torch.tensor([0.0, 2.0, 0.0])
    later = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    expected = (torch.log_softmax(first, -1)[1] + torch.log_softmax(later[0], -1)[0]
                + torch.log_softmax(later[1], -1)[2])
    assert math.isclose(answer_loglik(first, later, [1, 0, 2]), float(expected), rel_tol=1e-6)


def test_the_summary_reports_the_share_of_the_gap_closed():
    cases = [{m: {"loglik": v, "exact": e} for m, v, e in (("dense", -1.0, True), ("sink", -21.0, False),
                                                              ("recall", -5.0, True))}] * 2
    summary = summarize(cases, ["dense", "sink", "recall"])
    assert summary["gap_closed"] == pytest.approx(0.8)
    assert summary["recall"]["exact"] == 2 and summary["sink"]["exact"] == 0


def test_the_recall_command_line():
    parser = argparse.ArgumentParser()
    _fill_eval_parser(parser)
    args = parser.parse_args(["recall", "--depths", "1500,3000", "--recall-blocks", "2", "--ppl-tokens", "0"])
    assert (args.depths, args.recall_blocks, args.ppl_tokens, args.score) == ([1500, 3000], 2, 0, "attention")
    with pytest.raises(SystemExit):
        parser.parse_args(["recall", "--depths", "a,b"])


def test_reports_of_one_configuration_merge_and_of_two_do_not(tmp_path):
    import json

    from engine.evaluate.recall import merge_reports

    def report(name, seed, window=252):
        case = {"seed": seed, "depth": 300, "key": "12345", "tokens": 600,
                **{m: {"loglik": v, "exact": m != "sink"} for m, v in (("dense", -1.0), ("sink", -20.0), ("recall", -2.0))}}
        data = {"model": "m", "dtype": "float32", "sink_tokens": 4, "window": window, "evict_block": 32, "chunk": 64,
                "blocks": 2, "score": "attention", "extra": False, "modes": ["dense", "sink", "recall"],
                "cases": [case], "machine": "test"}
        (tmp_path / name).mkdir()
        (tmp_path / name / "recall.json").write_text(json.dumps(data))
        return tmp_path / name / "recall.json"

    merged = merge_reports([report("a", 1), report("b", 0)], tmp_path / "out")
    assert [c["seed"] for c in merged["cases"]] == [0, 1]
    assert merged["summary"]["gap_closed"] == pytest.approx(18 / 19)
    assert (tmp_path / "out" / "recall.md").read_text().count("| 300 |") == 2
    with pytest.raises(ValueError):
        merge_reports([report("c", 2), report("d", 3, window=508)], tmp_path / "out2")
