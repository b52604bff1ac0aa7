"""A decode step we own for gpt-oss models, over the sink cache's static buffers.

What gpt-oss adds to a Llama-style layer, each as transformers' modeling code computes it:

- learned attention sinks: per query head one extra logit (``sinks``) joins the softmax and takes its share
  of the attention without a value. They are the model's own and always apply; the cache's pinned slots
  (``sink_tokens``, or a pinned system prompt) stay visible to the full-attention layers on top of them,
  as the operator configured;
- hybrid attention: ``sliding_attention`` layers see only the last ``sliding_window`` tokens of the text,
  ``full_attention`` layers the pinned slots and the whole window, by the cache's visibility rule
  (:meth:`~engine.cache.sink.CacheStep.attention_mask`), as the runner hands transformers' forward;
- q/k/v and output projections with biases;
- a top-k mixture of experts: a router (linear with bias) picks ``num_experts_per_tok`` experts per token,
  their weights the softmax of the chosen logits; each expert is a clamped SwiGLU (``gate * sigmoid(alpha
  gate)`` times ``up + 1``, gate and up interleaved in one projection) with biases. The step loops over the
  experts its rows chose, each on the rows that chose it.

The attention projections and the output projection run on :class:`~engine.model.linear.DecodeLinear`
kernels (float only: the experts have no quantized kernel here); prompt chunks run through transformers'
forward. tests/engine/test_families_gpt_oss.py checks this step against transformers' eager attention with
sinks. Registered for ``MODEL_TYPES`` in engine/model/families/__init__.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.cache.sink import CacheStep, SinkCache
from engine.model.linear import DecodeLinear, candidate_kernels, measure, row_buckets

log = logging.getLogger(__name__)

MODEL_TYPES = ("gpt_oss",)
PROJECTIONS = ("qkv", "out")
LAYER_TYPES = ("sliding_attention", "full_attention")


def unsupported_reason(model: torch.nn.Module, quantize: str | None) -> str | None:
    """Why :class:`GptOssDecoder` cannot run ``model`` (None: it can)."""
    config = model.config
    if config.model_type not in MODEL_TYPES:
        return f"model type {config.model_type!r} (covered: {MODEL_TYPES})"
    if quantize is not None:
        return f"quantize={quantize} (the experts have no quantized kernel on the owned step)"
    unknown = set(getattr(config, "layer_types", None) or ()) - set(LAYER_TYPES)
    if unknown:
        return f"layer types {sorted(unknown)}"
    experts = model.model.layers[0].mlp.experts
    if not all(isinstance(getattr(experts, name, None), torch.Tensor)
               for name in ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")):
        return "experts stored other than as float tensors (e.g. MXFP4 blocks)"
    return None


@dataclass
class Layer:
    input_norm: torch.Tensor  # (C,)
    qkv: DecodeLinear  # C -> (H + 2 Hkv) D
    out: DecodeLinear  # H D -> C
    sinks: torch.Tensor  # (H,) learned sink logits
    post_norm: torch.Tensor  # (C,)
    router: torch.Tensor  # (E, C)
    router_bias: torch.Tensor  # (E,)
    gate_up: torch.Tensor  # (E, C, 2 I), gate and up interleaved
    gate_up_bias: torch.Tensor  # (E, 2 I)
    down: torch.Tensor  # (E, I, C)
    down_bias: torch.Tensor  # (E, C)
    window: int | None  # a sliding layer's window (None: full attention)


class GptOssDecoder:
    """One batched decode step (one new token per row) of a gpt-oss model over a :class:`SinkCache`."""

    prefills = False  # prompt chunks run through transformers' forward

    def __init__(self, model: torch.nn.Module, cache: SinkCache, quantize: str | None = None) -> None:
        reason = unsupported_reason(model, quantize)
        if reason:
            raise ValueError(f"the owned decode step does not cover this model: {reason}")
        config = model.config
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.scale = self.head_dim**-0.5
        self.eps = config.rms_norm_eps
        self.top_k = config.num_experts_per_tok
        self.alpha, self.limit = config.swiglu_alpha, config.swiglu_limit
        self.device, self.dtype = cache.device, cache.dtype
        weight = next(model.parameters())
        inner, outer = (candidate_kernels(weight.device, weight.dtype, quantize, output=o) for o in (False, True))
        layer_types = list(getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers)
        self.layers = [self._layer(layer, layer_type, config.sliding_window, inner)
                       for layer, layer_type in zip(model.model.layers, layer_types, strict=True)]
        self.embed = model.get_input_embeddings().weight  # (V, C)
        self.norm = model.model.norm.weight.detach()
        head = model.get_output_embeddings()
        self.head = DecodeLinear(head.weight, getattr(head, "bias", None), outer)
        self.cos, self.sin = self._rope_table(model.model.rotary_emb, cache.capacity)
        identity = torch.eye(self.head_dim, dtype=self.dtype, device=self.device)
        half = self.head_dim // 2
        self.half_turn = torch.cat((identity[half:], -identity[:half]))  # (D, D): x @ it = rotate_half(x)

    def _layer(self, layer: torch.nn.Module, layer_type: str, window: int | None, kernels: tuple[str, ...]) -> Layer:
        attn, mlp = layer.self_attn, layer.mlp
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        biases = [p.bias for p in projections]
        qkv_bias = torch.cat([b.detach() for b in biases]) if all(b is not None for b in biases) else None
        if qkv_bias is None and any(b is not None for b in biases):
            raise ValueError("the owned decode step does not cover this model: q/k/v projections with and without bias")
        experts = mlp.experts
        return Layer(
            input_norm=layer.input_layernorm.weight.detach(),
            qkv=DecodeLinear(torch.cat([p.weight.detach() for p in projections]), qkv_bias, kernels),
            out=DecodeLinear(attn.o_proj.weight, attn.o_proj.bias, kernels),
            sinks=attn.sinks.detach(),
            post_norm=layer.post_attention_layernorm.weight.detach(),
            router=mlp.router.weight.detach(),
            router_bias=mlp.router.bias.detach(),
            gate_up=experts.gate_up_proj.detach(),
            gate_up_bias=experts.gate_up_proj_bias.detach(),
            down=experts.down_proj.detach(),
            down_bias=experts.down_proj_bias.detach(),
            window=window if layer_type == "sliding_attention" else None,
        )

    def _rope_table(self, rotary: torch.nn.Module, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (P, D) at every in-cache position, from the model's own rotary module (which gives
        one half, the rotate_half layout's two halves being equal; scaled variants as the model computes them)."""
        probe = torch.zeros(1, dtype=torch.float32, device=self.device)
        with torch.inference_mode():
            cos, sin = rotary(probe, torch.arange(positions, device=self.device)[None])  # (1, P, D / 2) each
        if cos.shape[-1] * 2 != self.head_dim:
            raise ValueError("the owned decode step does not cover this model: partial rotary dimensions")
        return torch.cat((cos[0], cos[0]), -1).to(self.dtype), torch.cat((sin[0], sin[0]), -1).to(self.dtype)

    def tune(self, max_rows: int) -> dict[str, dict[int, str]]:
        """Choose the kernel of each projection shape for 1, 2, 4, ... rows up to ``max_rows``
        (:func:`~engine.model.linear.measure`); the losers' weights are dropped."""
        buckets = row_buckets(max_rows)
        groups = {name: [getattr(layer, name) for layer in self.layers] for name in PROJECTIONS}
        groups["head"] = [self.head]
        choices = {name: measure(group, buckets) for name, group in groups.items()}
        for name, group in groups.items():
            for linear in group:
                linear.keep(choices[name])
        log.info("decode kernels per row bucket: %s", choices)
        return choices

    @torch.inference_mode()
    def __call__(self, step: CacheStep, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` (B,) fed to the step's rows at their next slot: logits (B, V) in float32."""
        masks = {}
        for window in {layer.window for layer in self.layers}:
            visible = step.attention_mask(window)  # (B, 1, 1, S)
            masks[window] = torch.zeros(visible.shape, dtype=self.dtype, device=self.device).masked_fill_(
                ~visible, float("-inf"))
        keys, values = step.row_buffers()
        logits = self.forward(tokens.to(self.device), step.slot_index, keys, values, step.kv_length, masks)
        step.write_back(keys, values)
        return logits

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, keys: list[torch.Tensor],
                values: list[torch.Tensor], length: int, masks: dict[int | None, torch.Tensor]) -> torch.Tensor:
        """The step as a function of tensors: ``tokens`` (B,) at slots ``positions`` (B,) of the rows whose
        per-layer buffers are ``keys``/``values`` (B, Hkv, P, D), attending over their first ``length`` slots
        as ``masks`` (layer window -> additive (B, 1, 1, length)) allow. Writes the new keys and values;
        returns logits (B, V) in float32."""
        B, H, Hkv, D = tokens.shape[0], self.heads, self.kv_heads, self.head_dim
        batch = torch.arange(B, device=self.device)
        rotation = torch.diag_embed(self.cos[positions]) + self.half_turn * self.sin[positions][:, None, :]  # (B, D, D)
        x = F.embedding(tokens, self.embed)  # (B, C)
        for layer, k_buf, v_buf in zip(self.layers, keys, values, strict=True):
            projected = layer.qkv(self._rms_norm(x, layer.input_norm)).to(self.dtype)  # (B, (H + 2 Hkv) D)
            qk = torch.bmm(projected[:, : (H + Hkv) * D].view(B, H + Hkv, D), rotation)  # rotated
            k_buf[batch, :, positions] = qk[:, H:]
            v_buf[batch, :, positions] = projected[:, (H + Hkv) * D :].view(B, Hkv, D)
            attended = self._attend(qk[:, :H], k_buf[:, :, :length], v_buf[:, :, :length], layer.sinks,
                                    masks[layer.window])
            x = x + layer.out(attended).to(self.dtype)
            x = x + self._experts(self._rms_norm(x, layer.post_norm), layer)
        return self.head(self._rms_norm(x, self.norm)).float()

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, sinks: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        """Grouped-query attention of ``q`` (B, H, D) over ``keys``/``values`` (B, Hkv, S, D) under the additive
        ``mask`` (B, 1, 1, S), each head's learned sink logit in its softmax. (B, H D)."""
        B, H, D = q.shape
        Hkv = keys.shape[1]
        G = H // Hkv
        # keys times the queries: the slots read in their own layout (see gemma.py)
        scores = torch.matmul(keys, q.view(B, Hkv, G, D).transpose(-1, -2)).transpose(-1, -2) * self.scale + mask
        sink = sinks.to(scores.dtype).view(1, Hkv, G, 1).expand(B, Hkv, G, 1)
        combined = torch.cat((scores, sink), dim=-1)
        combined = combined - combined.amax(dim=-1, keepdim=True)
        weights = torch.softmax(combined, dim=-1)[..., :-1].to(values.dtype)  # the sink's share takes no value
        return torch.matmul(weights, values).reshape(B, H * D)

    def _experts(self, x: torch.Tensor, layer: Layer) -> torch.Tensor:
        """The mixture of experts on ``x`` (B, C): each row's top-k experts, weighted by the softmax of their
        router logits, one expert at a time over the rows that chose it. (B, C)."""
        logits = F.linear(x, layer.router, layer.router_bias)  # (B, E)
        top, chosen = torch.topk(logits, self.top_k, dim=-1)  # (B, k)
        weights = torch.softmax(top, dim=-1)
        out = torch.zeros_like(x)
        for expert in torch.unique(chosen).tolist():
            rows, slot = torch.nonzero(chosen == expert, as_tuple=True)
            gate_up = x[rows] @ layer.gate_up[expert] + layer.gate_up_bias[expert]  # (R, 2 I)
            gate = gate_up[:, ::2].clamp(max=self.limit)
            up = gate_up[:, 1::2].clamp(min=-self.limit, max=self.limit)
            hidden = (up + 1) * gate * torch.sigmoid(gate * self.alpha)
            expert_out = hidden @ layer.down[expert] + layer.down_bias[expert]  # (R, C)
            out.index_add_(0, rows, expert_out * weights[rows, slot, None])
        return out

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """gpt-oss's RMS norm: normalised and scaled in float32, then back to ``x``'s dtype."""
        return torch.rms_norm(x.float(), weight.shape, weight.float(), self.eps).to(x.dtype)
