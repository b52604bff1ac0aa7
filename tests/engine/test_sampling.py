"""Tests for engine/scheduling/sampling.py: each sampling option against hand-computed expectations."""

from __future__ import annotations

import math

import pytest
import torch

from engine.scheduling import sampling
from engine.scheduling.sampling import (
    SamplingParams,
    make_generator,
    penalize_logits,
    plain,
    process_logits,
    sample,
    sample_batch,
    token_logprobs,
    top_p_filter,
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


def test_top_k_keeps_the_k_highest_and_their_ties():
    logits = torch.tensor([0.1, 5.0, 3.0, 2.0, -1.0, 4.0, 2.5])
    out = process_logits(logits, SamplingParams(top_k=3), [], [])
    assert kept(out) == {1, 2, 5}
    torch.testing.assert_close(out[list(kept(out))], logits[list(kept(out))])
    assert kept(process_logits(logits, SamplingParams(top_k=0), [], [])) == set(range(7))
    tied = torch.tensor([0.1, 5.0, 3.0, 3.0, -1.0, 4.0, 3.0])  # the 3rd highest, 3.0, three times
    assert kept(process_logits(tied, SamplingParams(top_k=3), [], [])) == {1, 2, 3, 5, 6}


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


# ----- the batched path against the per-row reference ----------------------------------------------------
MIXED = [
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=5),
    SamplingParams(temperature=1.3, top_p=0.8),
    SamplingParams(temperature=0.9, min_p=0.1),
    SamplingParams(temperature=0.5, top_k=40, top_p=0.9, min_p=0.02),
    SamplingParams(temperature=0.0, top_k=3, top_p=0.5),
    SamplingParams(temperature=2.0, top_k=1),
    SamplingParams(temperature=1e-7),
]


def reference(logits: torch.Tensor, params: list[SamplingParams], uniforms: torch.Tensor) -> list[int]:
    return [sample(process_logits(row, p, [], []), p, uniform=u) for row, p, u in zip(logits, params, uniforms, strict=True)]


@pytest.mark.parametrize("vocab", [50, 1000])
def test_batch_matches_the_reference_token_for_token(vocab):
    gen = torch.Generator().manual_seed(5)
    mismatches, drawn = 0, set()
    for trial in range(40):
        logits = 3 * torch.randn(len(MIXED), vocab, generator=gen)  # (B, V)
        if trial % 2:
            logits = logits.round()  # many exact ties: top-k and top-p boundaries fall on them
        uniforms = torch.rand(len(MIXED), generator=gen)  # (B,)
        batched = sample_batch(logits, MIXED, uniforms=uniforms)
        expected = reference(logits, MIXED, uniforms)
        mismatches += batched != expected
        drawn.update(batched[1:6])
    assert mismatches == 0
    assert len(drawn) > 20  # the sampled rows really were sampled


@pytest.mark.parametrize("vocab", [50, 1000])
def test_nucleus_only_rows_draw_among_candidates_as_the_reference(monkeypatch, vocab):
    """Rows whose only filter is top-p (the embedded model's card settings) take the candidates' draw when the
    nucleus lies among them; rows where it does not, or where a tie sits at its edge, the general path:
    token for token the reference either way."""
    taken = []
    draw = sampling._draw_from_nucleus
    monkeypatch.setattr(sampling, "_draw_from_nucleus", lambda *a: taken.append(draw(*a)) or taken[-1])
    gen = torch.Generator().manual_seed(11)
    params = [SamplingParams(temperature=t, top_p=p) for t, p in ((0.2, 0.9), (1.0, 0.5), (0.7, 0.9), (1.0, 0.8))]
    mismatches, drawn = 0, set()
    for trial in range(60):
        logits = 6 * torch.randn(len(params), vocab, generator=gen)  # (B, V)
        if trial % 3 == 1:
            logits = logits.round()  # exact ties, some at the nucleus's edge
        elif trial % 3 == 2:
            logits = logits / 20  # flat: nuclei of more than 16 tokens
        uniforms = torch.rand(len(params), generator=gen)
        batched = sample_batch(logits, params, uniforms=uniforms)
        mismatches += batched != reference(logits, params, uniforms)
        drawn.update(batched)
    assert mismatches == 0
    assert len(drawn) > 30
    fast = sum(t is not None for t in taken)
    assert 10 < fast < len(taken) == 60  # both paths ran


def test_batch_of_greedy_rows_is_the_argmax():
    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(3))
    logits[2, 7] = math.nan
    params = [SamplingParams(temperature=0.0, top_p=0.3)] * 6
    expected = logits.nan_to_num(nan=-math.inf).argmax(-1).tolist()
    assert sample_batch(logits, params) == expected == reference(logits, params, torch.zeros(6))


def test_batch_rows_shuffled_keep_their_tokens():
    gen = torch.Generator().manual_seed(9)
    logits, uniforms = torch.randn(len(MIXED), 200, generator=gen), torch.rand(len(MIXED), generator=gen)
    order = torch.randperm(len(MIXED), generator=gen).tolist()
    forward = sample_batch(logits, MIXED, uniforms=uniforms)
    shuffled = sample_batch(logits[order], [MIXED[i] for i in order], uniforms=uniforms[order])
    assert shuffled == [forward[i] for i in order]


def test_batch_draws_follow_the_distribution():
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 1.0, -0.5, -1.0]]).repeat(2000, 1)  # (4000, 4)
    params = [SamplingParams(temperature=0.5), SamplingParams(temperature=1.0, top_k=2)] * 2000
    torch.manual_seed(0)
    tokens = torch.tensor(sample_batch(logits, params)).reshape(2000, 2)
    p0 = torch.softmax(torch.tensor([2.0, 0.0, 0.0, 0.0]) / 0.5, -1)[0].item()
    assert abs((tokens[:, 0] == 0).float().mean().item() - p0) < 0.03
    second = torch.softmax(torch.tensor([0.0, 1.0]), -1)  # top-2 keeps tokens 1 and 0
    assert set(tokens[:, 1].tolist()) == {0, 1}
    assert abs((tokens[:, 1] == 1).float().mean().item() - second[1].item()) < 0.03


def test_overflowed_batch_row_takes_the_best_finite_token():
    logits = torch.tensor([[1.0, 2.0, math.inf], [1.0, 3.0, 2.0]])
    params = [SamplingParams(temperature=0.5), SamplingParams(temperature=0.5, top_k=1)]
    assert sample_batch(logits, params, uniforms=torch.tensor([0.3, 0.9])) == [2, 1]
    assert reference(logits, params, torch.tensor([0.3, 0.9])) == [2, 1]


def test_plain_rows_and_the_rest():
    assert plain(SamplingParams(temperature=0.3, top_k=4, top_p=0.9, min_p=0.1, stop=("x",), max_tokens=9))
    for special in ({"seed": 1}, {"logprobs": True}, {"logit_bias": {1: 2.0}}, {"repetition_penalty": 1.1},
                    {"presence_penalty": 0.5}, {"frequency_penalty": -0.5}):
        assert not plain(SamplingParams(**special)), special
    with pytest.raises(ValueError, match="plain"):
        sample_batch(torch.zeros(1, 4), [SamplingParams(seed=3)])


@pytest.mark.parametrize("candidates", [(4,), (2, 16), (16, 256)])
def test_nucleus_among_candidates_keeps_what_the_full_sort_keeps(monkeypatch, candidates):
    """The CPU's top-p looks for the nucleus among the most probable tokens before sorting the vocabulary:
    the same kept set as top_p_filter's stable sort (ties at the edge lowest index first), whether the
    nucleus lies among the candidates or the rows fall back to the sort."""
    import engine.scheduling.sampling as sampling

    monkeypatch.setattr(sampling, "TOP_P_CANDIDATES", candidates)
    gen = torch.Generator().manual_seed(11)
    found = fallbacks = 0
    for trial in range(60):
        temperature = (0.2, 0.7, 1.5)[trial % 3]
        logits = 3 * torch.randn(4, 2000, generator=gen) / temperature  # (R, V)
        if trial % 2:
            logits = logits.round()  # ties, also at the nucleus' edge
        logits[1, :50] = -math.inf  # a row already cut by top-k
        ps = [0.5, 0.9, 0.95, 0.99][trial % 4 :] + [0.5, 0.9, 0.95, 0.99][: trial % 4]
        keep = sampling._nucleus_from_candidates(logits, torch.tensor(ps))
        found, fallbacks = found + (keep is not None), fallbacks + (keep is None)
        got = sampling._top_p_rows(logits, ps)
        for row, p in enumerate(ps):
            want = top_p_filter(logits[row], p)
            assert torch.equal(got[row].isfinite(), want.isfinite()), (trial, row)
            if keep is not None:
                assert torch.equal(keep[row] & logits[row].isfinite(), want.isfinite()), (trial, row)
    assert found > 10 and (fallbacks > 10 if candidates == (4,) else True)


def test_batch_rows_whose_settings_overflow_take_the_reference_fallback():
    """A row whose probabilities overflow (NaN logits, a tiny temperature) falls back to the best token,
    as the per-row path does, without disturbing the other rows."""
    gen = torch.Generator().manual_seed(12)
    logits = 3 * torch.randn(4, 300, generator=gen)
    logits[1, 5] = math.nan
    logits[2] *= 1e6  # over a temperature of 1e-4: inf - inf in the softmax
    params = [SamplingParams(temperature=0.8), SamplingParams(temperature=0.8), SamplingParams(temperature=1e-4),
              SamplingParams(temperature=0.8, top_p=0.9)]
    uniforms = torch.rand(4, generator=gen)
    assert sample_batch(logits, params, uniforms=uniforms) == reference(logits, params, uniforms)


def test_nucleus_edges_within_rounding_take_the_reference_sum():
    """Where a candidate's mass before it lies within rounding of p (how near depends on the CPU's vector
    width, engine/scheduling/sampling.py _edge_tolerance), the candidates defer to the sort, whose kept set
    is the reference's own; a p clear of every such mass is decided among the candidates."""
    gen = torch.Generator().manual_seed(21)
    logits = 2 * torch.randn(3, 2000, generator=gen)  # (R, V)
    top = logits.topk(16, dim=-1).values  # (R, 16)
    probs = (top - top[:, :1]).exp() / (logits - top[:, :1]).exp().sum(dim=-1, keepdim=True)
    mass_before = probs.cumsum(dim=-1) - probs  # (R, 16)
    tolerance = sampling._edge_tolerance(2000)
    on_edge = mass_before[:, 3] + tolerance / 2  # (R,)
    assert sampling._nucleus_among(logits, top, on_edge) is None
    assert sampling._nucleus_from_candidates(logits, on_edge) is None
    clear = (mass_before[:, 3] + mass_before[:, 4]) / 2  # halfway between two candidates' masses
    assert ((mass_before[:, 4] - mass_before[:, 3]) > 4 * tolerance).all()
    kept, _ = sampling._nucleus_among(logits, top, clear)
    assert kept[:, 0].tolist() == [4, 4, 4]
    got = sampling._top_p_rows(logits, on_edge.tolist())
    for row in range(3):
        want = top_p_filter(logits[row], float(on_edge[row]))
        assert torch.equal(got[row].isfinite(), want.isfinite())


def test_candidates_draw_defers_near_a_boundary_between_kept_tokens():
    """A uniform whose point falls within rounding of the boundary between two kept tokens takes the general
    path (None here); one in the middle of a token's share is drawn among the candidates, as the reference."""
    logits = torch.tensor([[4.0, 3.0, 2.5, -5.0] + [-9.0] * 60])  # (1, V): the nucleus at p 0.9 keeps 3
    ps = [0.9]
    weights = (logits[0, :3] - 4.0).exp()
    boundary = float(weights[0] / weights.sum())  # where token 0's share of the kept mass ends
    assert sampling._draw_from_nucleus(logits, ps, torch.tensor([boundary])) is None
    for u in (boundary / 2, (1 + boundary) / 2):
        uniform = torch.tensor([u])
        drawn = sampling._draw_from_nucleus(logits, ps, uniform)
        assert drawn is not None
        assert drawn == reference(logits, [SamplingParams(temperature=1.0, top_p=0.9)], uniform)
