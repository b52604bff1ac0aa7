"""The owned decode step over static input buffers, one per batch bucket, and its CUDA graph.

A CUDA graph records kernels with their arguments: every tensor it reads or writes must live at the same
address on every replay, and nothing that changes from step to step may be a Python value baked into the
recording. :class:`StaticStep` therefore holds, per bucket (:mod:`engine.model.buckets`), one device buffer
of the step's inputs: the token ids, the slot each row writes (its new token's in-cache position) and the
cache row of each batch row, the padding rows pointing at the scratch row. Per step the inputs are copied
into it in one transfer (from pinned memory without blocking the host, on a GPU), then the step runs over
the buffer: captured once at start and replayed on CUDA (:meth:`StaticStep.capture`), called eagerly on a
CPU. Eviction and re-rotation stay outside, between steps (``SinkCache.step`` makes the room before the
inputs are loaded).

The step is :meth:`~engine.model.families.llama.LlamaDecoder.forward`'s with what the eager step takes from
Python made tensors:

- with the CPU attention kernel: that same forward, over the cache's whole buffers by row index;
- else (PyTorch's attention, the GPU's): the new keys and values written at (row, slot) of the cache's
  buffers by index, and attention over the first ``bucket`` rows' buffers read in place (a view: the
  scheduler keeps its decoding rows at 0..B-1, :meth:`~engine.sessions.store.SessionStore.compact`) across
  all the cache's slots, masked from the slots tensor (the eager step attends over the batch's longest row
  instead, a Python number). A padding row reads slot 0 of some row but writes only the scratch row, so the
  live rows' slots are never touched; its logits are dropped. Such a step serves only rows 0..B-1.

tests/engine/test_buckets.py checks that the padded static step leaves the live rows' cache exactly as the
eager step does and gives the same logits, over many steps across evictions; tests/gpu/test_graphs_cuda.py
that the captured graphs decode token for token as the eager step at every bucket.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from engine.cache.sink import SinkCache
from engine.model.buckets import host_inputs, padded_inputs, to_device

if TYPE_CHECKING:
    from engine.model.families.llama import LlamaDecoder

log = logging.getLogger(__name__)


def serves(decoder) -> bool:
    """Whether the static-buffer step covers ``decoder``: the Llama step and the families built on it (Qwen3,
    Phi-3); Gemma's and gpt-oss's steps decode eagerly, unpadded."""
    from engine.model.families.llama import LlamaDecoder

    return isinstance(decoder, LlamaDecoder)

#: eager runs of the step on a side stream before its capture (lazy initialisations, cuBLAS workspaces)
CAPTURE_WARMUP = 2


class StaticStep:
    """The owned decode step of one bucket over static buffers; a CUDA graph of it once :meth:`capture` ran."""

    def __init__(self, decoder: LlamaDecoder, cache: SinkCache, bucket: int) -> None:
        if cache.scratch_row is None:
            raise ValueError("padded decode steps need a cache with a scratch row (SinkCache(scratch_row=True))")
        if not decoder.attention_kernel and bucket > cache.rows + 1:
            raise ValueError(f"a bucket of {bucket} rows reads more rows than the cache has ({cache.rows} + scratch)")
        self.decoder, self.cache, self.bucket = decoder, cache, bucket
        self.device = cache.device
        # [token ids, slots, rows] (3, bucket): idle, every row the scratch row's slot 0
        self.inputs = to_device(padded_inputs([], [], [], bucket, cache.scratch_row), self.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.output: torch.Tensor | None = None  # the graph's logits (bucket, V)

    def serves(self, rows: list[int]) -> bool:
        """Whether this step can feed ``rows``: any rows with the attention kernel, else rows 0..B-1 (read in place)."""
        return len(rows) <= self.bucket and (self.decoder.attention_kernel or rows == list(range(len(rows))))

    @torch.inference_mode()
    def __call__(self, rows: list[int], slots: list[int], tokens: list[int]) -> torch.Tensor:
        """Feed ``tokens`` to ``rows`` at ``slots`` (the room made already): the live rows' logits (B, V), float32."""
        self.load(rows, slots, tokens)
        if self.graph is None:
            return self.compute()[: len(rows)]
        self.graph.replay()
        return self.output[: len(rows)].clone()  # the next replay overwrites the output buffer

    def load(self, rows: list[int], slots: list[int], tokens: list[int]) -> None:
        """Copy a step's inputs, padded to the bucket, into the static buffer (one transfer, not blocking on a GPU)."""
        values = padded_inputs(rows, slots, tokens, self.bucket, self.cache.scratch_row)
        self.inputs.copy_(host_inputs(values, self.device), non_blocking=True)

    def compute(self) -> torch.Tensor:
        """The step over the static buffer, eagerly: logits (bucket, V) in float32."""
        decoder, cache = self.decoder, self.cache
        tokens, slots, rows = self.inputs[0], self.inputs[1], self.inputs[2]
        if decoder.attention_kernel:  # reads and writes the rows in place by index: the eager step's own call
            return decoder.forward(tokens, slots, cache.k, cache.v, cache.capacity, rows=rows)
        B, H, Hkv, D = self.bucket, decoder.heads, decoder.kv_heads, decoder.head_dim
        QK, dtype, norm = (H + Hkv) * D, decoder.dtype, decoder._rms_norm
        rotation = decoder._rotations(slots)  # (B, D, D)
        mask = decoder._visible_up_to(slots, cache.capacity)[:, None, None]  # (B, 1, 1, P)
        layers, head = decoder._plan(B)
        x = F.embedding(tokens, decoder.embed)  # (B, C)
        for (input_norm, qkv, out, post_norm, gate_up, down, head_norm), k_buf, v_buf in zip(layers, cache.k, cache.v,
                                                                                             strict=True):
            projected = qkv(norm(x, input_norm))  # (B, (H + 2 Hkv) D)
            qk = projected[:, :QK].view(B, H + Hkv, D)
            if head_norm is not None:  # Qwen3's per-head q/k norms, as the eager step applies them
                qk = decoder._head_norm(qk, head_norm)
            qk = torch.bmm(qk.to(dtype), rotation)  # (B, H + Hkv, D), rotated
            k_buf[rows, :, slots] = qk[:, H:]  # (B, Hkv, D) at each row's slot; the padding rows' in the scratch row
            v_buf[rows, :, slots] = projected[:, QK:].view(B, Hkv, D).to(dtype)
            attended = F.scaled_dot_product_attention(  # the first B rows in place, (B, Hkv, G, D)
                qk[:, :H].view(B, Hkv, H // Hkv, D), k_buf[:B], v_buf[:B], attn_mask=mask, scale=decoder.scale)
            x = x + out(attended.view(B, H * D))
            gated = gate_up(norm(x, post_norm))  # (B, 2 I)
            half = gated.shape[-1] // 2
            x = x + down(F.silu(gated[:, :half]) * gated[:, half:])
        return head(norm(x, decoder.norm)).float()

    @torch.inference_mode()
    def capture(self, pool=None) -> None:
        """Record the step in a CUDA graph over the idle buffer (every row the scratch row's slot 0, so the
        warm-up runs write nothing a session owns): warmed on a side stream first, as PyTorch's CUDA graph
        notes ask. ``pool``: a memory pool shared by the buckets' graphs."""
        self.load([], [], [])
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(CAPTURE_WARMUP):
                self.compute()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            output = self.compute()
        self.graph, self.output = graph, output


class StaticSteps:
    """The static steps of every bucket, and on CUDA their graphs, captured at start only (:meth:`capture`)."""

    def __init__(self, decoder: LlamaDecoder, cache: SinkCache, sizes: list[int]) -> None:
        self.sizes = list(sizes)
        self.steps = {size: StaticStep(decoder, cache, size) for size in self.sizes}
        self.cuda = cache.device.type == "cuda"
        self.captures = 0  # graphs recorded: all of them at start, none while serving
        self.failures: dict[int, str] = {}  # bucket -> why its capture failed (it runs eagerly, unpadded)

    def step_for(self, rows: list[int]) -> StaticStep | None:
        """The static step to feed ``rows`` with: the smallest bucket that holds them and serves them, and on
        CUDA only if its graph was captured; None: the eager step, unpadded."""
        for size in self.sizes:
            if size >= len(rows):
                step = self.steps[size]
                if step.serves(rows) and (step.graph is not None or not self.cuda):
                    return step
                return None
        return None

    def capture(self) -> None:
        """Capture every bucket's graph on CUDA, the largest first (the smaller ones reuse its memory pool); a
        capture that fails is logged and leaves its bucket to the eager step. Nothing on a CPU."""
        if not self.cuda:
            return
        pool = torch.cuda.graph_pool_handle()
        for size in sorted(self.sizes, reverse=True):
            start = time.perf_counter()
            try:
                self.steps[size].capture(pool)
            except Exception as exc:  # noqa: BLE001 - any failure: this bucket decodes eagerly
                self.failures[size] = f"{type(exc).__name__}: {exc}"
                log.warning("CUDA graph of the %d-row decode step not captured (it runs eagerly): %s", size, exc)
                continue
            self.captures += 1
            log.info("CUDA graph of the %d-row decode step captured in %.0f ms", size,
                     1e3 * (time.perf_counter() - start))
        torch.cuda.synchronize(self.steps[self.sizes[0]].device)
