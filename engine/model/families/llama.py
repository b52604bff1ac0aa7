"""A decode step we own for Llama-family models, over the sink cache's static buffers.

transformers' forward is general: per layer it builds masks, repeats key/value heads, dispatches through
attention interfaces and calls three projections where one would do, several hundred small operations a
step that cost more than the arithmetic of a 135M model on a CPU. Following gpt-fast
(pytorch-labs/gpt-fast, ``model.py``), a decode step here is one function of plain tensor operations:

- per layer one fused QKV projection and one fused gate/up projection (:class:`~engine.model.linear.DecodeLinear`,
  each with the kernel measured fastest on this machine for the batch's row count);
- RoPE as one batched matmul of all query and key heads by each row's (D, D) rotation, built once a step
  from cos/sin tables that the model's own rotary module fills at start (so scaled RoPE variants come out
  as the model computes them);
- the new keys and values written into the cache row's next slot, then grouped-query attention over the
  row's slots read in place (no repeated key/value heads): on a CPU with a float32 cache both in one C call
  per layer that reads the rows wherever they are (:mod:`engine.model.kernels.attention`), else PyTorch's
  scaled-dot-product attention over the rows (a view when they are contiguous, else a gathered copy);
- the output projection of the last hidden state only.

transformers' forward stays the reference: prefill chunks run through it, and tests/engine/test_llama_decode.py
checks this step's logits and cache contents against it. Models it does not cover (biases aside, anything
but RMSNorm + SiLU-gated MLP + RoPE attention, e.g. per-head q/k norms, learned sinks, sliding windows) keep
transformers' forward for decoding too (:func:`unsupported_reason`). The family is registered for
``MODEL_TYPES`` in engine/model/families/__init__.py.

Families with the same step in other module layouts subclass :class:`LlamaDecoder` through three small
hooks: :meth:`~LlamaDecoder.qkv_weights` and :meth:`~LlamaDecoder.gate_up_weight` (where the fused
projections' weights come from: Phi-3 stores them fused already) and :meth:`~LlamaDecoder.head_norms`
(RMS norms of each query and key head before RoPE, as Qwen3's). A rotary embedding over the first
dimensions of each head only (``partial_rotary_factor``) leaves the others as they are in the rotation
matrix. With none of these the step is exactly the Llama one.
"""

from __future__ import annotations

import itertools
import logging
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.cache.sink import CacheStep, SinkCache
from engine.model.kernels import attention as decode_attention
from engine.model.linear import (
    FOUR_BIT,
    PREFILL_KERNEL,
    DecodeLinear,
    candidate_kernels,
    fewest_bytes,
    measure,
    pick,
    row_bucket,
    row_buckets,
)

log = logging.getLogger(__name__)

MODEL_TYPES = ("llama", "mistral", "qwen2")
PROJECTIONS = ("qkv", "out", "gate_up", "down")
# the in-step check of the kernels tuning chose (LlamaDecoder.tune): whole steps over this many cache slots,
# this many of each choice, alternating; the choice reading the fewest bytes among those within STEP_TIE of
# the fastest wins
STEP_CHECK_SLOTS = 256
STEP_CHECK_STEPS = 7
STEP_TIE = 0.03


def unsupported_reason(model: torch.nn.Module, quantize: str | None) -> str | None:
    """Why :class:`LlamaDecoder` cannot run ``model`` (None: it can)."""
    reason = shared_reason(model, quantize, MODEL_TYPES)
    if reason:
        return reason
    layer = model.model.layers[0]
    attention = layer.self_attn
    if any(hasattr(attention, name) for name in ("q_norm", "k_norm", "sinks")):
        return "per-head norms or learned sinks in attention"
    return split_projections_reason(layer)


def shared_reason(model: torch.nn.Module, quantize: str | None, model_types: tuple[str, ...]) -> str | None:
    """What every family on this step needs (None: ``model`` has it): one of ``model_types``, weights it
    can decode, SiLU, no sliding window that can slide, no tensor-parallel slicing."""
    config = model.config
    if config.model_type not in model_types:
        return f"model type {config.model_type!r} (covered: {model_types})"
    if quantize not in (None, "int4"):
        return f"quantize={quantize}"
    if getattr(config, "hidden_act", None) != "silu":
        return f"activation {getattr(config, 'hidden_act', None)!r}"
    window = sliding_window(config)
    if window is not None:
        return f"sliding-window attention ({window} tokens)"
    if getattr(config, "pretraining_tp", 1) != 1:
        return "pretraining_tp"
    return None


def sliding_window(config) -> int | None:
    """The sliding window some layer of the model attends through, where it can slide (None: every layer
    attends to everything before it). A window at least as long as the model's positions never slides: the
    cache holds no more (engine/model/loader.py ``prepare``), so it is full attention (Phi-3.5's 262,144)."""
    window = getattr(config, "sliding_window", None)
    if not window or not getattr(config, "use_sliding_window", True):
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types and "sliding_attention" not in layer_types:
        return None
    positions = getattr(config, "max_position_embeddings", None)
    return None if positions is not None and window >= positions else window


def split_projections_reason(layer: torch.nn.Module) -> str | None:
    """Why a decoder layer's MLP is not the bias-free gated one with separate gate and up projections."""
    if getattr(layer.mlp, "gate_proj", None) is None or getattr(layer.mlp.gate_proj, "bias", None) is not None:
        return "an MLP other than a bias-free gated one"
    return None


@dataclass
class Layer:
    input_norm: torch.Tensor  # (C,)
    qkv: DecodeLinear  # C -> (H + 2 Hkv) D
    out: DecodeLinear  # H D -> C
    post_norm: torch.Tensor  # (C,)
    gate_up: DecodeLinear  # C -> 2 I
    down: DecodeLinear  # I -> C
    head_norm: torch.Tensor | None = None  # (H + Hkv, D): each query head's then each key head's norm weight


class LlamaDecoder:
    """One batched decode step (one new token per row) of a Llama-family model over a :class:`SinkCache`."""

    def __init__(self, model: torch.nn.Module, cache: SinkCache, quantize: str | None = None) -> None:
        reason = self.unsupported_reason(model, quantize)
        if reason:
            raise ValueError(f"the owned decode step does not cover this model: {reason}")
        config = model.config
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.scale = self.head_dim**-0.5
        self.eps = config.rms_norm_eps
        self.device, self.dtype = cache.device, cache.dtype
        weight = next(model.parameters())
        inner, outer = (candidate_kernels(weight.device, weight.dtype, quantize, output=o) for o in (False, True))
        self.layers = [self._layer(layer, inner) for layer in model.model.layers]
        # prompt chunks too, where the layers have a bf16 copy to run them on (else transformers' forward)
        self.prefills = PREFILL_KERNEL in inner
        self.embed = model.get_input_embeddings().weight  # (V, C)
        self.norm = model.model.norm.weight
        head = model.get_output_embeddings()
        self.head = DecodeLinear(head.weight, getattr(head, "bias", None), outer)
        self.cos, self.sin, rotated = self._rope_table(model.model.rotary_emb, cache.capacity)  # (P, D) each
        self.half_turn = torch.zeros(self.head_dim, self.head_dim, dtype=self.dtype, device=self.device)
        identity = torch.eye(rotated, dtype=self.dtype, device=self.device)
        # (D, D): x @ it = rotate_half(x) over the first ``rotated`` dimensions, zero over the others
        self.half_turn[:rotated, :rotated] = _rope(identity, torch.zeros(()), torch.ones(()))
        # attention in one C call per layer over the cache's rows in place, where it can (else PyTorch's)
        self.attention_kernel = decode_attention.supports(self.device, self.dtype, self.heads, self.kv_heads,
                                                          self.head_dim)
        self._plans: dict[int, tuple[list[tuple], object]] = {}  # row bucket -> _plan

    # ----- the family hooks (see the module docstring) -----------------------------------------------
    unsupported_reason = staticmethod(unsupported_reason)  # why a model is not this family's (None: it is)

    def qkv_weights(self, attention: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The fused QKV projection's weight ((H + 2 Hkv) D, C) and bias (or None) of a layer's attention."""
        projections = (attention.q_proj, attention.k_proj, attention.v_proj)
        biases = [p.bias for p in projections]
        qkv_bias = torch.cat([b.detach() for b in biases]) if all(b is not None for b in biases) else None
        if qkv_bias is None and any(b is not None for b in biases):
            raise ValueError("q/k/v projections with and without bias")
        return torch.cat([p.weight.detach() for p in projections]), qkv_bias

    def gate_up_weight(self, mlp: torch.nn.Module) -> torch.Tensor:
        """The fused gate/up projection's weight (2 I, C): the gate's rows, then the up projection's."""
        return torch.cat([mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach()])

    def head_norms(self, attention: torch.nn.Module) -> torch.Tensor | None:
        """The RMS norm weights of each query and key head, applied before RoPE, as (H + Hkv, D); None
        where the family has none."""
        return None

    def _layer(self, layer: torch.nn.Module, kernels: tuple[str, ...]) -> Layer:
        attn, mlp = layer.self_attn, layer.mlp
        qkv, qkv_bias = self.qkv_weights(attn)
        return Layer(
            input_norm=layer.input_layernorm.weight,
            qkv=DecodeLinear(qkv, qkv_bias, kernels),
            out=DecodeLinear(attn.o_proj.weight, attn.o_proj.bias, kernels),
            post_norm=layer.post_attention_layernorm.weight,
            gate_up=DecodeLinear(self.gate_up_weight(mlp), None, kernels),
            down=DecodeLinear(mlp.down_proj.weight, mlp.down_proj.bias, kernels),
            head_norm=self.head_norms(attn),
        )

    def _rope_table(self, rotary: torch.nn.Module, positions: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """cos and sin (P, D) at every in-cache position, from the model's own rotary module (scaled
        variants included), and how many leading dimensions of a head it rotates: past those, cos is 1 and
        sin 0 (a partial rotary embedding leaves them as they are)."""
        probe = torch.zeros(1, dtype=torch.float32, device=self.device)
        with torch.inference_mode():
            cos, sin = rotary(probe, torch.arange(positions, device=self.device)[None])  # (1, P, R) each
        rotated = cos.shape[-1]
        if rotated > self.head_dim or rotated % 2:
            raise ValueError(f"the owned decode step does not cover this model: {rotated} rotary dimensions "
                             f"of {self.head_dim}")
        rest = self.head_dim - rotated
        cos = torch.cat([cos[0], cos.new_ones(positions, rest)], dim=-1)
        sin = torch.cat([sin[0], sin.new_zeros(positions, rest)], dim=-1)
        return cos.to(self.dtype), sin.to(self.dtype), rotated

    def _rotations(self, positions: torch.Tensor) -> torch.Tensor:
        """RoPE at each row's position as a (D, D) matrix R with ``rope(x) = x @ R`` (diag(cos) plus the
        rotate_half matrix scaled by sin), built once a step: every layer then rotates all its query and key
        heads with one batched matmul instead of a dozen elementwise operations. (B, D, D)."""
        return torch.diag_embed(self.cos[positions]) + self.half_turn * self.sin[positions][:, None, :]

    def tune(self, max_rows: int) -> dict[str, dict[int, str]]:
        """Choose the kernels of each projection shape for 1, 2, 4, ... rows up to ``max_rows``: each shape
        measured alone (:func:`~engine.model.linear.measure`), then checked in whole steps.

        A shape timed alone runs over its weights only, which a large last-level cache (300 MB on some
        hosts) may hold whole, so a kernel reading 4x the bytes can win there and lose in a real step, where
        every shape's weights, the output projection and the attended cache slots all pass through the cache.
        Measured on one 2-core Xeon: packed bf16 won every shape alone at 8 rows (10.6 against 14.2 ms over
        the layers) and lost the step (47.1 against 44.0 ms at 330 slots with int4). So wherever the chosen
        kernels are not those reading the fewest bytes, whole steps with each choice are timed alternately
        (:meth:`_step_ms`): the choice, the same with the layers on their fewest-bytes kernels, and everything
        on them; and where several 4-bit kernels exist (``FOUR_BIT``), which read the same bytes, the choice
        with its 4-bit layers all on each of them. The fewest bytes among those within
        ``STEP_TIE`` of the fastest win."""
        buckets = row_buckets(max_rows)
        groups = self.projections()
        choices = {name: measure(group, buckets) for name, group in groups.items()}
        for bucket in buckets:
            chosen = {name: choice[bucket] for name, choice in choices.items()}
            lean = {name: fewest_bytes(groups[name][0], kind) for name, kind in chosen.items()}
            lean_layers = {**lean, "head": chosen["head"]}
            # the 4-bit kernels read the same bytes: which is faster is settled in whole steps too
            four_bit = [{name: other if kind in FOUR_BIT and other in groups[name][0].weights else kind
                         for name, kind in chosen.items()} for other in FOUR_BIT]
            variants = []
            for variant in (chosen, lean_layers, lean, *four_bit):
                if variant not in variants:
                    variants.append(variant)
            if len(variants) == 1:
                continue
            times = self._step_ms(bucket, variants)
            weight_bytes = [sum(linear.weight_bytes(v[name]) for name, group in groups.items() for linear in group)
                            for v in variants]
            keep = pick(dict(enumerate(times)), dict(enumerate(weight_bytes)), STEP_TIE)
            log.info("decode kernels at %d rows, whole steps: %s; keeping %s", bucket,
                     "; ".join(f"{v} {t:.1f} ms" for v, t in zip(variants, times, strict=True)), variants[keep])
            for name, kind in variants[keep].items():
                choices[name][bucket] = kind
        for name, group in groups.items():
            for linear in group:
                linear.keep(choices[name])
        self._plans.clear()
        log.info("decode kernels per row bucket: %s", choices)
        return choices

    def projections(self) -> dict[str, list[DecodeLinear]]:
        """The step's projections by name (``PROJECTIONS``, every layer's of each, then ``head``)."""
        groups = {name: [getattr(layer, name) for layer in self.layers] for name in PROJECTIONS}
        groups["head"] = [self.head]
        return groups

    def assign(self, kernels: dict[str, str], buckets) -> None:
        """Run each named projection (:meth:`projections`) on kernel ``kernels[name]`` at these row buckets,
        whatever tuning chose (its whole-step check; tests and scripts that pin kernels). The kernel's weights
        must still be held (:meth:`DecodeLinear.keep` drops the losers')."""
        groups = self.projections()
        for name, kind in kernels.items():
            for linear in groups[name]:
                if kind not in linear.weights:
                    raise ValueError(f"{name} holds no {kind!r} weights (it holds {list(linear.weights)})")
                for bucket in buckets:
                    linear.choice[bucket] = kind
        self._plans.clear()

    def _step_ms(self, bucket: int, assignments: list[dict[str, str]]) -> list[float]:
        """Median ms of a whole decode step of ``bucket`` rows with each assignment (projection name -> kernel)
        in turn, alternating, over scratch key/value buffers of ``STEP_CHECK_SLOTS`` slots (the cache's rows
        are never touched)."""
        slots = min(self.cos.shape[0], STEP_CHECK_SLOTS)
        shape = (bucket, self.kv_heads, slots, self.head_dim)
        keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        values = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        tokens = torch.zeros(bucket, dtype=torch.long, device=self.device)
        positions = torch.full((bucket,), slots - 1, dtype=torch.long, device=self.device)
        times: list[list[float]] = [[] for _ in assignments]
        with torch.inference_mode():
            for step in range(STEP_CHECK_STEPS + 1):  # the first round warms up
                order = range(len(assignments)) if step % 2 else reversed(range(len(assignments)))
                for index in order:
                    self.assign(assignments[index], (bucket,))
                    start = time.perf_counter()
                    self.forward(tokens, positions, keys, values, slots)
                    if step:
                        times[index].append(time.perf_counter() - start)
        self._plans.clear()
        return [1e3 * statistics.median(t) for t in times]

    def _plan(self, rows: int) -> tuple[list[tuple], object]:
        """The step for ``rows`` rows as plain callables, built once per row bucket: per layer (input norm
        weight, QKV, output projection, post norm weight, gate/up, down) with each projection's chosen kernel
        bound (:meth:`DecodeLinear.kernel`), then the heads' norm weights (or None), and the output
        projection's."""
        bucket = row_bucket(rows)
        plan = self._plans.get(bucket)
        if plan is None:
            layers = [(layer.input_norm, layer.qkv.kernel(bucket), layer.out.kernel(bucket), layer.post_norm,
                       layer.gate_up.kernel(bucket), layer.down.kernel(bucket), layer.head_norm)
                      for layer in self.layers]
            plan = self._plans[bucket] = (layers, self.head.kernel(bucket))
        return plan

    @torch.inference_mode()
    def __call__(self, step: CacheStep, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` (B,) fed to the step's rows at their next slot: logits (B, V) in float32."""
        if self.attention_kernel:  # the cache's whole buffers, its rows read and written in place
            keys, values, rows = step.cache.k, step.cache.v, step.row_index
            return self.forward(tokens.to(self.device), step.slot_index, keys, values, step.kv_length, rows=rows)
        keys, values = step.row_buffers()
        single = step.offsets[0] if len(step.rows) == 1 else None
        logits = self.forward(tokens.to(self.device), step.slot_index, keys, values, step.kv_length, single)
        step.write_back(keys, values)
        return logits

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, keys: list[torch.Tensor],
                values: list[torch.Tensor], length: int, single: int | None = None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """The step as a function of tensors: ``tokens`` (B,) at slots ``positions`` (B,) of the rows whose
        per-layer buffers are ``keys``/``values`` (B, Hkv, P, D), attending over their first ``length``
        slots. Writes the new keys and values; returns logits (B, V) in float32. ``single``: the slot as a
        number when there is one row (a plain slice write, cheaper than indexing by tensors). With the
        attention kernel (``attention_kernel``), ``rows`` (B,): which row of the buffers each batch row is
        (default: the first B), each attending over its own slots up to ``positions``."""
        B = tokens.shape[0]
        rotation = self._rotations(positions)  # (B, D, D)
        H, Hkv, D = self.heads, self.kv_heads, self.head_dim
        QK, dtype, norm = (H + Hkv) * D, self.dtype, self._rms_norm
        batch = torch.arange(B, device=self.device)
        attention, mask = None, None
        if self.attention_kernel:
            attention = decode_attention.DecodeAttention(H, Hkv, D, batch if rows is None else rows, positions)
        elif B > 1:  # rows of different lengths: each sees its slots up to its own (an additive mask, built once)
            mask = self._visible_up_to(positions, length)[:, None, None]  # (B, 1, 1, S)
        layers, head = self._plan(B)
        # plain slicing and bound kernels: at a few rows the Python around each operation costs as much as
        # the operation, and a step runs some 600 of them
        x = F.embedding(tokens, self.embed)  # (B, C)
        for (input_norm, qkv, out, post_norm, gate_up, down, head_norm), k_buf, v_buf in zip(layers, keys, values,
                                                                                             strict=True):
            projected = qkv(norm(x, input_norm))  # (B, (H + 2 Hkv) D), bf16 or the model's dtype
            qk = projected[:, :QK].view(B, H + Hkv, D)
            if head_norm is not None:
                qk = self._head_norm(qk, head_norm)
            qk = torch.bmm(qk.to(dtype), rotation)  # (B, H + Hkv, D), rotated
            v = projected[:, QK:].view(B, Hkv, D)
            if attention is not None:  # the new key and value written, the rows attended: (B, H D)
                x = x + out(attention(qk[:, :H], qk[:, H:], v, k_buf, v_buf))
            else:
                x = x + out(self._attend(qk, v, k_buf, v_buf, positions, batch, mask, length, single))
            gated = gate_up(norm(x, post_norm))  # (B, 2 I): bf16 stays bf16 into the down projection
            half = gated.shape[-1] // 2
            x = x + down(F.silu(gated[:, :half]) * gated[:, half:])  # the residual stream stays in the model's dtype
        return head(norm(x, self.norm)).float()

    def _attend(self, qk: torch.Tensor, v: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor,
                positions: torch.Tensor, batch: torch.Tensor, mask: torch.Tensor | None, length: int,
                single: int | None) -> torch.Tensor:
        """PyTorch's path of the attention kernel: ``qk`` (B, H + Hkv, D) rotated queries and new keys, ``v``
        (B, Hkv, D), written into the row buffers (B, Hkv, P, D) at ``positions``; the attended values (B, H D)."""
        B, H, Hkv, D = qk.shape[0], self.heads, self.kv_heads, self.head_dim
        if single is None:
            k_buf[batch, :, positions] = qk[:, H:]  # (B, Hkv, D)
            v_buf[batch, :, positions] = v.to(self.dtype)
        else:
            k_buf[0, :, single] = qk[0, H:]  # (Hkv, D)
            v_buf[0, :, single] = v[0]
        attended = F.scaled_dot_product_attention(  # query heads grouped per kv head: (B, Hkv, G, D)
            qk[:, :H].view(B, Hkv, H // Hkv, D), k_buf[:, :, :length], v_buf[:, :, :length], attn_mask=mask,
            scale=self.scale)
        return attended.view(B, H * D)

    @torch.inference_mode()
    def prefill(self, step: CacheStep, tokens: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """``tokens`` (T,) of a prompt fed to the step's one row at its next T slots, every layer on the
        prefill kernel: logits (T, V) if ``all_logits`` else (1, V) (the last token's), float32. Each token
        attends to the row's slots up to its own (the sinks, the window, the chunk's earlier tokens)."""
        if len(step.rows) != 1:
            raise ValueError("a prefill step feeds one row")
        return self.prefill_rows([step], [tokens], all_logits)

    @torch.inference_mode()
    def prefill_rows(self, steps: list[CacheStep], tokens: list[torch.Tensor], all_logits: bool = False) -> torch.Tensor:
        """Prompt chunks of several rows in one pass (one step of one row each, ``tokens[i]`` (T_i,) for
        ``steps[i]``): the projections run once over all the chunks' tokens, attention row by row. Logits of
        each row's last token (B, V), or with one row and ``all_logits`` every token's (T, V); float32."""
        if not self.prefills:
            raise ValueError("the owned step prefills only on layers that have a prefill kernel")
        H, Hkv, D = self.heads, self.kv_heads, self.head_dim
        G = H // Hkv
        sizes = [t.shape[0] for t in tokens]
        starts = [step.offsets[0] for step in steps]
        positions = torch.cat([torch.arange(s, s + n, device=self.device) for s, n in zip(starts, sizes, strict=True)])
        rotation = self._rotations(positions)  # (N, D, D)
        bounds = [0, *itertools.accumulate(sizes)]
        masks = []
        for row, step in enumerate(steps):
            mask = self._visible_up_to(positions[bounds[row] : bounds[row + 1]], step.kv_length)  # (T, S)
            masks.append(mask.repeat(G, 1)[None, None])  # (1, 1, G T, S): query (g, t) sees what token t sees
        buffers = [step.row_buffers() for step in steps]
        x = F.embedding(torch.cat(tokens).to(self.device), self.embed)  # (N, C)
        N = x.shape[0]
        for index, layer in enumerate(self.layers):
            h = self._rms_norm(x, layer.input_norm)
            qk, v = layer.qkv.prefill(h).split([(H + Hkv) * D, Hkv * D], dim=-1)
            qk = qk.view(N, H + Hkv, D)
            if layer.head_norm is not None:
                qk = self._head_norm(qk, layer.head_norm)
            qk = torch.bmm(qk.to(self.dtype), rotation)  # (N, H + Hkv, D), rotated
            v = v.view(N, Hkv, D)
            outs = []
            for row, (step, start, size, mask) in enumerate(zip(steps, starts, sizes, masks, strict=True)):
                k_buf, v_buf = buffers[row][0][index], buffers[row][1][index]  # (1, Hkv, P, D)
                seg = slice(bounds[row], bounds[row + 1])
                k_buf[0, :, start : start + size] = qk[seg, H:].transpose(0, 1)  # (Hkv, T, D)
                v_buf[0, :, start : start + size] = v[seg].transpose(0, 1)
                q = qk[seg, :H].reshape(size, Hkv, G, D).permute(1, 2, 0, 3).reshape(1, Hkv, G * size, D)
                out = F.scaled_dot_product_attention(q, k_buf[:, :, : step.kv_length], v_buf[:, :, : step.kv_length],
                                                     attn_mask=mask, scale=self.scale)  # (1, Hkv, G T, D)
                outs.append(out.view(Hkv, G, size, D).permute(2, 0, 1, 3).reshape(size, H * D))
            x = x + layer.out.prefill(outs[0] if len(outs) == 1 else torch.cat(outs))
            h = self._rms_norm(x, layer.post_norm)
            gate, up = layer.gate_up.prefill(h).chunk(2, dim=-1)
            x = x + layer.down.prefill(F.silu(gate) * up)
        for step, (keys, values) in zip(steps, buffers, strict=True):
            step.write_back(keys, values)
        if all_logits and len(steps) == 1:
            last = x
        else:
            last = x[torch.tensor(bounds[1:], device=self.device) - 1]  # (B, C)
        return self.head.prefill(self._rms_norm(last, self.norm)).float()

    def _visible_up_to(self, positions: torch.Tensor, length: int) -> torch.Tensor:
        """An additive attention mask (Q, S): query i sees slots ``0..positions[i]`` of ``length``."""
        hidden = torch.arange(length, device=self.device)[None] > positions[:, None]
        return torch.zeros(hidden.shape, dtype=self.dtype, device=self.device).masked_fill_(hidden, float("-inf"))

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """LlamaRMSNorm: normalised in float32, scaled in the model's dtype."""
        if x.dtype == torch.float32:
            return torch.rms_norm(x, weight.shape, weight, self.eps)
        return weight * torch.rms_norm(x.float(), weight.shape, None, self.eps).to(x.dtype)

    def _head_norm(self, qk: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Each head of ``qk`` (N, H + Hkv, D) RMS-normalised in float32 and scaled by its weight (H + Hkv, D),
        in the model's dtype (Qwen3RMSNorm over the head dimension)."""
        return weight * torch.rms_norm(qk.float(), weight.shape[-1:], None, self.eps).to(weight.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., D) by the angles cos/sin (broadcast to it; rotate_half layout, as transformers' Llama)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
