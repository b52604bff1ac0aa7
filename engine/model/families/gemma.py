"""A decode step we own for Gemma 2 and Gemma 3 (text) models, over the sink cache's static buffers.

What these families add to a Llama-style layer, each as transformers' modeling code computes it:

- embeddings scaled by ``sqrt(hidden_size)`` (in the weights' dtype);
- RMS norms that scale by ``1 + weight``, normalised and scaled in float32, four per layer: before and after
  attention, before and after the MLP; Gemma 3 also normalises each query and key head (``q_norm``,
  ``k_norm``) before RoPE;
- a GELU-tanh gated MLP;
- attention scaled by ``query_pre_attn_scalar ** -0.5``; Gemma 2 soft-caps the attention logits
  (``tanh(s / cap) * cap``, before the mask) and both soft-cap the final logits where the config says so;
- hybrid attention: ``sliding_attention`` layers see only the last ``sliding_window`` tokens of the text,
  ``full_attention`` layers the sinks and the whole window. Both read the same cache rows; what each
  sees is the cache's visibility rule (:meth:`~engine.cache.sink.CacheStep.attention_mask`, with the
  layer's window for a sliding layer), the same rule the runner hands transformers' forward per layer type;
- Gemma 3's sliding layers rotate with their own (local) RoPE base: one rotation per layer type and step,
  from the model's own rotary module; the cache re-rotates each layer's keys with that layer's frequencies.

Keys carry in-cache positions on every layer. A sliding layer's visible keys are the last ``window`` tokens,
contiguous in the text and in the cache alike, so their distances to the query are the text distances and
the layer attends exactly as it would over the whole text (while the cache's window holds them).

Projections run on :class:`~engine.model.linear.DecodeLinear` kernels, tuned per row bucket; attention is
PyTorch's over the rows' slots (soft-capping and per-layer masks keep it out of the fused C kernel), and
prompt chunks run through transformers' forward. tests/engine/test_families_gemma.py checks this step
against transformers' forward. Registered for ``MODEL_TYPES`` in engine/model/families/__init__.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.cache.sink import CacheStep, SinkCache
from engine.model.linear import DecodeLinear, candidate_kernels, measure, row_buckets

log = logging.getLogger(__name__)

MODEL_TYPES = ("gemma2", "gemma3_text")
PROJECTIONS = ("qkv", "out", "gate_up", "down")
LAYER_TYPES = ("sliding_attention", "full_attention")
ACTIVATIONS = ("gelu_pytorch_tanh",)


def unsupported_reason(model: torch.nn.Module, quantize: str | None) -> str | None:
    """Why :class:`GemmaDecoder` cannot run ``model`` (None: it can)."""
    config = model.config
    if config.model_type not in MODEL_TYPES:
        return f"model type {config.model_type!r} (covered: {MODEL_TYPES})"
    if quantize not in (None, "int4"):
        return f"quantize={quantize}"
    activation = getattr(config, "hidden_activation", None)
    if activation not in ACTIVATIONS:
        return f"activation {activation!r}"
    if getattr(config, "use_bidirectional_attention", False):
        return "bidirectional attention"
    unknown = set(getattr(config, "layer_types", None) or ()) - set(LAYER_TYPES)
    if unknown:
        return f"layer types {sorted(unknown)}"
    mlp = model.model.layers[0].mlp
    if any(getattr(getattr(mlp, name, None), "bias", None) is not None for name in ("gate_proj", "up_proj", "down_proj")):
        return "an MLP with biases"
    return None


@dataclass
class Layer:
    input_norm: torch.Tensor  # (C,) float32: 1 + weight
    qkv: DecodeLinear  # C -> (H + 2 Hkv) D
    q_norm: torch.Tensor | None  # (D,) float32 (Gemma 3)
    k_norm: torch.Tensor | None
    out: DecodeLinear  # H D -> C
    post_attention_norm: torch.Tensor
    pre_feedforward_norm: torch.Tensor
    gate_up: DecodeLinear  # C -> 2 I
    down: DecodeLinear  # I -> C
    post_feedforward_norm: torch.Tensor
    layer_type: str  # which RoPE table and which mask
    window: int | None  # a sliding layer's window (None: full attention)


class GemmaDecoder:
    """One batched decode step (one new token per row) of a Gemma 2 or Gemma 3 model over a :class:`SinkCache`."""

    prefills = False  # prompt chunks run through transformers' forward

    def __init__(self, model: torch.nn.Module, cache: SinkCache, quantize: str | None = None) -> None:
        reason = unsupported_reason(model, quantize)
        if reason:
            raise ValueError(f"the owned decode step does not cover this model: {reason}")
        config = model.config
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.scale = config.query_pre_attn_scalar**-0.5
        # transformers' Gemma 3 attention does not apply attn_logit_softcapping (its config carries it)
        self.softcap = config.attn_logit_softcapping if config.model_type == "gemma2" else None
        self.final_softcap = getattr(config, "final_logit_softcapping", None)
        self.eps = config.rms_norm_eps
        self.device, self.dtype = cache.device, cache.dtype
        weight = next(model.parameters())
        inner, outer = (candidate_kernels(weight.device, weight.dtype, quantize, output=o) for o in (False, True))
        layer_types = list(getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers)
        self.layers = [self._layer(layer, layer_type, config.sliding_window, inner)
                       for layer, layer_type in zip(model.model.layers, layer_types, strict=True)]
        embed = model.get_input_embeddings()
        self.embed = embed.weight  # (V, C)
        self.embed_scale = embed.embed_scale.to(self.embed.dtype)  # as transformers scales them
        self.norm = self._norm_scale(model.model.norm)
        head = model.get_output_embeddings()
        self.head = DecodeLinear(head.weight, getattr(head, "bias", None), outer)
        self.tables = {t: self._rope_table(model.model.rotary_emb, t, cache.capacity) for t in set(layer_types)}
        identity = torch.eye(self.head_dim, dtype=self.dtype, device=self.device)
        half = self.head_dim // 2
        self.half_turn = torch.cat((identity[half:], -identity[:half]))  # (D, D): x @ it = rotate_half(x)
        windows = {layer.window for layer in self.layers if layer.window is not None}
        room = cache.capacity - cache.sink_tokens - cache.evict_block + 1  # the fewest window tokens a step sees
        if windows and room < max(windows):
            log.warning("a cache window of %d tokens (after an eviction) is shorter than the sliding layers' %d: "
                        "they see only what the window holds", room, max(windows))

    def _norm_scale(self, norm: torch.nn.Module) -> torch.Tensor:
        """A Gemma RMS norm's scale, ``1 + weight`` in float32."""
        return 1.0 + norm.weight.detach().float()

    def _layer(self, layer: torch.nn.Module, layer_type: str, window: int | None, kernels: tuple[str, ...]) -> Layer:
        attn, mlp = layer.self_attn, layer.mlp
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        biases = [p.bias for p in projections]
        qkv_bias = torch.cat([b.detach() for b in biases]) if all(b is not None for b in biases) else None
        if qkv_bias is None and any(b is not None for b in biases):
            raise ValueError("the owned decode step does not cover this model: q/k/v projections with and without bias")
        qkv = torch.cat([p.weight.detach() for p in projections])
        gate_up = torch.cat([mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach()])
        q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        return Layer(
            input_norm=self._norm_scale(layer.input_layernorm),
            qkv=DecodeLinear(qkv, qkv_bias, kernels),
            q_norm=None if q_norm is None else self._norm_scale(q_norm),
            k_norm=None if k_norm is None else self._norm_scale(k_norm),
            out=DecodeLinear(attn.o_proj.weight, attn.o_proj.bias, kernels),
            post_attention_norm=self._norm_scale(layer.post_attention_layernorm),
            pre_feedforward_norm=self._norm_scale(layer.pre_feedforward_layernorm),
            gate_up=DecodeLinear(gate_up, None, kernels),
            down=DecodeLinear(mlp.down_proj.weight, None, kernels),
            post_feedforward_norm=self._norm_scale(layer.post_feedforward_layernorm),
            layer_type=layer_type,
            window=window if layer_type == "sliding_attention" else None,
        )

    def _rope_table(self, rotary: torch.nn.Module, layer_type: str, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (P, D) of ``layer_type``'s layers at every in-cache position, from the model's own
        rotary module (Gemma 3's takes the layer type: a local base for sliding layers)."""
        probe = torch.zeros(1, dtype=torch.float32, device=self.device)
        ids = torch.arange(positions, device=self.device)[None]
        with torch.inference_mode():
            per_type = hasattr(rotary, "layer_types")
            cos, sin = rotary(probe, ids, layer_type) if per_type else rotary(probe, ids)  # (1, P, D) each
        if cos.shape[-1] != self.head_dim:
            raise ValueError("the owned decode step does not cover this model: partial rotary dimensions")
        return cos[0].to(self.dtype), sin[0].to(self.dtype)

    def tune(self, max_rows: int) -> dict[str, dict[int, str]]:
        """Choose the kernel of each projection shape for 1, 2, 4, ... rows up to ``max_rows`` (each shape
        timed over all its layers, :func:`~engine.model.linear.measure`); the losers' weights are dropped."""
        buckets = row_buckets(max_rows)
        groups = self.projections()
        choices = {name: measure(group, buckets) for name, group in groups.items()}
        for name, group in groups.items():
            for linear in group:
                linear.keep(choices[name])
        log.info("decode kernels per row bucket: %s", choices)
        return choices

    def projections(self) -> dict[str, list[DecodeLinear]]:
        """The step's projections by name (``PROJECTIONS``, every layer's of each, then ``head``)."""
        groups = {name: [getattr(layer, name) for layer in self.layers] for name in PROJECTIONS}
        groups["head"] = [self.head]
        return groups

    @torch.inference_mode()
    def __call__(self, step: CacheStep, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` (B,) fed to the step's rows at their next slot: logits (B, V) in float32."""
        windows = {layer.window for layer in self.layers}
        masks = {window: self._additive(step.attention_mask(window)) for window in windows}  # (B, 1, 1, S) each
        keys, values = step.row_buffers()
        logits = self.forward(tokens.to(self.device), step.slot_index, keys, values, step.kv_length, masks)
        step.write_back(keys, values)
        return logits

    def _additive(self, visible: torch.Tensor) -> torch.Tensor:
        """A boolean mask as an additive one in the cache's dtype (-inf where hidden)."""
        return torch.zeros(visible.shape, dtype=self.dtype, device=self.device).masked_fill_(~visible, float("-inf"))

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, keys: list[torch.Tensor],
                values: list[torch.Tensor], length: int, masks: dict[int | None, torch.Tensor]) -> torch.Tensor:
        """The step as a function of tensors: ``tokens`` (B,) at slots ``positions`` (B,) of the rows whose
        per-layer buffers are ``keys``/``values`` (B, Hkv, P, D), attending over their first ``length`` slots
        as ``masks`` (layer window -> additive (B, 1, 1, length)) allow. Writes the new keys and values;
        returns logits (B, V) in float32."""
        B, H, Hkv, D = tokens.shape[0], self.heads, self.kv_heads, self.head_dim
        batch = torch.arange(B, device=self.device)
        rotations = {t: torch.diag_embed(cos[positions]) + self.half_turn * sin[positions][:, None, :]
                     for t, (cos, sin) in self.tables.items()}  # (B, D, D) per layer type: rope(x) = x @ it
        norm = self._rms_norm
        x = F.embedding(tokens, self.embed) * self.embed_scale  # (B, C)
        for layer, k_buf, v_buf in zip(self.layers, keys, values, strict=True):
            projected = layer.qkv(norm(x, layer.input_norm)).to(self.dtype)  # (B, (H + 2 Hkv) D)
            q = projected[:, : H * D].view(B, H, D)
            k = projected[:, H * D : (H + Hkv) * D].view(B, Hkv, D)
            v = projected[:, (H + Hkv) * D :].view(B, Hkv, D)
            if layer.q_norm is not None:
                q, k = norm(q, layer.q_norm), norm(k, layer.k_norm)
            qk = torch.bmm(torch.cat((q, k), dim=1), rotations[layer.layer_type])  # (B, H + Hkv, D), rotated
            k_buf[batch, :, positions] = qk[:, H:]
            v_buf[batch, :, positions] = v
            attended = self._attend(qk[:, :H], k_buf[:, :, :length], v_buf[:, :, :length], masks[layer.window])
            x = x + norm(layer.out(attended).to(self.dtype), layer.post_attention_norm)
            gated = layer.gate_up(norm(x, layer.pre_feedforward_norm))  # (B, 2 I)
            half = gated.shape[-1] // 2
            hidden = F.gelu(gated[:, :half], approximate="tanh") * gated[:, half:]
            x = x + norm(layer.down(hidden).to(self.dtype), layer.post_feedforward_norm)
        logits = self.head(norm(x, self.norm)).float()
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Grouped-query attention of ``q`` (B, H, D) over ``keys``/``values`` (B, Hkv, S, D), soft-capped where
        the model is, under the additive ``mask`` (B, 1, 1, S); softmax in float32. (B, H D)."""
        B, H, D = q.shape
        Hkv = keys.shape[1]
        grouped = q.view(B, Hkv, H // Hkv, D)  # query heads grouped per kv head
        # keys times the queries (not the queries times the transposed keys): the slots are read in their
        # own layout, several times faster on a CPU for a few query heads
        scores = torch.matmul(keys, grouped.transpose(-1, -2)).transpose(-1, -2) * self.scale  # (B, Hkv, G, S)
        if self.softcap is not None:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        weights = torch.softmax((scores + mask).float(), dim=-1).to(values.dtype)
        return torch.matmul(weights, values).reshape(B, H * D)

    def _rms_norm(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Gemma's RMS norm: normalised and scaled (by ``1 + weight``, ``scale``) in float32, then back to
        ``x``'s dtype, over the last dimension."""
        return torch.rms_norm(x.float(), scale.shape, scale, self.eps).to(x.dtype)
