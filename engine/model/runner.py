"""One forward pass of the model over a batch of cache rows.

The model is an unmodified transformers causal LM. We hand it, per pass, a :class:`~engine.cache.sink.CacheStep`
as its cache, explicit in-cache ``position_ids`` and a ready 4D attention mask, so transformers' own
attention code (SDPA, eager, or a model's learned sinks as in gpt-oss) runs untouched. Decode steps of a
model whose family owns its step run through that step instead (``decoder``, from the family registry in
:mod:`engine.model.families`), which writes the same cache slots and is tested against transformers' forward.
With ``buckets`` (on by default where the cache has a scratch row, which the engine gives it on CUDA), decode
batches are padded to bucket sizes and run over static buffers, replayed from a CUDA graph per bucket captured
at :meth:`Runner.warm_up` (:mod:`engine.model.buckets`, :mod:`engine.model.graphs`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import nullcontext

import torch

from engine.cache.sink import SinkCache
from engine.model.buckets import bucket_sizes, to_device
from engine.model.families import Decoder, model_info, owned_decoder
from engine.model.graphs import StaticStep, StaticSteps, serves
from engine.model.quantize import float_weights

log = logging.getLogger(__name__)


class Runner:
    """Runs prefill chunks and batched decode steps of a model against a :class:`SinkCache`."""

    def __init__(self, model: torch.nn.Module, cache: SinkCache, compile_decode: bool = False,
                 decoder: Decoder | None = None, buckets: bool | None = None) -> None:
        self.model = model
        self.cache = cache  # lent by its builder (the engine's pool, or a benchmark's or test's)
        self.decoder = decoder  # decode steps through the owned step (serving_runner decides)
        # decode batches padded to buckets over static buffers (CUDA graphs on a GPU, engine/model/graphs.py):
        # by default wherever the owned step decodes and the cache has a scratch row for the padding rows
        if buckets is None:
            buckets = decoder is not None and cache.scratch_row is not None and serves(decoder)
        if buckets and (decoder is None or cache.scratch_row is None or not serves(decoder)):
            raise ValueError("padded decode batches need an owned decode step the static step covers (the Llama "
                             "step's families) and a cache with a scratch row")
        self.buckets = buckets
        self.static_steps: StaticSteps | None = None  # built on the first padded step or at warm_up
        # decode steps are small and overhead-bound: torch.compile fuses the per-layer glue (norms,
        # rotary, activations); prefill stays eager (large matmuls dominate it anyway)
        self._decode_forward = torch.compile(model.forward, dynamic=True) if compile_decode else model.forward
        self.device = cache.device
        self._bool_mask = getattr(model.config, "_attn_implementation", "sdpa") == "sdpa"
        self._sliding_window = sliding_window(model.config)  # hybrid models: one mask per layer type
        self.released = False  # transformers' decoder-layer weights dropped (release_transformers_layers)

    def release_transformers_layers(self) -> int:
        """Drop the float weights of transformers' decoder layers when the owned step both prefills and
        decodes (its own copies run every pass a server makes): 424 MB of float32 for the embedded model.
        The embeddings and the output projection stay (the owned step reads them). A pass that would need
        transformers' forward afterwards (a prefill of several rows at once) fails loudly. Returns the
        bytes released (0 when the owned step does not cover both)."""
        if not self.batch_prefill or self.released:
            return 0
        released = 0
        for layer in self.model.model.layers:
            for module in list(layer.self_attn.children()) + list(layer.mlp.children()):
                if isinstance(module, torch.nn.Linear):
                    released += module.weight.numel() * module.weight.element_size()
                    module.weight = torch.nn.Parameter(module.weight.new_empty(0), requires_grad=False)
        self.released = True
        return released

    def _mask(self, step) -> torch.Tensor | dict[str, torch.Tensor]:
        """The pass's 4D attention mask; for a model with sliding-window layers one per layer type (which
        transformers' hybrid models take as a dict), the sliding layers' seeing only their window."""
        if self._sliding_window is None:
            return self._mask_tensor(step.attention_mask())
        return {"full_attention": self._mask_tensor(step.attention_mask()),
                "sliding_attention": self._mask_tensor(step.attention_mask(self._sliding_window))}

    def _mask_tensor(self, mask: torch.Tensor) -> torch.Tensor:
        """A boolean (B, 1, T, S) mask as the model's attention takes it (additive unless SDPA)."""
        if self._bool_mask:
            return mask
        dtype = self.cache.dtype
        return torch.zeros(mask.shape, dtype=dtype, device=self.device).masked_fill(~mask, torch.finfo(dtype).min)

    @torch.inference_mode()
    def forward(self, rows: list[int], tokens: torch.Tensor, all_logits: bool = False,
                decoding: bool = False) -> torch.Tensor:
        """Feed ``tokens`` (B, T) to ``rows``; logits (B, T, V) if ``all_logits`` else (B, V), float32.

        Prompt tokens never run on 4-bit weights, even a one-token remainder of a resent history: the
        reply's first token is sampled from them, and 4-bit decode weights (bf16 activations) can tip a
        near-tie there (the README's first question answered "L'Étoile…" instead of "Paris" about half the
        time when only its last token was fed). They run on the float weights through transformers'
        forward, or through the owned step's prefill on its bf16 copy of them where it has one (int4
        decoding on a CPU with native bf16; engine/model/linear.py PREFILL_KERNEL). ``decoding`` steps
        use the decode weights."""
        step = self.cache.step(rows, tokens.shape[1])
        try:
            if decoding and self.decoder is not None:
                logits = self.decoder(step, tokens[:, 0])[:, None]  # (B, 1, V)
            elif self.batch_prefill and len(rows) == 1:
                logits = self.decoder.prefill(step, tokens[0], all_logits)[None]  # (1, T or 1, V)
            elif self.released:
                raise RuntimeError("transformers' decoder layers were released: prefill one row per pass")
            else:
                logits = self._forward(step, tokens, all_logits, decoding)
        except BaseException:
            step.undo()  # a failed pass leaves every row as it was
            raise
        return logits if all_logits else logits[:, -1]

    def model_info(self) -> dict[str, str | None]:
        """The model's type, its family and the path its decode steps take (engine/model/families)."""
        return model_info(self.model, self.decoder)

    @property
    def batch_prefill(self) -> bool:
        """Whether the owned step prefills: one row through :meth:`forward`, several in one pass through
        :meth:`prefill_rows`."""
        return self.decoder is not None and self.decoder.prefills

    @torch.inference_mode()
    def prefill_rows(self, rows: list[int], chunks: list[list[int]]) -> torch.Tensor:
        """Feed each row its prompt chunk in one pass of the owned step: the logits of each row's last
        token (B, V), float32. A failed pass leaves every row as it was."""
        steps = []
        try:
            for row, chunk in zip(rows, chunks, strict=True):
                steps.append(self.cache.step([row], len(chunk)))
            return self.decoder.prefill_rows(steps, [torch.tensor(chunk) for chunk in chunks])
        except BaseException:
            for step in reversed(steps):
                step.undo()
            raise

    def _forward(self, step, tokens: torch.Tensor, all_logits: bool, decoding: bool) -> torch.Tensor:
        """transformers' forward: logits (B, T or 1, V) in float32."""
        forward = self._decode_forward if decoding else self.model.forward
        with nullcontext() if decoding else float_weights(self.model):
            out = forward(
                input_ids=tokens.to(self.device),
                position_ids=step.position_ids(),
                attention_mask=self._mask(step),
                cache=step,
                use_cache=True,
                logits_to_keep=0 if all_logits else 1,
            )
        return out.logits.float()

    def warm_up(self, token: int = 0, max_batch: int | None = None) -> None:
        """Prepare the decode path before serving: the static step of every bucket up to ``max_batch`` rows
        (default: the cache's rows) and on CUDA its graph (:meth:`StaticSteps.capture`), when decode batches
        are padded; with ``torch.compile``, the compiled forward for one and for several rows (uses rows 0
        and 1).

        Shapes of size 0 or 1 and a cache exactly full are specialized by ``torch.compile``, so each batch
        size is compiled at a partly filled cache and at a full one; otherwise the first full window would
        recompile (a minute on a small CPU) in the middle of a conversation.
        """
        if self.buckets:
            self.static_steps = StaticSteps(self.decoder, self.cache, bucket_sizes(self._top_bucket(max_batch)))
            self.static_steps.capture()
            return  # padded batches decode through the owned step: nothing compiled to warm
        rows = list(range(min(2, self.cache.rows)))
        for batch in sorted({1, len(rows)}):
            for length in (min(8, self.cache.capacity - 1), self.cache.capacity - 1):
                for row in rows:
                    self.cache.reset(row)
                    self.cache.lengths[row] = length  # zeroed slots: a shape to compile, nothing to read
                self.decode(rows[:batch], [token] * batch)
        for row in rows:
            self.cache.reset(row)

    def chunks(self, tokens: list[int], chunk: int) -> Iterator[list[int]]:
        for start in range(0, len(tokens), chunk):
            yield tokens[start : start + chunk]

    def prefill(self, row: int, tokens: list[int], chunk: int) -> torch.Tensor:
        """Stream a prompt of any length into ``row`` chunk by chunk; logits of its last token (V,)."""
        if not tokens:
            raise ValueError("prefill needs at least one token")
        logits = None
        for part in self.chunks(tokens, chunk):
            logits = self.forward([row], torch.tensor([part]))
        return logits[0]

    def decode(self, rows: list[int], tokens: list[int]) -> torch.Tensor:
        """One token for each row: logits (B, V). With padded batches (``buckets``) through the static step of
        the batch's bucket where there is one (:meth:`_decode_padded`), else eagerly; the token ids reach a
        GPU from pinned memory without a blocking copy either way."""
        if self.buckets:
            if self.static_steps is None:  # not warmed: on a CPU eager static steps; a GPU, graphs only, runs unpadded
                self.static_steps = StaticSteps(self.decoder, self.cache, bucket_sizes(self._top_bucket(None)))
            static = self.static_steps.step_for(rows)
            if static is not None:
                return self._decode_padded(static, rows, tokens)
        return self.forward(rows, to_device(tokens, self.device)[:, None], decoding=True)

    @torch.inference_mode()
    def _decode_padded(self, static: StaticStep, rows: list[int], tokens: list[int]) -> torch.Tensor:
        """One token for each row through ``static``: the room made (evicting) first, outside the step; a
        failed step leaves every row as it was."""
        step = self.cache.step(rows, 1)
        try:
            return static(step.rows, step.offsets, tokens)
        except BaseException:
            step.undo()
            raise

    def _top_bucket(self, max_batch: int | None) -> int:
        """The largest bucket: ``max_batch``, at most the rows sessions own (a batch never holds more)."""
        return min(max_batch or self.cache.rows, self.cache.rows)


def sliding_window(config) -> int | None:
    """The window of a model whose ``layer_types`` interleave sliding-window layers with full ones
    (Gemma 2/3, gpt-oss): those layers then get a mask of their own (None: one mask for every layer)."""
    if "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        return getattr(config, "sliding_window", None)
    return None


def serving_runner(model: torch.nn.Module, cache: SinkCache, quantize: str | None, max_rows: int,
                   compile_decode: bool = False) -> Runner:
    """The runner the server decodes with: the owned decode step where it covers the model (kernels tuned
    for up to ``max_rows`` rows), transformers' forward otherwise or when compiling."""
    if compile_decode:
        log.info("decoding %s with transformers' forward, compiled", model.config.model_type)
    decoder = None if compile_decode else owned_decoder(model, cache, quantize, max_rows)
    return Runner(model, cache, compile_decode=compile_decode, decoder=decoder)
