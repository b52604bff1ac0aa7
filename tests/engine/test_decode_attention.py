"""The decode-attention kernel (engine/model/kernels/attention.py) against PyTorch's path, its reference: the same
attended values and the same slots written, for rows anywhere in the buffers at different lengths, one row
split across threads, grouped-query shapes, the AVX2 build; and the owned step with and without it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.model.kernels import attention as decode_attention
from engine.model.kernels.attention import DecodeAttention

needs_kernel = pytest.mark.skipif(decode_attention.library() is None, reason="no C compiler to build the kernel")


def reference(q, k_new, v_new, k_buf, v_buf, rows, slots):
    """PyTorch's path: the new keys and values scattered into the slots, each row attending up to its own."""
    B, H, D = q.shape
    Hkv = k_new.shape[1]
    out = []
    for b in range(B):
        row, slot = int(rows[b]), int(slots[b])
        k_buf[row, :, slot], v_buf[row, :, slot] = k_new[b], v_new[b]
        q_b = q[b].view(Hkv, H // Hkv, D)
        out.append(F.scaled_dot_product_attention(q_b, k_buf[row, :, : slot + 1], v_buf[row, :, : slot + 1],
                                                  scale=D**-0.5).reshape(H * D))
    return torch.stack(out)


def case(B, H, Hkv, D, capacity=300, buffer_rows=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    k_buf = torch.randn(buffer_rows, Hkv, capacity, D, generator=g)
    v_buf = torch.randn(buffer_rows, Hkv, capacity, D, generator=g)
    # queries and new keys as the step lays them out: rows of (H + Hkv) heads, values strided
    qk = 2 * torch.randn(B, H + Hkv, D, generator=g)
    projected = torch.randn(B, (H + 2 * Hkv) * D, generator=g)
    v_new = projected[:, (H + Hkv) * D :].view(B, Hkv, D)
    rows = torch.randperm(buffer_rows, generator=g)[:B]
    slots = torch.randint(0, capacity, (B,), generator=g)
    return qk, v_new, k_buf, v_buf, rows, slots


@needs_kernel
@pytest.mark.parametrize(("B", "H", "Hkv", "D"), [(1, 9, 3, 64), (8, 9, 3, 64), (3, 4, 2, 16), (5, 8, 1, 128),
                                                  (2, 4, 4, 40), (1, 14, 2, 64)])
def test_it_attends_and_writes_as_pytorch_does(B, H, Hkv, D):
    qk, v_new, k_buf, v_buf, rows, slots = case(B, H, Hkv, D)
    k_ref, v_ref = k_buf.clone(), v_buf.clone()
    want = reference(qk[:, :H], qk[:, H:], v_new, k_ref, v_ref, rows, slots)
    got = DecodeAttention(H, Hkv, D, rows, slots)(qk[:, :H], qk[:, H:], v_new, k_buf, v_buf)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert torch.equal(k_buf, k_ref) and torch.equal(v_buf, v_ref)  # the slots written, nothing else


@needs_kernel
@pytest.mark.parametrize("length", [1, 2, 63, 64, 65, 200, 1000])
def test_every_length_from_one_slot(length):
    """Blocks of 64 slots, partial blocks, and one row split in parts across threads (some of them empty)."""
    qk, v_new, k_buf, v_buf, rows, _ = case(1, 9, 3, 64, capacity=1024)
    slots = torch.tensor([length - 1])
    k_ref, v_ref = k_buf.clone(), v_buf.clone()
    want = reference(qk[:, :9], qk[:, 9:], v_new, k_ref, v_ref, rows, slots)
    got = DecodeAttention(9, 3, 64, rows, slots)(qk[:, :9], qk[:, 9:], v_new, k_buf, v_buf)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@needs_kernel
def test_peaked_and_flat_scores():
    """Scores far apart (one slot takes all the weight; e^x underflows for the rest) and all equal."""
    qk, v_new, k_buf, v_buf, rows, slots = case(2, 4, 2, 32)
    for scale in (300.0, 0.0):
        q = qk[:, :4] * scale
        k_ref, v_ref = k_buf.clone(), v_buf.clone()
        want = reference(q, qk[:, 4:], v_new, k_ref, v_ref, rows, slots)
        got = DecodeAttention(4, 2, 32, rows, slots)(q, qk[:, 4:], v_new, k_buf, v_buf)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@needs_kernel
@pytest.mark.skipif("avx512f" not in open("/proc/cpuinfo").read(), reason="the AVX2 build is tested on AVX-512")
def test_the_avx2_build():
    lib = decode_attention.build("haswell")
    qk, v_new, k_buf, v_buf, rows, slots = case(8, 9, 3, 64)
    k_ref, v_ref = k_buf.clone(), v_buf.clone()
    want = reference(qk[:, :9], qk[:, 9:], v_new, k_ref, v_ref, rows, slots)
    got = DecodeAttention(9, 3, 64, rows, slots, lib=lib)(qk[:, :9], qk[:, 9:], v_new, k_buf, v_buf)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@needs_kernel
def test_what_it_refuses():
    cpu = torch.device("cpu")
    assert decode_attention.supports(cpu, torch.float32, 9, 3, 64)
    assert not decode_attention.supports(cpu, torch.bfloat16, 9, 3, 64)  # float32 buffers only
    assert not decode_attention.supports(cpu, torch.float32, 9, 3, 60)  # head size in vectors of 8
    assert not decode_attention.supports(cpu, torch.float32, 64, 2, 64)  # 32 query heads per kv head
    assert not decode_attention.supports(torch.device("meta"), torch.float32, 9, 3, 64)
    qk, v_new, k_buf, v_buf, rows, slots = case(2, 4, 2, 16)
    attention = DecodeAttention(4, 2, 16, torch.tensor([0, 9]), slots)  # row 9 of 9 rows
    with pytest.raises(ValueError, match="rows up to 9"):
        attention(qk[:, :4], qk[:, 4:], v_new, k_buf, v_buf)
    attention = DecodeAttention(4, 2, 16, rows, torch.tensor([0, 300]))  # slot 300 of 300
    with pytest.raises(ValueError, match="slots up to 300"):
        attention(qk[:, :4], qk[:, 4:], v_new, k_buf, v_buf)
    with pytest.raises(ValueError, match="bfloat16"):
        DecodeAttention(4, 2, 16, rows, slots)(qk[:, :4], qk[:, 4:], v_new, k_buf.bfloat16(), v_buf.bfloat16())


def test_without_a_compiler_it_is_not_used(monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    assert decode_attention.library.__wrapped__() is None  # the build fails quietly, uncached
    monkeypatch.setattr(decode_attention, "library", lambda: None)
    assert not decode_attention.supports(torch.device("cpu"), torch.float32, 9, 3, 64)


@needs_kernel
def test_the_owned_step_with_and_without_it():
    """Greedy decoding of rows that are not contiguous, at different lengths and across evictions: the same
    logits and cache contents as the owned step on PyTorch's attention (which tests/engine/test_llama_decode.py
    checks against transformers' forward)."""
    from engine.cache.sink import SinkCache
    from engine.config import EngineConfig
    from engine.model.families import owned_decoder
    from engine.model.loader import prepare
    from engine.model.runner import Runner
    from tests.tiny_models import tiny_model

    model = tiny_model("llama")
    config = EngineConfig(sink_tokens=4, window=28, evict_block=4)
    loaded = prepare(model, None, "tiny", config)
    runners = []
    for kernel in (True, False):
        cache = SinkCache(loaded.shape, 5, config.cache_size, 4, 4, loaded.inv_freqs)
        decoder = owned_decoder(model, cache, None, max_rows=4)
        assert decoder.attention_kernel
        decoder.attention_kernel = kernel
        runners.append(Runner(model, cache, decoder=decoder))
    rows = [4, 1, 2]
    for runner in runners:
        for row, prompt in zip(rows, ([3, 1, 4, 1, 5], [9, 2, 6], [5, 3, 5, 8, 9, 7, 9, 3, 2]), strict=True):
            runner.prefill(row, prompt, 16)
    tokens = [[11, 12, 13]] * 2
    for _ in range(40):  # past the window of 28: evictions
        logits = [runner.decode(rows, t) for runner, t in zip(runners, tokens, strict=True)]
        torch.testing.assert_close(logits[0], logits[1], atol=1e-4, rtol=1e-4)
        tokens = [lg.argmax(-1).tolist() for lg in logits]
        assert tokens[0] == tokens[1]
    with_kernel, without = (runner.cache for runner in runners)
    assert with_kernel.lengths == without.lengths and with_kernel.lengths[0] == 0
    for layer in range(len(with_kernel.k)):
        torch.testing.assert_close(with_kernel.k[layer], without.k[layer], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(with_kernel.v[layer], without.v[layer], atol=1e-4, rtol=1e-4)
