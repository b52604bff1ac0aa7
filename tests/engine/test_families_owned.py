"""The owned decode step of every family without sliding-window layers against transformers' forward, its
reference: Llama (also with Llama 3.1's ``llama3`` RoPE scaling), Mistral, Qwen2 / Qwen2.5, Qwen3 (per-head
q/k norms) and Phi-3 (fused projections; also longrope over part of each head). Logits, the cache slots it
writes and greedy tokens across evictions; prompt chunks on its bf16 copy; and a long stream through it
against the float64 reference of the cache policy (tests/engine/reference_cache.py)."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from engine.cache.sink import SinkCache
from engine.config import EngineConfig
from engine.model import families
from engine.model.families import owned_decoder
from engine.model.families.llama import LlamaDecoder, sliding_window
from engine.model.families.phi3 import Phi3Decoder
from engine.model.families.qwen3 import Qwen3Decoder
from engine.model.linear import packed_bf16_supported
from engine.model.loader import prepare
from engine.model.runner import Runner
from tests.engine import reference_cache
from tests.engine.generation import greedy_decode
from tests.engine.reference_cache import ReferenceCache
from tests.tiny_models import FAMILIES, VARIANTS, tiny_model

OWNED = {  # tiny model (tests/tiny_models.py) -> (registered family, its decoder class)
    "llama": ("llama", LlamaDecoder),
    "llama3": ("llama", LlamaDecoder),
    "mistral": ("llama", LlamaDecoder),
    "qwen2": ("llama", LlamaDecoder),
    "qwen2_5": ("llama", LlamaDecoder),
    "qwen3": ("qwen3", Qwen3Decoder),
    "phi3": ("phi3", Phi3Decoder),
    "phi3_longrope": ("phi3", Phi3Decoder),
}
CONFIG = EngineConfig(sink_tokens=4, window=28, evict_block=4)
PROMPTS = [[1, 5, 9, 13, 2], [7, 7, 3], [4, 8, 15, 16, 23, 42, 11]]  # rows of different lengths
needs_packed_bf16 = pytest.mark.skipif(not packed_bf16_supported(),
                                       reason="oneDNN has no native bf16 on this CPU: prompts run through transformers")


def model_of(family: str) -> torch.nn.Module:
    """The tiny model with every RMSNorm weight random (they start as ones, under which a norm applied to
    the wrong heads, or not at all, would go unseen), query and key norms different; tied embeddings scaled
    up as tiny_model scales an output projection of its own (logits of order 10)."""
    model = tiny_model(family)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        if model.config.tie_word_embeddings:
            model.get_input_embeddings().weight.mul_(16.0)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=generator))
    return model


def runners(model: torch.nn.Module, quantize: str | None = None, rows: int = 4, config: EngineConfig = CONFIG):
    """Two runners over two identical caches: transformers' forward, and the owned decode step."""
    loaded = prepare(model, None, "tiny", config)

    def cache():
        return SinkCache(loaded.shape, rows, config.cache_size, config.sink_tokens, config.evict_block,
                         loaded.inv_freqs)

    reference = Runner(model, cache())
    owned_cache = cache()
    decoder = owned_decoder(model, owned_cache, quantize, max_rows=rows)
    assert decoder is not None
    return reference, Runner(model, owned_cache, decoder=decoder)


def assert_same_slots(owned: Runner, reference: Runner, rows) -> None:
    for layer in range(reference.cache.shape.num_layers):
        for row in rows:
            n = reference.cache.lengths[row]
            assert owned.cache.lengths[row] == n
            for mine, theirs in ((owned.cache.k, reference.cache.k), (owned.cache.v, reference.cache.v)):
                torch.testing.assert_close(mine[layer][row, :, :n], theirs[layer][row, :, :n], atol=1e-4, rtol=1e-4)


def test_every_family_here_is_registered_with_its_decoder():
    assert set(OWNED) <= set(FAMILIES) | set(VARIANTS)
    for family, (name, cls) in OWNED.items():
        model = tiny_model(family)
        assert families.family_of(model).name == name, family
        assert families.unsupported_reason(model, None) is None, family
        loaded = prepare(model, None, "tiny", CONFIG)
        decoder = owned_decoder(model, SinkCache(loaded.shape, 1, CONFIG.cache_size, 4, 4, loaded.inv_freqs), None, 1)
        assert type(decoder) is cls, family


@pytest.mark.parametrize("family", sorted(OWNED))
def test_greedy_tokens_logits_and_slots_match_transformers(family):
    reference, owned = runners(model_of(family))
    expected, expected_logits = greedy_decode(reference, PROMPTS, steps=40)  # 40 steps: the window rolls
    got, got_logits = greedy_decode(owned, PROMPTS, steps=40)
    assert min(reference.cache.evicted[: len(PROMPTS)]) > 0
    assert expected_logits.abs().max() > 1.0
    assert got == expected
    torch.testing.assert_close(got_logits, expected_logits, atol=1e-4, rtol=1e-4)
    assert_same_slots(owned, reference, range(len(PROMPTS)))


@pytest.mark.parametrize("family", ["qwen3", "phi3_longrope", "llama3"])
def test_pytorch_attention_path_matches_transformers(family):
    """The step's PyTorch attention (a GPU, a cache that is not float32, no C compiler) over one row, over
    rows of different lengths and over rows that are not contiguous."""
    reference, owned = runners(model_of(family))
    owned.decoder.attention_kernel = False
    expected, expected_logits = greedy_decode(reference, PROMPTS[:1], steps=36)
    got, got_logits = greedy_decode(owned, PROMPTS[:1], steps=36)
    assert got == expected
    torch.testing.assert_close(got_logits, expected_logits, atol=1e-4, rtol=1e-4)
    for runner in (reference, owned):
        for row, prompt in ((1, [3, 1, 4, 1, 5]), (3, [9, 2, 6, 5, 3, 5, 8, 9, 7])):
            runner.prefill(row, prompt, 16)
    rows, tokens = [3, 0, 1], [11, 12, 13]
    torch.testing.assert_close(owned.decode(rows, tokens), reference.decode(rows, tokens), atol=1e-4, rtol=1e-4)
    assert_same_slots(owned, reference, rows)
    assert owned.cache.lengths[2] == 0  # the row in between was not touched


@pytest.mark.parametrize("family", ["qwen3", "phi3"])
def test_rows_that_are_not_contiguous_with_the_kernel(family):
    reference, owned = runners(model_of(family))
    if not owned.decoder.attention_kernel:
        pytest.skip("the attention kernel was not built on this machine")
    for runner in (reference, owned):
        for row, prompt in ((0, [3, 1, 4, 1, 5]), (2, [9, 2, 6]), (3, [5, 3, 5, 8, 9, 7, 9])):
            runner.prefill(row, prompt, 16)
    rows, tokens = [3, 0, 2], [11, 12, 13]
    torch.testing.assert_close(owned.decode(rows, tokens), reference.decode(rows, tokens), atol=1e-4, rtol=1e-4)
    assert_same_slots(owned, reference, rows)


def test_qwen3_head_norms_are_the_models_per_head_weights():
    """Each query head carries ``q_norm``'s weight, each key head ``k_norm``'s (distinct here), and leaving
    them out changes the logits: the hook is what makes the step Qwen3's."""
    model = model_of("qwen3")
    _, owned = runners(model, rows=1)
    attention = model.model.layers[1].self_attn
    table = owned.decoder.layers[1].head_norm
    heads = model.config.num_attention_heads
    assert table.shape == (heads + model.config.num_key_value_heads, model.config.head_dim)
    assert torch.equal(table[:heads], attention.q_norm.weight.expand(heads, -1))
    assert torch.equal(table[heads:], attention.k_norm.weight.expand(table.shape[0] - heads, -1))
    with_norms, _ = greedy_decode(owned, PROMPTS[:1], steps=1)
    logits = owned.decode([0], [with_norms[0][-1]])
    owned.cache.reset(0)
    for layer in owned.decoder.layers:
        layer.head_norm = None
    owned.decoder._plans.clear()
    greedy_decode(owned, PROMPTS[:1], steps=1)
    assert (owned.decode([0], [with_norms[0][-1]]) - logits).abs().max() > 1e-2


def test_llama3_variant_scales_some_frequencies_and_not_others():
    """The tiny ``llama3`` model's RoPE really is Llama 3.1's: high frequencies kept, low ones divided by
    the factor, the band between smoothed (so the owned step's tables are checked on all three)."""
    scaled = tiny_model("llama3").model.rotary_emb.inv_freq.double()
    dim = scaled.shape[0] * 2
    plain = 1.0 / (500000.0 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    ratio = plain / scaled
    assert torch.isclose(ratio, torch.ones_like(ratio), rtol=1e-5).any()
    assert torch.isclose(ratio, torch.full_like(ratio, 8.0), rtol=1e-5).any()
    assert ((ratio > 1.01) & (ratio < 7.99)).any()


def test_phi3_longrope_variant_rotates_part_of_each_head_with_scaling():
    model = tiny_model("phi3_longrope")
    rotary = model.model.rotary_emb
    assert rotary.inv_freq.shape[0] * 2 < model.config.hidden_size // model.config.num_attention_heads
    assert rotary.attention_scaling != 1.0


def test_sliding_windows_that_can_slide_are_declined():
    """A sliding window shorter than the model's positions keeps transformers' forward (the Gemma and
    gpt-oss families handle them); one at least as long never slides (Phi-3.5, Mistral configs with
    4096 and fewer positions), nor one the config switches off (Qwen2/3's ``use_sliding_window``)."""
    model = tiny_model("mistral")
    model.config.sliding_window = 32
    assert "sliding-window attention (32 tokens)" in families.unsupported_reason(model, None)
    model.config.sliding_window = model.config.max_position_embeddings
    assert sliding_window(model.config) is None and families.unsupported_reason(model, None) is None
    qwen = tiny_model("qwen3")
    assert qwen.config.use_sliding_window is False and sliding_window(qwen.config) is None


@needs_packed_bf16
@pytest.mark.parametrize("family", ["qwen3", "phi3", "phi3_longrope", "llama3", "qwen2_5"])
def test_prefill_matches_transformers_within_bf16(family):
    """Prompt chunks through the owned step (its bf16 copy of the layers) against transformers' float32
    forward, over three chunks of which the last makes the row evict."""
    reference, owned = runners(model_of(family), quantize="int4", rows=2)
    assert owned.decoder.prefills
    tokens = torch.randint(0, 96, (1, 54), generator=torch.Generator().manual_seed(2))
    for part in (tokens[:, :13], tokens[:, 13:30], tokens[:, 30:]):
        want = reference.forward([1], part, all_logits=True)[0]
        got = owned.forward([1], part, all_logits=True)[0]
        assert got.shape == want.shape
        # bf16 weights and activations on a random model whose weights are scaled up: a few % of the largest
        # logit; a miswired norm, mask, rotation or slot gives errors of the logits' own size
        assert (got - want).abs().max() < 0.06 * want.abs().max(), (got - want).abs().max() / want.abs().max()
    assert owned.cache.evicted[1] == reference.cache.evicted[1] > 0
    n = reference.cache.lengths[1]
    for layer in range(reference.cache.shape.num_layers):
        for mine, theirs in ((owned.cache.k, reference.cache.k), (owned.cache.v, reference.cache.v)):
            want = theirs[layer][1, :, :n]
            assert (mine[layer][1, :, :n] - want).abs().max() < 0.06 * want.abs().max()


class Counting:
    """A decoder that counts its decode steps."""

    def __init__(self, decoder) -> None:
        self.decoder, self.prefills, self.calls = decoder, decoder.prefills, 0

    def __call__(self, step, tokens: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.decoder(step, tokens)


ROTATE = reference_cache._rotate  # the reference's own, before a test swaps it


def _rotate_any_part(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """The reference's exact float64 rotation over the first ``2 len(inv_freq)`` dimensions of each head
    (partial rotary embeddings), the others left as they are."""
    rotated = 2 * inv_freq.shape[0]
    turned = ROTATE(x[..., :rotated], positions, inv_freq)
    return torch.cat([turned, x[..., rotated:]], dim=-1) if rotated < x.shape[-1] else turned



@pytest.mark.parametrize("family", sorted(OWNED))
def test_stream_through_the_owned_step_matches_float64_reference(family, monkeypatch):
    """A 1,500-token stream, some 500 decode steps through the owned step and between them prompt chunks
    through transformers' forward, every logit within 1e-4 of the exact float64 policy after some 180
    evictions of blocks of 8."""
    monkeypatch.setattr(reference_cache, "_rotate", _rotate_any_part)
    model = model_of(family)
    sink_tokens, window, block = 4, 60, 8
    config = EngineConfig(sink_tokens=sink_tokens, window=window, evict_block=block)
    _, runner = runners(model, rows=1, config=config)
    runner.decoder = Counting(runner.decoder)
    exact = copy.deepcopy(model).double()
    loaded = prepare(exact, None, "ref", config)
    reference = ReferenceCache(loaded.shape.num_layers, sink_tokens + window, sink_tokens, block, loaded.inv_freqs)
    rng = random.Random(0)
    stream = torch.randint(0, 96, (1_500,), generator=torch.Generator().manual_seed(2))
    worst, position = 0.0, 0
    while position < len(stream):
        size = min(rng.choice([1] * 12 + [3, 16]), len(stream) - position)
        chunk = stream[None, position : position + size]
        if size == 1:
            got = runner.decode([0], chunk[0].tolist())  # (1, V), the owned step
        else:
            got = runner.forward([0], chunk, all_logits=True)[0]  # (T, V), transformers' forward
        start = reference.begin(size)
        with torch.no_grad():
            want = exact(input_ids=chunk, position_ids=torch.arange(start, start + size)[None],
                         attention_mask=reference.mask(), cache=reference, use_cache=True).logits[0]
        worst = max(worst, (got.double() - (want[-1:] if size == 1 else want)).abs().max().item())
        position += size
    assert runner.decoder.calls > 400 and runner.cache.evicted[0] > 1_400  # the owned step ran, the window rolled
    assert runner.cache.lengths[0] == reference.length <= sink_tokens + window
    assert worst <= 1e-4, worst
