"""Tests for engine/sampling.py: each sampling option against hand-computed expectations."""

from __future__ import annotations

import math

import pytest
import torch

from engine.sampling import (
    SamplingParams,
    make_generator,
    penalize_logits,
    process_logits,
    sample,
    token_logprobs,
)

V = 16


def kept(logits: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(logits)).flatten().tolist())


def draws(logits: torch.Tensor, params: SamplingParams, n: int) -> torch.Tensor:
    gen = make_generator(params, "cpu")
    processed = process_logits(logits, params, [], [])
    return torch.tensor([sample(processed, params, gen) for _ in range(n)])


def test_greedy_is_argmax():
    logits = torch.randn(V, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=0.0, top_k=3, top_p=0.5)
    assert sample(process_logits(logits, params, [], []), params, None) == int(logits.argmax())


def test_temperature_changes_distribution():
    logits = torch.tensor([2.0, 0.0, 0.0, 0.0])
    n = 4000
    freq = {}
    for t in (0.5, 1.0, 2.0):
        params = SamplingParams(temperature=t, seed=123)
        freq[t] = (draws(logits, params, n) == 0).float().mean().item()
        expected = torch.softmax(logits / t, dim=-1)[0].item()
        assert abs(freq[t] - expected) < 0.03, (t, freq[t], expected)
    assert freq[0.5] > freq[1.0] > freq[2.0]


def test_temperature_scales_logits():
    logits = torch.tensor([1.0, -2.0, 4.0])
    out = process_logits(logits, SamplingParams(temperature=0.5), [], [])
    torch.testing.assert_close(out, logits * 2)


def test_top_k_keeps_exactly_k():
    logits = torch.tensor([0.1, 5.0, 3.0, 3.0, -1.0, 4.0, 3.0])
    out = process_logits(logits, SamplingParams(top_k=3), [], [])
    assert len(kept(out)) == 3
    assert {1, 5} <= kept(out)
    torch.testing.assert_close(out[list(kept(out))], logits[list(kept(out))])
    assert kept(process_logits(logits, SamplingParams(top_k=0), [], [])) == set(range(7))


def test_top_p_keeps_smallest_set_with_mass():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    assert kept(process_logits(logits, SamplingParams(top_p=0.49), [], [])) == {0}
    assert kept(process_logits(logits, SamplingParams(top_p=0.51), [], [])) == {0, 1}
    assert kept(process_logits(logits, SamplingParams(top_p=0.79), [], [])) == {0, 1}
    assert kept(process_logits(logits, SamplingParams(top_p=0.81), [], [])) == {0, 1, 2}
    assert kept(process_logits(logits, SamplingParams(top_p=1.0), [], [])) == {0, 1, 2, 3}
    shuffled = logits[torch.tensor([2, 0, 3, 1])]
    assert kept(process_logits(shuffled, SamplingParams(top_p=0.7), [], [])) == {1, 3}


def test_min_p_drops_below_threshold():
    probs = torch.tensor([0.5, 0.26, 0.24, 0.0])
    logits = (probs + 1e-9).log()
    assert kept(process_logits(logits, SamplingParams(min_p=0.5), [], [])) == {0, 1}
    assert kept(process_logits(logits, SamplingParams(min_p=0.4), [], [])) == {0, 1, 2}
    assert kept(process_logits(logits, SamplingParams(min_p=1.0), [], [])) == {0}


def test_repetition_penalty_positive_and_negative():
    logits = torch.tensor([2.0, -2.0, 2.0, -2.0, 0.5])
    out = process_logits(logits, SamplingParams(repetition_penalty=2.0), [0, 1, 1], [])
    torch.testing.assert_close(out, torch.tensor([1.0, -4.0, 2.0, -2.0, 0.5]))
    assert out[0] < logits[0] and out[1] < logits[1]


def test_repetition_penalty_accepts_tensor_context():
    logits = torch.tensor([2.0, -2.0, 2.0])
    out = process_logits(logits, SamplingParams(repetition_penalty=4.0), torch.tensor([2, 2]), [])
    torch.testing.assert_close(out, torch.tensor([2.0, -2.0, 0.5]))


def test_presence_and_frequency_exact():
    logits = torch.zeros(5)
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    out = process_logits(logits, params, [4, 4, 4, 4], [1, 1, 1, 3])
    torch.testing.assert_close(out, torch.tensor([0.0, -1.25, 0.0, -0.75, 0.0]))
    neg = process_logits(logits, SamplingParams(presence_penalty=-1.0), [], [2])
    torch.testing.assert_close(neg, torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0]))


def test_logit_bias_forces_and_bans():
    logits = torch.randn(V, generator=torch.Generator().manual_seed(1))
    forced = SamplingParams(logit_bias={7: 100.0}, seed=0)
    assert set(draws(logits, forced, 50).tolist()) == {7}
    top = int(logits.argmax())
    banned = SamplingParams(temperature=0.0, logit_bias={top: -100.0})
    assert sample(process_logits(logits, banned, [], []), banned, None) != top
    clamped = process_logits(torch.zeros(3), SamplingParams(logit_bias={1: 500.0, 2: -0.5}), [], [])
    torch.testing.assert_close(clamped, torch.tensor([0.0, 100.0, -0.5]))
    with pytest.raises(ValueError, match="logit_bias"):
        process_logits(torch.zeros(3), SamplingParams(logit_bias={3: 1.0}), [], [])


def test_seed_reproducible_and_distinct():
    logits = torch.zeros(1000)
    a = draws(logits, SamplingParams(seed=42), 20)
    b = draws(logits, SamplingParams(seed=42), 20)
    c = draws(logits, SamplingParams(seed=43), 20)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert make_generator(SamplingParams(), "cpu") is None


def test_process_logits_does_not_modify_input_and_returns_float32():
    logits = torch.randn(V, dtype=torch.bfloat16)
    before = logits.clone()
    params = SamplingParams(
        temperature=0.7, top_k=5, top_p=0.9, min_p=0.05, repetition_penalty=1.3,
        presence_penalty=0.4, frequency_penalty=0.2, logit_bias={0: 3.0},
    )
    out = process_logits(logits, params, [1, 2, 3], [2, 3, 3])
    assert out.dtype == torch.float32
    assert torch.equal(logits, before)
    f32 = torch.randn(V)
    f32_before = f32.clone()
    penalize_logits(f32, params, [1, 2], [2])
    assert torch.equal(f32, f32_before)


def test_token_logprobs_match_log_softmax():
    logits = torch.randn(V, generator=torch.Generator().manual_seed(2))
    ref = torch.log_softmax(logits, dim=-1)
    chosen, top = token_logprobs(logits, 3, 5)
    assert math.isclose(chosen, ref[3].item(), rel_tol=1e-6)
    assert len(top) == 5
    values = [lp for _, lp in top]
    assert values == sorted(values, reverse=True)
    expected_ids = ref.argsort(descending=True)[:5].tolist()
    assert [i for i, _ in top] == expected_ids
    for i, lp in top:
        assert math.isclose(lp, ref[i].item(), rel_tol=1e-6)
    assert token_logprobs(logits, 0, 0)[1] == []


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": 1.1}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": -1}, "top_logprobs"),
        ({"stop": ("a", "b", "c", "d", "e")}, "stop"),
        ({"stop": ("",)}, "stop"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias"),
        ({"frequency_penalty": math.inf}, "frequency_penalty"),
    ],
)
def test_validation_errors(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_valid_params_and_stop_coercion():
    p = SamplingParams(temperature=0, top_p=1.0, min_p=1.0, top_logprobs=20, stop=["a", "b"])
    assert p.stop == ("a", "b")
    assert SamplingParams(stop="x").stop == ("x",)


def test_tiny_temperature_is_greedy_not_nan():
    logits = torch.tensor([0.5, 3.0, -1.0, 2.9])
    params = SamplingParams(temperature=1e-30)
    assert sample(process_logits(logits, params, [], []), params, torch.Generator().manual_seed(0)) == 1


def test_overflowing_penalties_fall_back_to_the_best_finite_token():
    logits = torch.tensor([1.0, 2.0, 3.0])
    params = SamplingParams(temperature=0.5, frequency_penalty=1e38, presence_penalty=1e38)
    token = sample(process_logits(logits, params, [2, 2, 2], [2, 2, 2]), params, torch.Generator().manual_seed(0))
    assert token in (0, 1)
