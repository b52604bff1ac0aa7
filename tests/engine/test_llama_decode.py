"""The owned decode step (engine/model/families/llama.py) against transformers' forward, its reference: logits,
the cache slots it writes, greedy tokens across evictions, batches of rows at different lengths, rows
that are not contiguous; and its kernels (engine/model/linear.py) against a plain float matmul."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.cache.sink import SinkCache
from engine.config import EngineConfig
from engine.model import linear
from engine.model.families import llama, owned_decoder, unsupported_reason
from engine.model.families.llama import LlamaDecoder
from engine.model.kernels import int4_rows, int8_rows
from engine.model.linear import (
    PREFILL_KERNEL,
    DecodeLinear,
    candidate_kernels,
    measure,
    packed_bf16_supported,
    pick,
    row_bucket,
    row_buckets,
)
from engine.model.loader import prepare
from engine.model.runner import Runner
from tests.engine.generation import greedy_decode
from tests.tiny_models import tiny_model

COVERED = ("llama", "mistral", "qwen2")
CPU = torch.device("cpu")
INT8 = "int8-rows" if int8_rows.available() else "int8"  # the output projection's 8-bit kernel here


def runners(family: str, quantize: str | None = None, rows: int = 4):
    """Two runners over two identical caches: transformers' forward, and the owned decode step."""
    model = tiny_model(family)
    config = EngineConfig(sink_tokens=4, window=28, evict_block=4)
    loaded = prepare(model, None, "tiny", config)

    def cache():
        return SinkCache(loaded.shape, rows, config.cache_size, 4, 4, loaded.inv_freqs)

    reference = Runner(model, cache())
    owned_cache = cache()
    decoder = owned_decoder(model, owned_cache, quantize, max_rows=rows)
    assert decoder is not None
    return reference, Runner(model, owned_cache, decoder=decoder)


@pytest.mark.parametrize("family", COVERED)
def test_greedy_tokens_and_logits_match_transformers(family):
    reference, owned = runners(family)
    prompts = [[1, 5, 9, 13, 2], [7, 7, 3], [4, 8, 15, 16, 23, 42, 11]]  # rows of different lengths
    expected, expected_logits = greedy_decode(reference, prompts, steps=40)  # 40 steps: the window rolls
    got, got_logits = greedy_decode(owned, prompts, steps=40)
    assert got == expected
    torch.testing.assert_close(got_logits, expected_logits, atol=1e-4, rtol=1e-4)
    for layer in range(reference.cache.shape.num_layers):  # the same keys and values in the same slots
        for row in range(len(prompts)):
            n = reference.cache.lengths[row]
            assert owned.cache.lengths[row] == n
            torch.testing.assert_close(owned.cache.k[layer][row, :, :n], reference.cache.k[layer][row, :, :n],
                                       atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(owned.cache.v[layer][row, :, :n], reference.cache.v[layer][row, :, :n],
                                       atol=1e-4, rtol=1e-4)


def test_one_row_matches_transformers():
    reference, owned = runners("llama", rows=1)
    expected, expected_logits = greedy_decode(reference, [[1, 5, 9, 13, 2]], steps=40)
    got, got_logits = greedy_decode(owned, [[1, 5, 9, 13, 2]], steps=40)
    assert got == expected
    torch.testing.assert_close(got_logits, expected_logits, atol=1e-4, rtol=1e-4)


def test_rows_that_are_not_contiguous():
    reference, owned = runners("llama")
    for runner in (reference, owned):
        for row, prompt in ((0, [3, 1, 4, 1, 5]), (2, [9, 2, 6]), (3, [5, 3, 5, 8, 9, 7, 9])):
            runner.prefill(row, prompt, 16)
    rows, tokens = [3, 0, 2], [11, 12, 13]
    expected = reference.decode(rows, tokens)
    got = owned.decode(rows, tokens)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    for row in rows:
        n = reference.cache.lengths[row]
        assert owned.cache.lengths[row] == n
        torch.testing.assert_close(owned.cache.k[1][row, :, :n], reference.cache.k[1][row, :, :n], atol=1e-4, rtol=1e-4)
    assert owned.cache.lengths[1] == 0  # the row in between was not touched


def test_int4_kernels_stay_close_to_the_float_reference():
    reference, owned = runners("llama", quantize="int4")
    prompts = [[1, 5, 9, 13, 2], [7, 7, 3]]
    _, expected = greedy_decode(reference, prompts, steps=3)
    _, got = greedy_decode(owned, prompts, steps=3)
    assert got.shape == expected.shape
    # 4-bit layers and an 8-bit or bf16 output projection on a random model whose weights are scaled up
    # (tests/tiny_models.py): errors of ~20% of the largest logit; a miswired kernel (wrong scales, codes or
    # layout) gives logits unrelated to the reference (errors of the logits' own size). The embedded model's
    # quality under these kernels is measured by perplexity (scripts/ppl_output_kernels.py, docs/perplexity.md).
    assert (got - expected).abs().max() < 0.35 * expected.abs().max()


def test_a_failed_step_leaves_the_rows_as_they_were():
    _, owned = runners("llama")
    owned.prefill(0, [1, 2, 3], 16)
    before = (owned.cache.lengths[0], owned.cache.k[0][0].clone())
    with pytest.raises(IndexError):
        owned.decode([0], [10_000])  # no such token
    assert owned.cache.lengths[0] == before[0]
    torch.testing.assert_close(owned.cache.k[0][0], before[1])


@pytest.mark.parametrize("family", ["olmo", "gemma"])
def test_other_families_keep_transformers_forward(family):
    model = tiny_model(family)
    assert unsupported_reason(model, None)
    config = EngineConfig(sink_tokens=4, window=28, evict_block=4)
    loaded = prepare(model, None, "tiny", config)
    cache = SinkCache(loaded.shape, 1, config.cache_size, 4, 4, loaded.inv_freqs)
    assert owned_decoder(model, cache, None, 1) is None
    with pytest.raises(ValueError, match="does not cover"):
        LlamaDecoder(model, cache)


def test_int8_modules_keep_transformers_forward():
    assert "quantize" in unsupported_reason(tiny_model("llama"), "int8")


# ----- kernels -------------------------------------------------------------------------------------------
def test_every_kernel_computes_the_same_product():
    torch.manual_seed(0)
    weight, bias = torch.randn(96, 64), torch.randn(96)
    kernels = {"float32": 1e-5, "packed": 1e-4, "bf16": 0.05, "int8": 0.05, "int4": 0.2}
    if packed_bf16_supported():  # oneDNN's native bf16 (AVX-512 BF16 / AMX); absent on AVX2-only CPUs
        kernels["bf16-packed"] = 0.05
    if int4_rows.available():  # our 4-bit kernels, where a C compiler builds them (tests/engine/test_int4_rows.py)
        kernels["int4-rows"] = 0.2
    if int4_rows.amx_available():
        kernels["int4-amx"] = 0.2
    if int8_rows.available():  # tests/engine/test_int8_rows.py
        kernels["int8-rows"] = 0.05
    linear = DecodeLinear(weight, bias, tuple(kernels))
    assert set(linear.weights) == set(kernels)
    for rows in (1, 3, 8, 16):
        x = torch.randn(rows, 64)
        expected = F.linear(x, weight, bias)
        for kind, tolerance in kernels.items():
            got = linear.run(kind, x)
            assert (got - expected).abs().max() <= tolerance * expected.abs().max(), kind
            linear.choice = {row_bucket(rows): kind}  # the decode step's bound callable: the same
            torch.testing.assert_close(linear.kernel(rows)(x), got, atol=0, rtol=0)
            torch.testing.assert_close(linear(x), got, atol=0, rtol=0)


def test_tuning_keeps_one_kernel_per_bucket_and_drops_the_rest():
    torch.manual_seed(0)
    layers = [DecodeLinear(torch.randn(64, 64), None, ("float32", "packed", "bf16")) for _ in range(3)]
    choice = measure(layers, row_buckets(5))
    for layer in layers:
        layer.keep(choice)
    assert sorted(choice) == [1, 2, 4, 8]
    for layer in layers:
        assert layer.choice == choice
        assert set(layer.weights) == set(choice.values())
        x = torch.randn(5, 64)  # 5 rows use the 8-row bucket's kernel
        assert layer(x).shape == (5, 64)


def test_near_ties_go_to_the_smaller_weights():
    weight = torch.randn(64, 64)
    layer = DecodeLinear(weight, None, ("float32", "bf16", "int4"))
    sizes = {kind: layer.weight_bytes(kind) for kind in layer.weights}
    assert sizes["int4"] < sizes["bf16"] < sizes["float32"]
    assert pick({"float32": 1.0, "bf16": 1.05, "int4": 1.08}, sizes) == "int4"
    assert pick({"float32": 1.0, "bf16": 1.05, "int4": 1.5}, sizes) == "bf16"
    assert pick({"float32": 1.0, "bf16": 1.5, "int4": 1.5}, sizes) == "float32"


def _int4_decoder(rows: int = 4) -> tuple[LlamaDecoder, SinkCache]:
    model = tiny_model("llama")
    config = EngineConfig(sink_tokens=4, window=28, evict_block=4)
    loaded = prepare(model, None, "tiny", config)
    cache = SinkCache(loaded.shape, rows, config.cache_size, 4, 4, loaded.inv_freqs)
    return LlamaDecoder(model, cache, "int4"), cache


@pytest.mark.parametrize("native_bf16", [True, False], ids=["native-bf16", "no-native-bf16"])
def test_whole_steps_overrule_shapes_timed_alone(monkeypatch, native_bf16):
    """Where the kernels chosen shape by shape read more bytes than others, whole steps decide: the fastest
    of the choice, its layers on their fewest-bytes kernels, and everything on those; near ties (3%) go
    to the fewer bytes. Both sides of the native-bf16 detection run on any CPU: with it the bf16 copy is
    the packed one and stays for prompts; without it (AVX2-only CPUs) plain bf16, and no prefill copy."""
    monkeypatch.setattr(linear, "packed_bf16_supported", lambda: native_bf16)
    if native_bf16 and not packed_bf16_supported():  # oneDNN refuses to pack bf16 here: a plain copy stands
        prepare_copy = linear._prepare  # in for it (the same bytes; the steps' times are faked below)
        monkeypatch.setattr(linear, "_prepare", lambda kind, weight, codes: prepare_copy(
            "bf16" if kind == "bf16-packed" else kind, weight, codes))
    big = "bf16-packed" if native_bf16 else "bf16"
    prefill_copy = {PREFILL_KERNEL} if native_bf16 else set()
    alone = {1: big, 2: big, 4: big}  # as if every shape, timed alone, had chosen the bf16 copy
    monkeypatch.setattr(llama, "measure", lambda layers, buckets: dict(alone))
    cases = {  # step ms of [choice, layers lean, all lean] -> the kept layers' and head's kernels
        (10.0, 8.0, 9.0): ("int4", big),
        (10.0, 12.0, 12.0): (big, big),
        (10.0, 10.2, 10.1): ("int4", INT8),
        (10.0, 11.0, 8.0): ("int4", INT8),
    }
    for times, (layers_kind, head_kind) in cases.items():
        decoder, _ = _int4_decoder()
        seen = []

        def step_ms(bucket, variants, times=times, seen=seen):
            seen.append([dict(v) for v in variants])
            return list(times)

        monkeypatch.setattr(decoder, "_step_ms", step_ms)
        choices = decoder.tune(4)
        assert len(seen) == 3  # buckets 1, 2, 4
        assert seen[0][0]["qkv"] == big and seen[0][1]["qkv"] == "int4" and seen[0][1]["head"] == big
        assert seen[0][2] == {"qkv": "int4", "out": "int4", "gate_up": "int4", "down": "int4", "head": INT8}
        for name in ("qkv", "out", "gate_up", "down"):
            assert choices[name] == {1: layers_kind, 2: layers_kind, 4: layers_kind}, (times, name)
            assert getattr(decoder.layers[0], name).choice == choices[name]
        assert choices["head"] == {1: head_kind, 2: head_kind, 4: head_kind}, times
        # the losers' copies are dropped, the prefill kernel's stay
        assert set(decoder.layers[0].qkv.weights) == {layers_kind} | prefill_copy
        assert decoder.prefills == native_bf16
        assert set(decoder.head.weights) == {head_kind} | prefill_copy


@pytest.mark.skipif(not int4_rows.available(), reason="no C compiler for the int4-rows kernel")
def test_whole_steps_settle_which_4_bit_kernel(monkeypatch):
    """The 4-bit kernels read the same bytes, so the fewest-bytes variants cannot tell them apart: the
    choice is also timed with its 4-bit layers all on PyTorch's kernel and all on each of ours."""
    decoder, _ = _int4_decoder()
    if "int4-rows" not in decoder.layers[0].qkv.weights:
        pytest.skip("the tiny model's projections are not in blocks of 32 outputs")
    mixed = {"qkv": "int4-rows", "out": "int4", "gate_up": "int4-rows", "down": "int4-rows", "head": INT8}
    monkeypatch.setattr(llama, "measure", lambda layers, buckets: {b: mixed[_name(decoder, layers)] for b in buckets})
    seen = []

    def step_ms(bucket, variants):
        seen.append([dict(v) for v in variants])
        return [{"int4": 12.0, "int4-rows": 9.0, "int4-amx": 10.0}[v["qkv"]] + (v["out"] == "int4") for v in variants]

    monkeypatch.setattr(decoder, "_step_ms", step_ms)
    choices = decoder.tune(4)
    layers = ("qkv", "out", "gate_up", "down")
    assert {name: "int4" for name in layers} | {"head": INT8} in seen[0]
    assert {name: "int4-rows" for name in layers} | {"head": INT8} in seen[0]
    if int4_rows.amx_available():
        assert {name: "int4-amx" for name in layers} | {"head": INT8} in seen[0]
    for name in layers:  # the fastest variant: every layer on ours
        assert choices[name] == {1: "int4-rows", 2: "int4-rows", 4: "int4-rows"}
    assert set(decoder.layers[0].qkv.weights) == {"int4-rows"} | ({PREFILL_KERNEL} & set(decoder.layers[0].qkv.weights))


def _name(decoder: LlamaDecoder, layers: list) -> str:
    """Which projection (or the head) a group of layers passed to measure is."""
    return next(name for name, group in decoder.projections().items() if group[0] is layers[0])


def test_assigned_kernels_run_at_every_given_bucket_and_must_be_held():
    decoder, _ = _int4_decoder()
    decoder.tune(4)
    kept = decoder.layers[0].qkv.choice[1]
    decoder.assign({"qkv": kept}, (1, 2, 4))
    assert all(layer.qkv.choice == {1: kept, 2: kept, 4: kept} for layer in decoder.layers)
    with pytest.raises(ValueError, match="holds no"):  # never a candidate for the output projection
        decoder.assign({"head": "int4"}, (1,))


def test_whole_step_timing_never_touches_the_cache():
    decoder, cache = _int4_decoder(rows=2)
    for layer in range(cache.shape.num_layers):
        cache.k[layer].normal_()
        cache.v[layer].normal_()
    before = [t.clone() for t in (*cache.k, *cache.v)]
    groups = decoder.projections()
    variants = [{name: "int4" for name in groups} | {"head": INT8},
                {name: kind for name, kind in zip(groups, ("int4",) * 4 + ("float32",), strict=True)}]
    times = decoder._step_ms(2, variants)
    assert len(times) == 2 and all(t > 0 for t in times)
    for got, expected in zip((*cache.k, *cache.v), before, strict=True):
        assert torch.equal(got, expected)


def test_candidates():
    assert candidate_kernels(CPU, torch.float32, None, output=False) == ("float32", "packed")
    assert "int4" not in candidate_kernels(CPU, torch.float32, "int4", output=True)  # output projection
    assert "int4" in candidate_kernels(CPU, torch.float32, "int4", output=False)
    assert candidate_kernels(CPU, torch.bfloat16, "int4", output=False) == ("native",)
    for output in (False, True):  # the packed bf16 copy is offered exactly where oneDNN runs bf16 natively
        assert ("bf16-packed" in candidate_kernels(CPU, torch.float32, "int4", output)) == packed_bf16_supported()
    assert candidate_kernels(torch.device("cuda"), torch.bfloat16, None, output=False) == ("native",)


# ----- prefill ----------------------------------------------------------------------------------------------
needs_packed_bf16 = pytest.mark.skipif(not packed_bf16_supported(),
                                       reason="oneDNN has no native bf16 on this CPU: prompts run through transformers")


@needs_packed_bf16
@pytest.mark.parametrize("family", COVERED)
def test_prefill_matches_transformers_within_bf16(family):
    """Prompt chunks through the owned step (its bf16 copy of the layers) against transformers' float32
    forward: the logits of every token and the keys/values in every slot, over three chunks of which the
    last makes the row evict (its tokens then see the sinks, the shifted window and each other)."""
    reference, owned = runners(family, quantize="int4", rows=2)
    assert owned.decoder.prefills
    tokens = torch.randint(0, 96, (1, 54), generator=torch.Generator().manual_seed(2))
    for part in (tokens[:, :13], tokens[:, 13:30], tokens[:, 30:]):
        want = reference.forward([1], part, all_logits=True)[0]
        got = owned.forward([1], part, all_logits=True)[0]
        assert got.shape == want.shape
        # bf16 weights and activations on a random model whose weights are scaled up: a few % of the
        # largest logit; a miswired mask, rotation or slot gives errors of the logits' own size
        assert (got - want).abs().max() < 0.06 * want.abs().max(), (got - want).abs().max() / want.abs().max()
    assert owned.cache.evicted[1] == reference.cache.evicted[1] > 0
    n = reference.cache.lengths[1]
    assert owned.cache.lengths[1] == n
    for layer in range(reference.cache.shape.num_layers):
        for mine, theirs in ((owned.cache.k, reference.cache.k), (owned.cache.v, reference.cache.v)):
            want = theirs[layer][1, :, :n]
            assert (mine[layer][1, :, :n] - want).abs().max() < 0.06 * want.abs().max()


@needs_packed_bf16
def test_prefill_then_decode_continues_the_reference():
    """A prompt prefilled by the owned step, then decoded by it, gives the reference's greedy tokens
    (transformers' float32 prefill and the owned decode step), and the last-token logits of a prefill are
    those of the all-token logits."""
    reference, owned = runners("llama", quantize="int4", rows=1)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]
    last = owned.prefill(0, prompt, 16)
    owned.cache.reset(0)
    every = owned.forward([0], torch.tensor([prompt]), all_logits=True)[0]
    torch.testing.assert_close(last, every[-1])
    want = reference.prefill(0, prompt, 16)
    assert (last - want).abs().max() < 0.06 * want.abs().max()


def test_float_models_prefill_through_transformers():
    """Without a bf16 copy of the layers (a float model, no quantization) prompts keep transformers'
    float32 forward: the owned step only decodes."""
    reference, owned = runners("llama")
    assert not owned.decoder.prefills
    prompt = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    torch.testing.assert_close(owned.forward([0], prompt, all_logits=True),
                               reference.forward([0], prompt, all_logits=True), atol=0, rtol=0)


@needs_packed_bf16
def test_released_transformers_layers_change_nothing_the_owned_step_runs():
    """Once the owned step prefills and decodes, transformers' layer weights can go (Engine drops them
    for a model it loaded itself): a prompt and its decode steps give exactly what they gave before, and a
    pass that would need transformers' forward fails loudly instead of running on missing weights."""
    _, runner = runners("llama", quantize="int4", rows=2)  # one runner: the same tuned kernels throughout

    def conversation() -> list[torch.Tensor]:
        runner.cache.reset(0)
        logits = [runner.prefill(0, [3, 1, 4, 1, 5, 9, 2, 6], 16)]
        for _ in range(5):
            logits.append(runner.decode([0], [int(logits[-1].argmax(-1).reshape(-1)[0])])[0])
        return logits

    before = conversation()
    weights = sum(p.numel() * p.element_size() for layer in runner.model.model.layers for p in layer.parameters())
    freed = runner.release_transformers_layers()
    assert 0 < freed < weights and runner.release_transformers_layers() == 0
    for want, got in zip(before, conversation(), strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    length = runner.cache.lengths[0]
    with pytest.raises(RuntimeError, match="released"):
        runner.forward([0, 1], torch.tensor([[1, 2], [3, 4]]))
    assert runner.cache.lengths[0] == length  # the failed pass left the rows as they were


@needs_packed_bf16
def test_several_rows_prefill_in_one_pass_as_they_do_alone():
    """Prompt chunks of three rows in one pass (one of them evicting to fit its chunk) against each row
    prefilled alone: the same last-token logits and the same keys and values in every slot."""
    _, runner = runners("llama", quantize="int4", rows=3)  # one runner: the same kernels for both
    tokens = torch.randint(0, 96, (3, 40), generator=torch.Generator().manual_seed(4))
    first = [tokens[0, :25].tolist(), tokens[1, :5].tolist(), tokens[2, :12].tolist()]
    then = [tokens[0, 25:35].tolist(), tokens[1, 5:28].tolist(), tokens[2, 12:13].tolist()]

    def run(together: bool):
        for row in range(3):
            runner.cache.reset(row)
            runner.prefill(row, first[row], 32)
        if together:
            logits = runner.prefill_rows([0, 1, 2], then)
        else:
            logits = torch.stack([runner.prefill(row, then[row], 32) for row in range(3)])
        rows = [[buf[row, :, : runner.cache.lengths[row]].clone() for buf in runner.cache.k + runner.cache.v]
                for row in range(3)]
        return logits, rows, list(runner.cache.evicted)

    alone, together = run(False), run(True)
    assert together[2] == alone[2] and alone[2][0] > 0  # row 0 (25 + 10 tokens in 32 slots) evicted
    torch.testing.assert_close(together[0], alone[0], atol=1e-4, rtol=1e-4)
    for mine, theirs in zip(together[1], alone[1], strict=True):
        for a, b in zip(mine, theirs, strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@needs_packed_bf16
def test_a_failed_shared_prefill_leaves_every_row_as_it_was():
    _, runner = runners("llama", quantize="int4", rows=3)
    for row in range(3):
        runner.prefill(row, [1, 2, 3, 4], 16)
    before = [(runner.cache.lengths[r], runner.cache.k[0][r].clone()) for r in range(3)]
    with pytest.raises(IndexError):
        runner.prefill_rows([0, 1, 2], [[5, 6], [10_000], [7]])  # no such token in row 1's chunk
    for row, (length, keys) in enumerate(before):
        assert runner.cache.lengths[row] == length
        torch.testing.assert_close(runner.cache.k[0][row], keys, atol=0, rtol=0)
