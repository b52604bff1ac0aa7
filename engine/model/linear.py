"""The matmuls of a decode step, each with the kernel measured fastest on this machine for its row count.

A decode step multiplies a few activation rows (one per sequence in the batch) by every weight of the
model, so its cost is reading the weights, and which kernel reads them fastest depends on the CPU and on
the number of rows. Measured on one 2-core host (ms, the embedded model's output projection, 49152 x 576):

================  ======  ======
kernel            1 row   8 rows
================  ======  ======
float32           3.2     16.7
float32, packed   3.9      7.1
bfloat16 (AMX)    2.3      4.2
int4 (Q4_1 codes) 1.0      5.4
================  ======  ======

while an AMD host without AMX gains nothing from bf16 or int4 at all (docs/performance.md). So nothing is decided by
file type: :class:`DecodeLinear` holds one copy of the weight per candidate kernel and :func:`measure` times
them on this machine, once per layer shape and row bucket (1, 2, 4, ... up to the batch limit), at start-up;
the decode step then checks the choice in whole steps against the kernels reading the fewest bytes
(:meth:`engine.model.families.llama.LlamaDecoder.tune`: a shape timed alone can sit in a large last-level cache),
and the losers' copies are dropped (:meth:`DecodeLinear.keep`).

Candidates (:func:`candidate_kernels`): on a CPU without quantization ``float32`` and ``packed`` (a
oneDNN-packed float32 copy); with int4 quantization (the embedded model's Q4_1 weights) ``int4`` (the
file's own 4-bit codes, :func:`engine.model.quantize.int4_codes`) and a bf16 copy for the decoder's layers, and
``float32``, bf16 and ``int8`` (symmetric, a scale per row) for the output projection, whose GGUF type
is Q8_0 (its kernel ``int8-rows``, :mod:`engine.model.kernels.int8_rows`, where that builds, else PyTorch's). The bf16
copy is ``bf16-packed`` (laid out once by oneDNN for its AMX / AVX-512 BF16 kernels, which a plain bf16
``F.linear`` re-lays out on every call: 1.2-2x faster at 8 and 16 rows, the same bytes) where oneDNN runs
bf16 natively, plain ``bf16`` elsewhere. Token-by-token
perplexity of 3,000 tokens (``scripts/ppl_output_kernels.py``, ``docs/results/ppl-decode-head``): 39.755
in float32, 39.772 with int4 layers and a bf16 output projection (+0.04%), 39.834 with an int8 one
(+0.20%), both within the 0.5% an output projection must keep; a 4-bit one gives 41.545 (+4.5%) and is
never a candidate. On a GPU the weights are used as they are
(``native``).
"""

from __future__ import annotations

import ctypes
import logging
import statistics
import time

import torch
import torch.nn.functional as F

from engine.model.kernels import int4_rows, int8_rows
from engine.model.quantize import INT4_GROUP, int4_codes

log = logging.getLogger(__name__)

KERNELS = ("native", "float32", "packed", "bf16", "bf16-packed", "int8", "int8-rows", "int4", "int4-rows", "int4-amx")
FOUR_BIT = ("int4", "int4-rows", "int4-amx")  # PyTorch's 4-bit kernel and ours (engine/model/kernels/int4_rows.py), same codes
# prompt chunks (many rows) run on the oneDNN-packed bf16 copy where one exists (int4 decoding on a CPU
# with native bf16): its matmuls are 3x faster than float32 at 45 rows (30 vs 90 ms over the embedded
# model's layers), a 45-token prompt prefills in 71 instead of 115 ms; perplexity of chunked prefill
# (scripts/ppl_prefill.py, docs/results/ppl-prefill, 3,000 tokens) +0.07% with chunks of 64 (39.784 vs
# 39.755 in float32), +0.15% with chunks of 256, within the 0.5% the output projection must keep. The
# 4-bit copy never runs prompt tokens: a near-tie on the reply's first token can tip on it.
PREFILL_KERNEL = "bf16-packed"
PACK_ROWS = 8  # the row count oneDNN lays packed weights out for (it serves any count; measured best near 8)
TIE_MARGIN = 0.10  # kernels within 10% of the fastest count as tied (see pick)


def candidate_kernels(device: torch.device, dtype: torch.dtype, quantize: str | None,
                      output: bool) -> tuple[str, ...]:
    """The kernels a layer may use: ``output`` is the output projection (never 4-bit). Only a float32
    model on a CPU has a choice; anything else uses its weights as they are."""
    if device.type != "cpu" or dtype != torch.float32:
        return ("native",)
    if quantize == "int4":  # float32 layers read 8x the bytes of int4 ones: they never win a real step
        bf16 = ("bf16-packed",) if packed_bf16_supported() else ("bf16",)  # packed: faster, same bytes
        own = ("int4-rows",) if int4_rows.available() else ()  # this CPU's build of our own kernels
        own += ("int4-amx",) if int4_rows.amx_available() else ()
        int8 = "int8-rows" if int8_rows.available() else "int8"  # ours where it builds: the same codes, faster
        return ("float32", *bf16, int8) if output else (*bf16, "int4", *own)
    return ("float32", "packed")


def packed_bf16_supported() -> bool:
    """Whether oneDNN runs bf16 matmuls natively here (AVX-512 BF16 or AMX): elsewhere its packed bf16
    path refuses or emulates, and plain ``bf16`` stays the only bf16 candidate."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def row_buckets(max_rows: int) -> list[int]:
    """1, 2, 4, ... up to the first power of two >= ``max_rows``."""
    buckets = [1]
    while buckets[-1] < max_rows:
        buckets.append(buckets[-1] * 2)
    return buckets


class DecodeLinear:
    """``x @ weight.T + bias`` for a few rows, with one kernel per row bucket.

    ``weight`` (N, K) is the float weight (shared, not copied, by the ``float32`` and ``native`` kernels).
    Until :meth:`tune` runs, every row count uses the first candidate.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, kernels: tuple[str, ...]) -> None:
        self.out_features, self.in_features = weight.shape
        self.bias = bias
        self.weights: dict[str, object] = {}
        codes = None  # the 4-bit codes, shared by both 4-bit kernels' layouts
        for kind in kernels:
            if kind == "int4" and self.in_features % INT4_GROUP:
                continue
            if kind in ("int4-rows", "int4-amx") and not int4_rows.supports(self.out_features, self.in_features,
                                                                             INT4_GROUP):
                continue
            if kind == "int8-rows" and not int8_rows.supports(self.out_features):
                continue
            if kind in FOUR_BIT:
                codes = codes or int4_codes(weight)
            self.weights[kind] = _prepare(kind, weight, codes)
        self.choice: dict[int, str] = {}  # row bucket -> kernel
        self.default = next(iter(self.weights))
        self._bound: dict[str, object] = {}  # kernel -> its bound callable (kernel())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (R, K) -> (R, N), in the kernel's own dtype: bf16 for the int4, int8 and bf16 kernels (so a
        bf16 product can feed the next one without a round trip through float32), else the weight's."""
        return self.kernel(x.shape[0])(x)

    def kernel(self, rows: int):
        """The kernel chosen for ``rows`` rows as one callable ``x -> x @ weight.T + bias`` (:meth:`bound`)."""
        return self.bound(self.choice.get(row_bucket(rows), self.default))

    def bound(self, kind: str):
        """Kernel ``kind`` as one callable ``x -> x @ weight.T + bias``, bound once to its weights and the ATen
        op itself: a decode step calls a few hundred of these, and looking the kernel and its weights up on
        every call cost more than some of the matmuls."""
        fn = self._bound.get(kind)
        if fn is None:
            fn = self._bound[kind] = self._bind(kind)
        return fn

    def _bind(self, kind: str):
        w, bias = self.weights[kind], self.bias
        if kind in ("native", "float32"):
            return lambda x: F.linear(x.to(w.dtype), w, bias)
        if kind == "packed":
            op = torch.ops.mkldnn._linear_pointwise.default._op
            return lambda x: op(x.float(), w, bias, "none", [], "")
        bf16 = torch.bfloat16
        if kind == "bf16-packed":
            op = torch.ops.mkldnn._linear_pointwise.default._op
            fn = lambda x: op(x.to(bf16), w, None, "none", [], "")  # noqa: E731
        elif kind == "bf16":
            fn = lambda x: F.linear(x.to(bf16), w)  # noqa: E731
        elif kind == "int8":
            op, (codes, scales) = torch.ops.aten._weight_int8pack_mm.default._op, w
            fn = lambda x: op(x.to(bf16), codes, scales)  # noqa: E731
        elif kind == "int8-rows":
            fn = int8_rows.bind(*w)
        elif kind == "int4-rows":
            fn = int4_rows.bind(*w, INT4_GROUP)
        elif kind == "int4-amx":
            fn = int4_rows.bind_amx(*w, INT4_GROUP)
        else:  # int4
            op, (packed, scales_zeros) = torch.ops.aten._weight_int4pack_mm_for_cpu.default._op, w
            fn = lambda x: op(x.to(bf16), packed, INT4_GROUP, scales_zeros)  # noqa: E731
        return fn if bias is None else (lambda x: fn(x) + bias)

    def prefill(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (T, K) -> (T, N) for prompt tokens: the bf16 copy (see :attr:`PREFILL_KERNEL`)."""
        return self.bound(PREFILL_KERNEL)(x)

    def run(self, kind: str, x: torch.Tensor) -> torch.Tensor:
        """``x`` (R, K) -> (R, N) with kernel ``kind`` (any it holds, chosen or not: tuning times them all)."""
        return self.bound(kind)(x)

    def weight_bytes(self, kind: str) -> int:
        """Bytes a matmul with ``kind`` reads (its weight copy, scales included)."""
        w = self.weights[kind]
        parts = w if isinstance(w, tuple) else (w,)
        return sum(p.numel() * p.element_size() for p in parts)

    def keep(self, choice: dict[int, str]) -> None:
        """Use ``choice`` (row bucket -> kernel) from now on and drop the weights of kernels never chosen
        (the prefill kernel's stay: prompts run on it)."""
        self.choice = dict(choice)
        self.default = choice[min(choice)]
        for kind in [k for k in self.weights if k not in choice.values() and k != PREFILL_KERNEL]:
            del self.weights[kind]
            self._bound.pop(kind, None)


def measure(layers: list[DecodeLinear], buckets: list[int], repeats: int = 7) -> dict[int, str]:
    """The fastest kernel per row bucket (:func:`pick`) for ``layers`` (one shape, e.g. every layer's QKV
    projection), each kernel timed over all of them in turn, as a decode step reads them: one layer alone
    would stay in the CPU's caches and favour the largest weights. Nothing is kept or dropped yet."""
    first = layers[0]
    choice = {}
    for rows in buckets:
        if len(first.weights) == 1:
            choice[rows] = first.default
            continue
        x = torch.randn(rows, first.in_features)  # float32: only a float32 CPU model has a choice

        times = {kind: _median_time(lambda kind=kind, x=x: _run_all(layers, kind, x), repeats)
                 for kind in first.weights}
        choice[rows] = pick(times, {kind: first.weight_bytes(kind) for kind in times})
    return choice


def fewest_bytes(layer: DecodeLinear, chosen: str) -> str:
    """The kernel of ``layer`` that reads the fewest bytes (``chosen`` where it ties for that)."""
    least = min(layer.weight_bytes(kind) for kind in layer.weights)
    return chosen if layer.weight_bytes(chosen) == least else next(
        kind for kind in layer.weights if layer.weight_bytes(kind) == least)


def pick(times: dict[str, float], weight_bytes: dict[str, int], margin: float = TIE_MARGIN) -> str:
    """The kernel reading the fewest bytes among those within ``margin`` of the fastest: tuning runs one
    shape's weights over and over, which a large last-level cache keeps warm, while a real step reads them
    between all the others, so a near-tie goes to the smaller weights."""
    fastest = min(times.values())
    close = [kind for kind, t in times.items() if t <= fastest * (1 + margin)]
    return min(close, key=lambda kind: (weight_bytes[kind], times[kind]))


def release_freed_memory() -> None:
    """Hand the weights of the kernels tuning dropped back to the OS (glibc keeps freed blocks of this size
    in its heap, which would stay in the process's RSS); a no-op where ``malloc_trim`` does not exist."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _run_all(layers: list[DecodeLinear], kind: str, x: torch.Tensor) -> None:
    for layer in layers:
        layer.run(kind, x)


def _prepare(kind: str, weight: torch.Tensor, codes: tuple[torch.Tensor, torch.Tensor] | None):
    """Kernel ``kind``'s copy of ``weight``; ``codes``: :func:`~engine.model.quantize.int4_codes` of it, computed once
    by the caller for all the 4-bit kinds (``FOUR_BIT``), None for the others."""
    weight = weight.detach()
    if kind in ("native", "float32"):
        return weight
    if kind == "packed":
        return torch.ops.mkldnn._reorder_linear_weight(weight.float(), PACK_ROWS)
    if kind == "bf16-packed":
        return torch.ops.mkldnn._reorder_linear_weight(weight.to(torch.bfloat16), PACK_ROWS)
    if kind == "bf16":
        return weight.to(torch.bfloat16).contiguous()
    if kind == "int8":  # symmetric, one scale per output row
        scales = (weight.float().abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
        int8_codes = (weight.float() / scales[:, None]).round().clamp(-127, 127).to(torch.int8)
        return int8_codes.contiguous(), scales.to(torch.bfloat16)
    if kind == "int8-rows":  # the same codes and (bf16-rounded) scales, in the kernel's layout
        return int8_rows.pack(*_prepare("int8", weight, None))
    if kind == "int4":
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes[0], 1), codes[1]
    if kind == "int4-rows":
        return int4_rows.pack(*codes)
    if kind == "int4-amx":
        return int4_rows.pack_pairs(*codes)
    raise ValueError(f"unknown kernel {kind!r}; known: {KERNELS}")


def row_bucket(rows: int) -> int:
    """The bucket (a power of two) whose tuned kernels serve ``rows`` rows."""
    return 1 << (rows - 1).bit_length()


def _median_time(fn, repeats: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
