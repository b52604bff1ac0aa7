"""A decode step's attention over the sink cache's float32 rows, in one C call per layer.

PyTorch's path for a decode step is a scatter of the new keys and values into each row's slot
(``index_put_``), an additive mask (rows of different lengths) and ``scaled_dot_product_attention``, whose
CPU kernel is built for long queries: in blocks, through small GEMMs. A decode query is G heads of one token
per key/value head, so that is mostly overhead. Profiled in whole steps of the embedded model on a 2-core
Xeon, at 264 slots: 2.3 ms of the 1-row step and 9.7 ms of the 8-row step were attention, plus 1.3 ms of
scatters at 8 rows. This kernel (``kernels/decode_attention.c``) writes the new key and value into the slot
and attends in the same call, each key and value read once for the G query heads that share it, an online
softmax over blocks of 64 slots (as flash attention), parallel over rows and key/value heads, and over parts
of the slots where that leaves a thread idle (one row). It reads the rows in place wherever they are in the
cache (by row index): no gathered copy of rows that are not contiguous, and no mask.

Built at start for the running CPU (:mod:`engine.model.kernels.native`); where it cannot be, or the cache is not float32
on the CPU, :class:`~engine.model.families.llama.LlamaDecoder` keeps PyTorch's path, which stays the reference
(tests/engine/test_decode_attention.py compares them on random rows, lengths and layouts).
"""

from __future__ import annotations

import ctypes

import torch

from engine.model.kernels import native

MAX_GROUP = 16  # query heads per key/value head (kernels/decode_attention.c: MAX_G)
SIGNATURE = (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int64] * 3 + [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2
             + [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 4 + [ctypes.c_float, ctypes.c_int])
MAX_HEAD_DIM = 256


# library(): the kernel built for this CPU, once; build(march): for another (native.loader)
library, build = native.loader("decode_attention", {"decode_attention": SIGNATURE})


def supports(device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int) -> bool:
    """Whether the kernel can run a model of this shape over a cache of this device and dtype (and was built)."""
    return (device.type == "cpu" and dtype == torch.float32 and heads % kv_heads == 0
            and heads // kv_heads <= MAX_GROUP and head_dim % 8 == 0 and head_dim <= MAX_HEAD_DIM
            and library() is not None)


class DecodeAttention:
    """The kernel for one step's rows: ``rows`` (B,) int64, which row of the layer buffers each batch row is,
    and ``slots`` (B,) int64, its new slot (it attends over slots ``0..slots[b]``). Called once per layer."""

    def __init__(self, heads: int, kv_heads: int, head_dim: int, rows: torch.Tensor, slots: torch.Tensor,
                 lib: ctypes.CDLL | None = None) -> None:
        self.fn = (lib or library()).decode_attention
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.rows, self.slots = rows.to(torch.int64).contiguous(), slots.to(torch.int64).contiguous()
        self.batch = self.rows.shape[0]
        # the kernel writes at these: checked against each layer's buffers
        self.last_row, self.last_slot = int(self.rows.max()), int(self.slots.max())
        self.scale, self.threads = head_dim**-0.5, torch.get_num_threads()

    def __call__(self, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_buf: torch.Tensor,
                 v_buf: torch.Tensor) -> torch.Tensor:
        """``q`` (B, H, D), ``k_new``/``v_new`` (B, Hkv, D) (each row's heads contiguous, rows strided),
        ``k_buf``/``v_buf`` the layer's whole buffers (rows, Hkv, P, D), written at the rows' slots.
        Returns the attended values (B, H D) float32."""
        B, H, Hkv, D = self.batch, self.heads, self.kv_heads, self.head_dim
        q, k_new, v_new = (_rows_of(t, heads) for t, heads in ((q, H), (k_new, Hkv), (v_new, Hkv)))
        if (k_buf.stride() != v_buf.stride() or k_buf.shape != v_buf.shape or k_buf.stride()[2:] != (D, 1)
                or k_buf.dtype != torch.float32 or v_buf.dtype != torch.float32 or k_buf.shape[1] != Hkv
                or self.last_row >= k_buf.shape[0] or self.last_slot >= k_buf.shape[2]):
            raise ValueError(f"decode attention: buffers {tuple(k_buf.shape)} strides {k_buf.stride()} "
                             f"{k_buf.dtype} for rows up to {self.last_row} and slots up to {self.last_slot}")
        out = torch.empty((B, H * D), dtype=torch.float32)
        status = self.fn(q.data_ptr(), q.stride(0), k_new.data_ptr(), k_new.stride(0), v_new.data_ptr(),
                         v_new.stride(0), k_buf.data_ptr(), v_buf.data_ptr(), k_buf.stride(0), k_buf.stride(1),
                         self.rows.data_ptr(), self.slots.data_ptr(), out.data_ptr(), B, Hkv, H // Hkv, D,
                         self.scale, self.threads)
        if status:
            raise ValueError(f"decode attention: unsupported shape H={H}, Hkv={Hkv}, D={D}")
        return out


def _rows_of(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``t`` (B, heads, D) float32 whose heads lie contiguous within each row (rows may be strided)."""
    if t.dtype != torch.float32:
        t = t.float()
    if t.stride(-1) != 1 or t.stride(-2) != t.shape[-1]:
        t = t.contiguous()
    return t
