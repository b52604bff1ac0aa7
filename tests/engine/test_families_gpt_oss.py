"""The owned decode step of gpt-oss (engine/model/families/gpt_oss.py) against transformers' eager attention with
learned sinks: its attention alone, logits, cache slots and greedy tokens across evictions, the cache's pinned
slots on top of the learned sinks, sliding layers that never see past their window, the float64 reference
cache, and a 12-turn conversation past the window on the owned step."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

from engine.cache.sink import SinkCache
from engine.config import EngineConfig
from engine.model.families import owned_decoder, unsupported_reason
from engine.model.families.gpt_oss import GptOssDecoder
from engine.model.loader import prepare
from engine.model.runner import Runner
from tests.engine.generation import greedy_decode, reply
from tests.engine.test_families_gemma import HybridReferenceCache, sdk_conversation
from tests.engine.test_sliding import WINDOW, assert_sliding_layers_see_only_their_window
from tests.tiny_models import tiny_family_engine, tiny_model

FAMILIES = ("gpt_oss", "gpt_oss_sliding")


def runners(model, rows: int = 4, sinks: int = 4, window: int = 60, block: int = 8):
    """Two runners over two identical caches: transformers' forward, and the owned decode step."""
    config = EngineConfig(sink_tokens=sinks, window=window, evict_block=block)
    loaded = prepare(model, None, "tiny", config)

    def cache():
        return SinkCache(loaded.shape, rows, config.cache_size, sinks, block, loaded.inv_freqs)

    owned_cache = cache()
    decoder = owned_decoder(model, owned_cache, None, max_rows=rows)
    assert isinstance(decoder, GptOssDecoder)
    return Runner(model, cache()), Runner(model, owned_cache, decoder=decoder)


def test_attention_equals_transformers_eager_attention_with_sinks():
    """The step's attention alone against transformers' ``eager_attention_forward`` of gpt-oss: grouped
    heads, a mask hiding some slots of some rows, learned sinks large enough to take most of the weight."""
    model = tiny_model("gpt_oss")
    decoder = GptOssDecoder(model, runners(model, rows=1)[1].cache)
    attention = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, S, D = 3, 4, 2, 20, 16
    q, keys, values = torch.randn(B, H, D, generator=g), torch.randn(B, Hkv, S, D, generator=g), torch.randn(B, Hkv, S, D, generator=g)
    visible = torch.rand(B, 1, 1, S, generator=g) > 0.3
    visible[..., -1] = True  # each query sees itself
    mask = torch.zeros(visible.shape).masked_fill(~visible, float("-inf"))
    for sinks in (attention.sinks.detach(), torch.full((H,), 6.0), torch.full((H,), -30.0)):
        with torch.no_grad():
            attention.sinks.copy_(sinks)
        want, _ = eager_attention_forward(attention, q[:, :, None], keys, values, mask, scaling=attention.scaling)
        got = decoder._attend(q, keys, values, sinks, mask)
        torch.testing.assert_close(got, want.reshape(B, H * D), atol=1e-6, rtol=1e-5)
    plain = torch.softmax((q.view(B, Hkv, 2, D) @ keys.transpose(-1, -2)) * D**-0.5 + mask, -1) @ values
    torch.testing.assert_close(got, plain.reshape(B, H * D), atol=1e-6, rtol=1e-5)  # a sink of -30: no share
    assert not torch.allclose(decoder._attend(q, keys, values, torch.full((H,), 6.0), mask), got)


@pytest.mark.parametrize("window", [60, 28])
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_logits_and_slots_match_transformers(family, window):
    reference, owned = runners(tiny_model(family), window=window)
    prompts = [[1, 5, 9, 13, 2], [7, 7, 3], [4, 8, 15, 16, 23, 42, 11]]  # rows of different lengths
    expected, expected_logits = greedy_decode(reference, prompts, steps=90)  # the window rolls
    got, got_logits = greedy_decode(owned, prompts, steps=90)
    assert min(reference.cache.evicted[:3]) > 0
    assert got == expected
    assert expected_logits.abs().max() > 1.0
    torch.testing.assert_close(got_logits, expected_logits, atol=1e-4, rtol=1e-4)
    for layer in range(reference.cache.shape.num_layers):
        for row in range(len(prompts)):
            n = reference.cache.lengths[row]
            assert owned.cache.lengths[row] == n
            for mine, theirs in ((owned.cache.k, reference.cache.k), (owned.cache.v, reference.cache.v)):
                torch.testing.assert_close(mine[layer][row, :, :n], theirs[layer][row, :, :n], atol=1e-4, rtol=1e-4)


def test_pinned_slots_stay_on_top_of_the_learned_sinks():
    """The cache's pinned slots add to the model's learned sinks, never replace them: with 4 pinned slots,
    with none (a window only) and with a pinned 10-token prefix, the owned step gives transformers' logits
    at every step; pinning changes what the full layers see once the row evicts, and the learned sinks
    still count (setting them very low changes the logits)."""
    model = tiny_model("gpt_oss_sliding")
    stream = torch.randint(0, 96, (100,), generator=torch.Generator().manual_seed(3)).tolist()
    outcomes = {}
    for sinks, pinned in ((4, 4), (0, 0), (4, 10)):
        reference, owned = runners(model, rows=1, sinks=sinks, window=64 - sinks)
        logits = []
        for runner in (reference, owned):
            runner.cache.reset(0, pinned)
            runner.prefill(0, stream[:12], 16)
            logits.append(torch.stack([runner.decode([0], [t])[0] for t in stream[12:]]))
        assert owned.cache.evicted[0] == reference.cache.evicted[0] > 0
        assert owned.cache.pinned[0] == pinned
        torch.testing.assert_close(logits[1], logits[0], atol=1e-4, rtol=1e-4)
        outcomes[pinned] = logits[1]
    assert not torch.allclose(outcomes[4][-1], outcomes[0][-1], atol=1e-3)
    assert not torch.allclose(outcomes[10][-1], outcomes[4][-1], atol=1e-3)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.fill_(-30.0)
    _, owned = runners(model, rows=1)
    owned.prefill(0, stream[:12], 16)
    without = torch.stack([owned.decode([0], [t])[0] for t in stream[12:]])
    assert not torch.allclose(without[-1], outcomes[4][-1], atol=1e-2)


def test_owned_step_sliding_layers_never_see_past_their_window():
    _, owned = runners(tiny_model("gpt_oss_sliding"), rows=1)
    stream = torch.randint(0, 96, (1, 90), generator=torch.Generator().manual_seed(1))
    assert_sliding_layers_see_only_their_window(owned, stream)


def test_rows_choose_different_experts():
    """The batch's rows route to different experts (the step's loop over them is exercised), and a batch
    gives each row what it gets alone."""
    model = tiny_model("gpt_oss")
    _, owned = runners(model)
    layer = owned.decoder.layers[0]
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(2))
    chosen = torch.topk(x @ layer.router.T + layer.router_bias, 2, dim=-1).indices
    assert len(torch.unique(chosen)) > 2
    together = owned.decoder._experts(x, layer)
    alone = torch.cat([owned.decoder._experts(x[i : i + 1], layer) for i in range(8)])
    torch.testing.assert_close(together, alone, atol=1e-6, rtol=1e-5)
    want, _ = model.model.layers[0].mlp(x[None])
    torch.testing.assert_close(together, want[0], atol=1e-5, rtol=1e-5)


def test_quantized_decoding_keeps_transformers_forward():
    model = tiny_model("gpt_oss")
    assert unsupported_reason(model, None) is None
    assert "quantize" in unsupported_reason(model, "int4")
    config = EngineConfig(sink_tokens=4, window=60, evict_block=8)
    loaded = prepare(model, None, "tiny", config)
    assert owned_decoder(model, SinkCache(loaded.shape, 1, 64, 4, 8, loaded.inv_freqs), "int4", 1) is None


@pytest.mark.parametrize("block", [1, 8])
def test_stream_matches_the_float64_reference(block):
    """Every logit of a 1,500-token stream in random chunks (one-token chunks on the owned step) within 1e-4
    of the exact float64 policy with per-layer visibility and the learned sinks."""
    model = tiny_model("gpt_oss_sliding")
    sinks, window = 4, 44
    config = EngineConfig(sink_tokens=sinks, window=window, evict_block=block)
    loaded = prepare(model, None, "tiny", config)
    cache = SinkCache(loaded.shape, 1, config.cache_size, sinks, block, loaded.inv_freqs)
    runner = Runner(model, cache, decoder=owned_decoder(model, cache, None, max_rows=1))
    exact = copy.deepcopy(model).double()
    exact.config._experts_implementation = "eager"  # the plain loop over experts computes in float64
    reference = HybridReferenceCache(loaded.shape.num_layers, sinks + window, sinks, block, loaded.inv_freqs,
                                     window=WINDOW)
    rng = random.Random(0)
    stream = torch.randint(0, 96, (1_500,), generator=torch.Generator().manual_seed(2))
    worst, position = 0.0, 0
    while position < len(stream):
        size = min(rng.choice([1, 1, 1, 3, 16, 40]), len(stream) - position)
        chunk = stream[None, position : position + size]
        got = runner.forward([0], chunk, all_logits=True, decoding=size == 1)[0]  # (T, V)
        start = reference.begin(size)
        with torch.no_grad():
            want = exact(input_ids=chunk, position_ids=torch.arange(start, start + size)[None],
                         attention_mask=reference.masks(additive=True), cache=reference, use_cache=True).logits[0]
        worst = max(worst, (got.double() - want).abs().max().item())
        position += size
    assert cache.evicted[0] > 1_400 and cache.lengths[0] == reference.length
    assert worst <= 1e-4, worst


async def test_twelve_turns_past_the_window_on_the_owned_step(tmp_path):
    engine = tiny_family_engine(tmp_path, "gpt_oss_sliding", window=60)
    try:
        assert engine.model_info() == {"model_type": "gpt_oss", "family": "gpt_oss", "decode": "owned"}
        messages, previous, evicted = [], 0, 0
        for turn in range(12):
            messages.append({"role": "user", "content": f"turn {turn}: the fox jumps"})
            prompt, _ = engine.render_chat(messages)
            tokens, finish, _ = await reply(engine, prompt)
            messages.append({"role": "assistant", "content": engine.tokenizer.decode(tokens)})
            if turn:
                assert finish.usage.cached_tokens >= 0.9 * previous, (turn, finish.usage.cached_tokens, previous)
            previous, evicted = len(prompt), finish.usage.evicted_tokens
        assert evicted > 0 and previous > 60
    finally:
        engine.stop()


def test_twelve_turns_through_the_openai_sdk(tmp_path):
    for cached, previous in sdk_conversation(tmp_path, "gpt_oss_sliding")[1:]:
        assert cached >= 0.9 * previous, (cached, previous)
