"""The owned decode step of Gemma 2 and Gemma 3 (engine/model/families/gemma.py) against transformers' forward,
and the hybrid attention of both paths against exact references: a float64 cache with its own per-layer
visibility rule, the model's own forward over the whole text (a model of sliding layers only), the
streaming-perplexity recompute oracle, and a 12-turn conversation past the window on the owned step."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from engine.cache.sink import SinkCache
from engine.config import EngineConfig
from engine.evaluate.ppl import ppl_of_ids
from engine.model.families import owned_decoder, unsupported_reason
from engine.model.families.gemma import GemmaDecoder
from engine.model.loader import prepare
from engine.model.quantize import INT4_GROUP, int4_codes
from engine.model.runner import Runner
from tests.engine.generation import greedy_decode, reply
from tests.engine.reference_cache import ReferenceCache
from tests.engine.test_sliding import WINDOW, assert_sliding_layers_see_only_their_window
from tests.tiny_models import tiny_family_engine, tiny_model

FAMILIES = ("gemma2", "gemma3")


def gemma(family: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random Gemma whose norm weights are random too (its norms scale by ``1 + weight``)."""
    model = tiny_model(family, seed=seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    return model


def runners(model, rows: int = 4, window: int = 60, block: int = 8):
    """Two runners over two identical caches: transformers' forward, and the owned decode step."""
    config = EngineConfig(sink_tokens=4, window=window, evict_block=block)
    loaded = prepare(model, None, "tiny", config)

    def cache():
        return SinkCache(loaded.shape, rows, config.cache_size, 4, block, loaded.inv_freqs)

    owned_cache = cache()
    decoder = owned_decoder(model, owned_cache, None, max_rows=rows)
    assert isinstance(decoder, GemmaDecoder)
    return Runner(model, cache()), Runner(model, owned_cache, decoder=decoder)


@pytest.mark.parametrize("window", [60, 28])  # 28: the cache's window shorter than the sliding layers'
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_logits_and_slots_match_transformers(family, window):
    reference, owned = runners(gemma(family), window=window)
    prompts = [[1, 5, 9, 13, 2], [7, 7, 3], [4, 8, 15, 16, 23, 42, 11]]  # rows of different lengths
    expected, expected_logits = greedy_decode(reference, prompts, steps=90)  # the window rolls
    got, got_logits = greedy_decode(owned, prompts, steps=90)
    assert min(reference.cache.evicted[:3]) > 0
    assert got == expected
    assert expected_logits.abs().max() > 1.0
    torch.testing.assert_close(got_logits, expected_logits, atol=1e-4, rtol=1e-4)
    for layer in range(reference.cache.shape.num_layers):  # the same keys and values in the same slots
        for row in range(len(prompts)):
            n = reference.cache.lengths[row]
            assert owned.cache.lengths[row] == n
            for mine, theirs in ((owned.cache.k, reference.cache.k), (owned.cache.v, reference.cache.v)):
                torch.testing.assert_close(mine[layer][row, :, :n], theirs[layer][row, :, :n], atol=1e-4, rtol=1e-4)


def test_every_step_matches_transformers_through_evictions():
    """Logits of each of 120 steps of one row, not only the last (a wrong step could still pick the same
    greedy token)."""
    reference, owned = runners(gemma("gemma3"), rows=1)
    for runner in (reference, owned):
        runner.prefill(0, [3, 1, 4, 1, 5], 16)
    stream = torch.randint(0, 96, (120,), generator=torch.Generator().manual_seed(3)).tolist()
    for token in stream:
        torch.testing.assert_close(owned.decode([0], [token]), reference.decode([0], [token]), atol=1e-4, rtol=1e-4)
    assert owned.cache.evicted[0] == reference.cache.evicted[0] > 50


def test_rows_that_are_not_contiguous():
    reference, owned = runners(gemma("gemma2"))
    for runner in (reference, owned):
        for row, prompt in ((0, [3, 1, 4, 1, 5]), (2, [9, 2, 6] * 15), (3, [5, 3, 5, 8, 9, 7, 9] * 11)):
            runner.prefill(row, prompt, 16)
    rows, tokens = [3, 0, 2], [11, 12, 13]
    torch.testing.assert_close(owned.decode(rows, tokens), reference.decode(rows, tokens), atol=1e-4, rtol=1e-4)
    for row in rows:
        n = reference.cache.lengths[row]
        torch.testing.assert_close(owned.cache.k[1][row, :, :n], reference.cache.k[1][row, :, :n], atol=1e-4, rtol=1e-4)
    assert owned.cache.lengths[1] == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_owned_step_sliding_layers_never_see_past_their_window(family):
    _, owned = runners(gemma(family), rows=1)
    stream = torch.randint(0, 96, (1, 90), generator=torch.Generator().manual_seed(1))
    assert_sliding_layers_see_only_their_window(owned, stream)


def test_the_step_follows_what_the_family_has():
    """Soft-capping, q/k norms and local RoPE bases where the family has them, from the model's config."""
    g2, g3 = (GemmaDecoder(m, runners(m, rows=1)[1].cache) for m in (gemma("gemma2"), gemma("gemma3")))
    assert g2.softcap == 8.0 and g2.final_softcap == 12.0 and g2.layers[0].q_norm is None
    assert g3.softcap is None and g3.layers[0].q_norm is not None
    assert [layer.window for layer in g3.layers] == [WINDOW, None, WINDOW]
    sliding, full = g3.tables["sliding_attention"], g3.tables["full_attention"]
    assert not torch.allclose(sliding[0][5], full[0][5])  # the local base turns faster
    assert g2.scale == 24**-0.5


def test_unsupported_variants_keep_transformers_forward():
    model = gemma("gemma3")
    assert unsupported_reason(model, None) is None
    assert "quantize" in unsupported_reason(model, "int8")
    bidirectional = gemma("gemma3")
    bidirectional.config.use_bidirectional_attention = True
    assert "bidirectional" in unsupported_reason(bidirectional, None)
    with pytest.raises(ValueError, match="does not cover"):
        GemmaDecoder(bidirectional, runners(model, rows=1)[1].cache)


def on_the_int4_grid(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with each layer projection's weights replaced by their 4-bit codes' values (the output
    projection stays): the 4-bit kernels then compute with the very weights transformers' forward uses."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
                codes, scales_zeros = int4_codes(module.weight)
                n, k = module.weight.shape
                scale, zero = (scales_zeros[..., i].float().t()[..., None] for i in (0, 1))  # (N, K / group, 1)
                module.weight.copy_(((codes.float().view(n, k // INT4_GROUP, INT4_GROUP) - 8) * scale + zero).view(n, k))
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_int4_decoding_matches_transformers_on_4_bit_weights(family):
    """4-bit decoding against transformers' float forward over the same (4-bit) weights: only the
    kernels' bf16 activations differ, a percent of the logits; a miswired kernel, norm or mask gives
    errors of the logits' own size."""
    model = on_the_int4_grid(gemma(family))
    reference, owned = runners(model, rows=2)
    owned.decoder = owned_decoder(model, owned.cache, "int4", max_rows=2)
    assert isinstance(owned.decoder, GemmaDecoder)
    assert "int4" in "".join(owned.decoder.layers[0].qkv.weights)
    for runner in (reference, owned):
        runner.prefill(0, [1, 5, 9, 13, 2], 16)
        runner.prefill(1, [7, 7, 3], 16)
    for tokens in ([3, 4], [10, 11], [50, 60]):  # fixed tokens: a near-tie cannot send the rows apart
        expected, got = reference.decode([0, 1], tokens), owned.decode([0, 1], tokens)
        assert (got - expected).abs().max() < 0.03 * expected.abs().max()


# ----- exact references ---------------------------------------------------------------------------------
class HybridReferenceCache(ReferenceCache):
    """The float64 reference cache (raw keys, rotated exactly on read) that also tracks each held token's
    place in the text, and masks a sliding layer to the held tokens at most ``window - 1`` back in it."""

    def __init__(self, *args, window: int) -> None:
        super().__init__(*args)
        self.window, self.text, self.fed = window, [], 0

    def begin(self, new_tokens: int) -> int:
        before = self.length
        start = super().begin(new_tokens)
        evicted = before - start
        self.text = self.text[: self.sinks] + self.text[self.sinks + evicted :] + list(range(self.fed, self.fed + new_tokens))
        self.fed += new_tokens
        return start

    def masks(self, additive: bool) -> dict[str, torch.Tensor]:
        """Per layer type the mask (1, 1, T, S): boolean, or float64 0 / -inf for eager attention."""
        text = torch.tensor(self.text)
        queries = text[self.start :][:, None]  # (T, 1)
        sliding = (text[None] <= queries) & (queries - text[None] < self.window)
        masks = {"full_attention": self.mask(), "sliding_attention": sliding[None, None]}
        if additive:
            return {t: torch.zeros(m.shape, dtype=torch.float64).masked_fill(~m, float("-inf")) for t, m in masks.items()}
        return masks


@pytest.mark.parametrize("family,block", [("gemma2", 8), ("gemma3", 1), ("gemma3", 8)])
def test_stream_matches_the_float64_reference(family, block):
    """Every logit of a 1,500-token stream in random chunks (one-token chunks on the owned step) within 1e-4
    of the exact float64 policy with per-layer visibility."""
    model = gemma(family)
    sinks, window = 4, 44
    config = EngineConfig(sink_tokens=sinks, window=window, evict_block=block)
    loaded = prepare(model, None, "tiny", config)
    cache = SinkCache(loaded.shape, 1, config.cache_size, sinks, block, loaded.inv_freqs)
    runner = Runner(model, cache, decoder=owned_decoder(model, cache, None, max_rows=1))
    exact = copy.deepcopy(model).double()
    reference = HybridReferenceCache(loaded.shape.num_layers, sinks + window, sinks, block, loaded.inv_freqs,
                                     window=WINDOW)
    eager = model.config._attn_implementation == "eager"
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
                         attention_mask=reference.masks(eager), cache=reference, use_cache=True).logits[0]
        worst = max(worst, (got.double() - want).abs().max().item())
        position += size
    assert cache.evicted[0] > 1_400 and cache.lengths[0] == reference.length
    assert worst <= 1e-4, worst


def test_sliding_layers_streamed_equal_the_models_own_forward_over_the_whole_text():
    """A model of sliding layers only: streamed through the sink cache (600 tokens, a 60-token window, the
    sinks hidden from every layer once evicted) its logits are those of its own forward over the whole
    text, within float32 rounding; on the owned step as through transformers' forward."""
    model = gemma("gemma3_sliding")
    stream = torch.randint(0, 96, (1, 600), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        dense = model(stream).logits[0]  # (T, V), the model's own sliding masks
    for owned in (False, True):
        reference, runner = runners(model, rows=1)
        runner = runner if owned else reference
        got = [runner.forward([0], stream[:, :20], all_logits=True)[0]]
        got += [runner.forward([0], stream[:, t : t + 1], all_logits=True, decoding=True)[0] for t in range(20, 600)]
        assert runner.cache.evicted[0] > 500
        torch.testing.assert_close(torch.cat(got), dense, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", [*FAMILIES, "gpt_oss_sliding"])
def test_streaming_perplexity_matches_the_recompute_oracle(family):
    """``eval ppl`` on a hybrid model: without eviction the sink cache, dense attention and the recompute
    oracle (the model's own forward, its own sliding masks) score every token alike; with evictions, on
    sliding layers only, the sink cache equals dense attention (both see each token's last 32)."""
    config = EngineConfig(sink_tokens=4, window=124, evict_block=16)
    ids = torch.randint(0, 96, (120,), generator=torch.Generator().manual_seed(5)).tolist()
    loaded = prepare(gemma(family) if family in FAMILIES else tiny_model(family), None, "tiny", config)
    results = ppl_of_ids(loaded, ids, ["sink", "dense", "recompute"], 4, 124, evict_block=16, chunk=1)
    assert results["sink"]["evicted"] == 0
    for mode in ("dense", "recompute"):
        assert results[mode]["nll"] == pytest.approx(results["sink"]["nll"], rel=1e-5), mode
    ids = torch.randint(0, 96, (400,), generator=torch.Generator().manual_seed(6)).tolist()
    loaded = prepare(gemma("gemma3_sliding"), None, "tiny", config)
    results = ppl_of_ids(loaded, ids, ["sink", "dense", "recompute"], 4, 60, evict_block=8, chunk=1)
    assert results["sink"]["evicted"] > 300
    assert results["sink"]["nll"] == pytest.approx(results["dense"]["nll"], rel=1e-5)
    assert results["recompute"]["nll"] != pytest.approx(results["sink"]["nll"], rel=1e-5)  # it recomputes


# ----- serving ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
async def test_twelve_turns_past_the_window_on_the_owned_step(tmp_path, family):
    engine = tiny_family_engine(tmp_path, family, window=60)
    try:
        assert engine.model_info() == {"model_type": engine.loaded.model.config.model_type, "family": "gemma",
                                       "decode": "owned"}
        messages, previous, evicted = [], 0, 0
        for turn in range(12):
            messages.append({"role": "user", "content": f"turn {turn}: the fox jumps"})
            prompt, _ = engine.render_chat(messages)
            tokens, finish, _ = await reply(engine, prompt)
            messages.append({"role": "assistant", "content": engine.tokenizer.decode(tokens)})
            if turn:
                assert finish.usage.cached_tokens >= 0.9 * previous, (turn, finish.usage.cached_tokens, previous)
            previous, evicted = len(prompt), finish.usage.evicted_tokens
        assert evicted > 0 and previous > 60  # past the window
    finally:
        engine.stop()


@pytest.mark.parametrize("family", [*FAMILIES, "gpt_oss_sliding"])
def test_bf16_models_stay_close_to_transformers(family):
    """A bf16 model and cache: the owned step's logits within bf16 rounding of transformers' forward at
    each of 100 steps of two rows past evictions (a few % of the logits' scale, as for Llama; a wrong
    cast or norm gives errors of their own size)."""
    model = tiny_model(family, dtype=torch.bfloat16)
    config = EngineConfig(sink_tokens=4, window=60, evict_block=8, dtype="bfloat16")
    loaded = prepare(model, None, "tiny", config)

    def cache():
        return SinkCache(loaded.shape, 2, config.cache_size, 4, 8, loaded.inv_freqs, dtype=torch.bfloat16)

    reference, owned_cache = Runner(model, cache()), cache()
    owned = Runner(model, owned_cache, decoder=owned_decoder(model, owned_cache, None, max_rows=2))
    assert owned.decoder is not None
    for runner in (reference, owned):
        runner.prefill(0, [1, 5, 9, 4, 4, 4], 16)
        runner.prefill(1, [3, 3], 16)
    worst = 0.0
    for tokens in torch.randint(0, 96, (100, 2), generator=torch.Generator().manual_seed(8)).tolist():
        want, got = reference.decode([0, 1], tokens), owned.decode([0, 1], tokens)
        worst = max(worst, ((got - want).abs().max() / want.abs().max()).item())
    assert min(reference.cache.evicted[:2]) > 0
    assert worst < 0.05, worst


def sdk_conversation(tmp_path, family: str, turns: int = 12) -> list[tuple[int, int]]:
    """``turns`` turns of a conversation with a tiny ``family`` model through the real ``openai`` SDK and a
    live server, the history resent each turn: per turn (cached tokens, the previous turn's prompt tokens).
    The server's /health must report the owned decode step."""
    from openai import OpenAI

    from server.app import create_app
    from server.settings import Settings
    from tests.server.conftest import LiveServer

    engine = tiny_family_engine(tmp_path, family, window=60)
    server = LiveServer(create_app(Settings(), engine=engine)).start()
    try:
        client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        assert client.get(f"{server.url}/health", cast_to=dict)["model"]["decode"] == "owned"
        messages, seen, previous, evicted = [], [], 0, 0
        for turn in range(turns):
            messages.append({"role": "user", "content": f"turn {turn}: the fox jumps over the dog"})
            answer = client.chat.completions.create(model=f"tiny-{family}", messages=messages, max_tokens=6, temperature=0)
            messages.append({"role": "assistant", "content": answer.choices[0].message.content})
            seen.append((answer.usage.prompt_tokens_details.cached_tokens, previous))
            previous, evicted = answer.usage.prompt_tokens, answer.model_extra["sinkserve"]["evicted_tokens"]
        assert previous > 60 and evicted > 0  # past the window
        return seen
    finally:
        server.stop()
        engine.stop()


@pytest.mark.parametrize("family", FAMILIES)
def test_twelve_turns_through_the_openai_sdk(tmp_path, family):
    for cached, previous in sdk_conversation(tmp_path, family)[1:]:
        assert cached >= 0.9 * previous, (cached, previous)
