"""Weight-only quantization for the CPU decode path.

A decode step multiplies one activation row per sequence by every weight of the model, so on a CPU its
cost is reading the weights. Two ways to read fewer bytes (``quantize=auto``, the default, picks int4 on
a CPU when the GGUF stores its decoder weights as Q4_1, see ``engine.model.loader.resolve_quantize``). The
modules below serve transformers' forward when it decodes (``--compile``, and families the owned step does
not cover); Llama-family models decode through the owned step (``engine.model.families.llama``), which builds its
kernels from the same float weights and the same 4-bit codes (:func:`int4_codes`) in
``engine.model.linear``, and then the loader leaves transformers' modules float
(``engine.model.loader.owns_int4_decode``):

``int4``
    Group-wise 4-bit weights (groups of 32 input features, a scale and a zero point per group, computed
    with bf16 activations) through PyTorch's ``_weight_int4pack_mm_for_cpu`` kernel, for the decoder's
    Linear layers. The float weights stay for large batches (prefill chunks), where a float matmul is
    faster. For a model that comes from a Q4_1 GGUF (the embedded SmolLM2), the groups are the GGUF's own
    blocks, whose minimum and maximum give back its scale and offset, so this recovers the file's 4-bit
    codes: llama.cpp's arithmetic, in PyTorch (tests/engine/test_quantize.py checks that the codes of
    Q4_1-built weights come back unchanged). For any other model it is a real 4-bit quantization.
    The output projection (``lm_head``, tied to the Q8_0 embeddings in the GGUF) stays in float32, as a
    oneDNN-packed copy for small batches (:class:`PackedLinear`; the same arithmetic, about twice as fast
    for the 8 rows of a batched decode step).
``int8``
    Dynamic int8 quantization of every Linear layer (per-channel int8 weights, activations quantized per
    batch) via ``torch.ao``; it quantizes the activations too, which costs perplexity (docs/perplexity.md).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from engine.config import QUANTIZE_MODES

INT4_GROUP = 32
INT4_MAX_ROWS = 32  # above this many rows per matmul (prefill chunks) the float weights are faster


def int4_codes(weight: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit codes of ``weight`` (N, K) in groups of ``group`` along K.

    Returns ``codes`` (N, K) int32 in 0..15 and ``scales_zeros`` (K / group, N, 2) bf16 such that
    ``weight[n, k] ~= (codes[n, k] - 8) * scale[k // group, n] + zero[k // group, n]``, the layout of
    ``torch.ops.aten._weight_int4pack_mm_for_cpu``. Codes are rounded against the stored (bf16) scale and
    zero, so the rounding of those never adds up with the rounding of the codes.
    """
    n, k = weight.shape
    if k % group:
        raise ValueError(f"{k} input features are not a multiple of the group size {group}")
    w = weight.detach().float().reshape(n, k // group, group)
    lo, hi = w.amin(-1), w.amax(-1)  # (N, G)
    scale = ((hi - lo) / 15).clamp_min(torch.finfo(torch.float32).tiny).to(torch.bfloat16)
    zero = (lo + 8 * scale.float()).to(torch.bfloat16)
    codes = ((w - zero.float()[..., None]) / scale.float()[..., None] + 8).round().clamp(0, 15)
    scales_zeros = torch.stack([scale.T, zero.T], dim=-1).contiguous()  # (G, N, 2)
    return codes.to(torch.int32).reshape(n, k), scales_zeros


def int4_dequantize(codes: torch.Tensor, scales_zeros: torch.Tensor, group: int = INT4_GROUP) -> torch.Tensor:
    """The float32 weight (N, K) that ``codes`` and ``scales_zeros`` stand for."""
    scale = scales_zeros[..., 0].float().T.repeat_interleave(group, dim=1)  # (N, K)
    zero = scales_zeros[..., 1].float().T.repeat_interleave(group, dim=1)
    return (codes.float() - 8) * scale + zero


class SmallBatchLinear(torch.nn.Module):
    """A Linear layer with a fast path for matmuls of at most ``max_rows`` rows (decode steps).

    Larger batches (prefill chunks) and ``float_weights`` use the float weights, which stay shared with the
    original layer (tied weights stay tied).
    """

    def __init__(self, linear: torch.nn.Linear, max_rows: int = INT4_MAX_ROWS) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.max_rows = max_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows > self.max_rows or not self._fast_path_available():
            return F.linear(x, self.weight, self.bias)
        out = self._few_rows(x.reshape(rows, self.in_features))
        return out.reshape(*x.shape[:-1], self.out_features)

    def _fast_path_available(self) -> bool:
        return True

    def _few_rows(self, flat: torch.Tensor) -> torch.Tensor:
        """``flat`` (rows, in_features) times the weight, plus the bias: (rows, out_features)."""
        raise NotImplementedError


class Int4Linear(SmallBatchLinear):
    """Few rows multiply with 4-bit weights (bf16 activations), many rows with the float ones."""

    def __init__(self, linear: torch.nn.Linear, group: int = INT4_GROUP, max_rows: int = INT4_MAX_ROWS) -> None:
        super().__init__(linear, max_rows)
        self.group = group
        codes, scales_zeros = int4_codes(linear.weight, group)
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1), persistent=False)
        self.register_buffer("scales_zeros", scales_zeros, persistent=False)

    def _few_rows(self, flat: torch.Tensor) -> torch.Tensor:
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat.to(torch.bfloat16), self.packed, self.group,
                                                        self.scales_zeros).to(flat.dtype)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group={self.group}, int4"


class PackedLinear(SmallBatchLinear):
    """A float32 Linear layer whose small-batch matmuls use a oneDNN-packed copy of the weight.

    A plain ``F.linear`` of a few rows against a wide weight (the 49k-row output projection) spends most of
    its time re-laying the weight out; packing it once makes a decode step's projection about twice as fast.
    """

    def __init__(self, linear: torch.nn.Linear, max_rows: int = INT4_MAX_ROWS) -> None:
        super().__init__(linear, max_rows)
        packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 8)  # tuned for 8 rows
        self.register_buffer("packed", packed, persistent=False)

    def _fast_path_available(self) -> bool:
        return not torch.compiler.is_compiling()  # inductor packs weights its own way

    def _few_rows(self, flat: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")


def quantize_int4(model: torch.nn.Module, device: torch.device, group: int = INT4_GROUP) -> torch.nn.Module:
    """In place: the decoder's Linear layers become :class:`Int4Linear`, the output projection a
    :class:`PackedLinear` (float32)."""
    if device.type != "cpu":
        raise ValueError("int4 weights run on the CPU only (a GPU decodes in bf16 already)")
    if next(model.parameters()).dtype != torch.float32:
        raise ValueError("int4 weights are built from a float32 model")
    output = model.get_output_embeddings()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear:
                continue
            if child is output:
                setattr(parent, name, PackedLinear(child))
            elif child.in_features % group == 0:
                setattr(parent, name, Int4Linear(child, group))
    return model


@contextmanager
def float_weights(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Run ``model`` on its float weights only, e.g. as the float32 baseline of a benchmark."""
    layers = [m for m in model.modules() if isinstance(m, SmallBatchLinear)]
    saved = [m.max_rows for m in layers]
    for m in layers:
        m.max_rows = -1
    try:
        yield model
    finally:
        for m, rows in zip(layers, saved, strict=True):
            m.max_rows = rows


def quantize_int8(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Dynamic int8 quantization of every Linear layer (per-channel weights, activations per batch)."""
    if device.type != "cpu":
        raise ValueError("int8 dynamic quantization runs on the CPU only")
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch marks these kernels deprecated in favour of torchao
        return quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)


def quantize(model: torch.nn.Module, mode: str | None, device: torch.device) -> torch.nn.Module:
    """Apply the configured weight quantization (``None``: leave the model as it is)."""
    if mode is None:
        return model
    if mode == "int4":
        return quantize_int4(model, device)
    if mode == "int8":
        return quantize_int8(model, device)
    raise ValueError(f"quantize must be one of {QUANTIZE_MODES} or None, got {mode!r}")
