"""The sink cache: fixed-size KV buffers holding pinned attention sinks plus a rolling window.

StreamingLLM (Xiao et al. 2023, arXiv 2309.17453): keep the first few tokens (attention sinks) and the
most recent ones; evict the middle. Memory and per-token cost stay constant however long a stream grows.

Layout and position policy (the paper's section 3.2):
- The cache is a pool of ``rows`` sequences (one per resident session) of ``capacity`` slots each, per
  layer ``k[l], v[l]``: (rows, kv_heads, capacity, head_dim), preallocated once.
- Slots hold tokens in stream order: ``pinned`` tokens first (the sinks, or a whole pinned system prompt),
  then the window, oldest first. A token's RoPE position is its slot index, never its place in the text,
  so the model never sees a distance beyond ``capacity - 1``.
- Keys are stored rotated at their slot position (as the model wrote them). Eviction drops the oldest
  ``evict_block`` window tokens at once (or more, rounded up to blocks, to fit a prompt chunk), moves the
  rest of the window down and re-rotates the moved keys by ``-evicted`` positions in float32 (angles in
  float64). A key moves at most ``window / evict_block`` times before it is evicted itself, so the rounding
  of re-rotation is bounded and does not grow with the stream (tests/engine/test_cache_exact.py proves it
  against a float64 cache that stores raw keys and rotates exactly on read).
- Rolling back (``rollback``) keeps a prefix of the row's *stream* (every token it was fed): inside the
  window it just shortens the row (the kept slots are already at the right positions); before the window
  only the pinned slots can stay (they were never moved), so the row restarts from them. ``RowState``
  holds this arithmetic, so a session that is not resident (its counters saved) answers the same
  questions. Nothing outside this module computes slots, positions or evictions.
- A forward pass that fails leaves every row as it was before it (``CacheStep.undo``): rows that had to
  evict for the step are restored from a snapshot taken before the shift (the keys, which re-rotation
  changed, and the evicted values; the moved values are moved back).

The model never sees this class's policy: each forward borrows a :class:`CacheStep` that writes the new
keys and values where the step says and returns the row's slots to attend over.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass

import torch

from engine.cache.rope import rotate_float32, rotation


def _allocate(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
    """A cache buffer and, on a CPU, the anonymous memory map behind it (zeros, backed only where written);
    elsewhere untouched device memory and None."""
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device), None
    count = math.prod(shape)
    if count == 0:
        return torch.empty(shape, dtype=dtype), None
    # private: handing a page back (MADV_DONTNEED) makes it read as zeros again, which a shared map would not
    region = mmap.mmap(-1, count * torch.empty((), dtype=dtype).element_size(),
                       flags=mmap.MAP_PRIVATE)  # anonymous: no file (fileno -1)
    return torch.frombuffer(region, dtype=dtype, count=count).view(shape), region


@dataclass(frozen=True)
class CacheShape:
    """Per-layer geometry of the model's KV cache."""

    num_layers: int
    kv_heads: int
    head_dim: int

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return self.num_layers * 2 * self.kv_heads * self.head_dim * element


@dataclass(frozen=True)
class RowState:
    """A row's counters: slots in use, slots never evicted, and tokens evicted since it was reset.

    The row's *stream* is every token fed to it: ``pinned`` tokens at slots ``0..pinned-1``, then
    ``evicted`` tokens that are gone, then the window (the rest of the slots, oldest first).
    """

    length: int
    pinned: int
    evicted: int = 0

    @property
    def stream_length(self) -> int:
        return self.length + self.evicted

    def reusable(self, shared: int, pinned: int) -> int:
        """How many stream tokens a new stream can keep that shares the first ``shared`` tokens with this
        one and pins ``pinned``: the cache must then hold exactly what feeding those tokens afresh
        (with that pinning) would have produced.

        Nothing evicted yet: any prefix (the pinning only decides future evictions). After evictions,
        with the same pinning: any prefix that ends inside the window. Otherwise only the pinned slots
        both pinnings agree on (they were never moved)."""
        shared = min(shared, self.stream_length)
        if self.evicted == 0:
            return shared
        if pinned == self.pinned and shared >= self.pinned + self.evicted:
            return shared
        return min(shared, self.pinned, pinned)


def evictions_for(length: int, pinned: int, capacity: int, block: int, new_tokens: int) -> int:
    """Window tokens to evict so ``new_tokens`` fit: whole blocks, never the pinned prefix."""
    overflow = length + new_tokens - capacity
    if overflow <= 0:
        return 0
    return min(math.ceil(overflow / block) * block, length - pinned)


def planned_evictions(length: int, pinned: int, capacity: int, block: int, new_tokens: int, chunk: int) -> int:
    """Tokens that feeding ``new_tokens`` in chunks of ``chunk`` will evict (without touching a cache)."""
    total = 0
    while new_tokens > 0:
        size = min(chunk, new_tokens)
        evict = evictions_for(length, pinned, capacity, block, size)
        length, total, new_tokens = length + size - evict, total + evict, new_tokens - size
    return total


class SinkCache:
    """A pool of fixed-size sink + window caches, one row per resident sequence."""

    def __init__(
        self,
        shape: CacheShape,
        rows: int,
        capacity: int,
        sink_tokens: int,
        evict_block: int,
        inv_freqs: list[torch.Tensor],
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        scratch_row: bool = False,
        recall_slots: int = 0,
    ) -> None:
        if sink_tokens + recall_slots >= capacity:
            raise ValueError(f"sink_tokens ({sink_tokens}) + recall_slots ({recall_slots}) must be smaller than "
                             f"the cache ({capacity})")
        self.shape = shape
        self.rows = rows
        self.capacity = capacity
        self.sink_tokens = sink_tokens
        self.evict_block = evict_block
        self.inv_freqs = inv_freqs
        self.dtype = dtype
        self.device = torch.device(device)
        # ``scratch_row``: one more row in the buffers, after the ``rows`` that sessions own, for the padding
        # rows of a decode batch padded to a bucket (engine/model/buckets.py); it has no counters and is never
        # lent, stepped, moved or evicted
        self.scratch_row: int | None = rows if scratch_row else None
        buf = (rows + int(scratch_row), shape.kv_heads, capacity, shape.head_dim)
        # Masked slots of a shorter row in a batch must hold zeros, never garbage that could turn into NaN.
        # On a CPU the buffers are anonymous memory maps: they read as zeros and the OS backs a page only
        # once it is written, so a session costs memory for the slots it uses (a 200-token conversation a
        # fifth of its 47 MB row), and zeroing a row hands its pages back (madvise). Elsewhere they are
        # allocated untouched (a fast start with a large budget) and a row is zeroed when it is first used.
        # Either way only the slots a row has used since it was last zeroed are zeroed again (``dirty``).
        self._row_bytes = shape.kv_heads * capacity * shape.head_dim * torch.empty((), dtype=dtype).element_size()
        keys = [_allocate(buf, dtype, self.device) for _ in range(shape.num_layers)]
        values = [_allocate(buf, dtype, self.device) for _ in range(shape.num_layers)]
        self.k, self._k_maps = [t for t, _ in keys], [m for _, m in keys]
        self.v, self._v_maps = [t for t, _ in values], [m for _, m in values]
        self.lengths = [0] * rows  # slots in use
        self.pinned = [sink_tokens] * rows  # slots never evicted
        self.evicted = [0] * rows  # tokens evicted from the row since it was reset
        # recall (engine/cache/recall.py): ``recall_slots`` slots per row reserved for a segment of recalled
        # blocks between the pinned slots and the window; ``reserved[row]`` of them are still free (the window
        # never grows into them), and ``on_evict(row, stream_start, first_slot, count)`` sees each eviction
        # before it happens. With no recall (the default) nothing is reserved and nothing is called.
        self.recall_slots = recall_slots
        self.reserved = [recall_slots] * rows
        self.on_evict = None
        # per row: slots [dirty:] hold zeros; None until the row is first zeroed (then any slot may be garbage)
        zeros = self.device.type == "cpu"
        self.dirty: list[int | None] = [0 if zeros else None] * rows
        self._rotations: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}  # (layer, shift) -> cos, sin
        if scratch_row and not zeros:  # untouched device memory: no garbage (NaN) for the padding rows to read
            for buffer in (*self.k, *self.v):
                buffer[rows].zero_()

    # ----- bookkeeping -------------------------------------------------------------------------------
    @property
    def bytes_per_row(self) -> int:
        return self.capacity * self.shape.bytes_per_token(self.dtype)

    def row_bytes_used(self, row: int) -> int:
        return self.lengths[row] * self.shape.bytes_per_token(self.dtype)

    def reset(self, row: int, pinned: int | None = None) -> None:
        """Empty a row; ``pinned`` slots (default: the sink tokens) will never be evicted."""
        pinned = self.sink_tokens if pinned is None else pinned
        if pinned >= self.capacity:
            raise ValueError(f"{pinned} pinned tokens leave no room for a window in a cache of {self.capacity}")
        self._zero(row)
        self.lengths[row], self.pinned[row], self.evicted[row] = 0, pinned, 0
        self.reserved[row] = self.recall_slots

    def state(self, row: int) -> RowState:
        return RowState(self.lengths[row], self.pinned[row], self.evicted[row])

    def max_chunk(self, row: int) -> int:
        """The most tokens one forward pass can feed to ``row``: its window."""
        return self._window_end(row) - self.pinned[row]

    def _window_end(self, row: int) -> int:
        """The slots the row may fill: the capacity less the recall slots still reserved (none without recall)."""
        return self.capacity - self.reserved[row]

    def planned_evictions(self, row: int, new_tokens: int, chunk: int) -> int:
        """Tokens that feeding ``new_tokens`` to ``row`` in chunks of ``chunk`` will evict (nothing moves)."""
        return planned_evictions(self.lengths[row], self.pinned[row], self._window_end(row), self.evict_block,
                                 new_tokens, chunk)

    def _zero(self, row: int) -> None:
        used = self.capacity if self.dirty[row] is None else self.dirty[row]
        if used:
            whole_pages = self._row_bytes % mmap.PAGESIZE == 0 and hasattr(mmap, "MADV_DONTNEED")
            for buffers, maps in ((self.k, self._k_maps), (self.v, self._v_maps)):
                for buf, region in zip(buffers, maps, strict=True):
                    if region is not None and whole_pages:  # the row's pages go back to the OS, reading as zeros
                        region.madvise(mmap.MADV_DONTNEED, row * self._row_bytes, self._row_bytes)
                    else:
                        buf[row, :, :used].zero_()
        self.dirty[row] = 0

    def _touch(self, row: int) -> None:
        """Record that the row's slots up to its length may now hold data (see ``dirty``)."""
        self.dirty[row] = max(self.dirty[row], self.lengths[row])

    # ----- eviction ----------------------------------------------------------------------------------
    def make_room(self, row: int, new_tokens: int) -> int:
        """Evict whole blocks from the window until ``new_tokens`` fit; returns how many were evicted."""
        evict = self._evictions(row, new_tokens)
        if evict:
            self._shift_window(row, evict)
        return evict

    def _evictions(self, row: int, new_tokens: int) -> int:
        """Window tokens ``make_room`` must evict so ``new_tokens`` fit (ValueError if they never can)."""
        length, pinned, end = self.lengths[row], self.pinned[row], self._window_end(row)
        if new_tokens > end - pinned:
            raise ValueError(f"{new_tokens} tokens do not fit a window of {end - pinned}")
        return evictions_for(length, pinned, end, self.evict_block, new_tokens)

    def _shift_window(self, row: int, evict: int) -> None:
        length, pinned = self.lengths[row], self.pinned[row]
        keep = length - pinned - evict  # window tokens that stay
        if self.on_evict is not None:
            self.on_evict(row, pinned + self.evicted[row], pinned, evict)
        if keep > 0:
            src, dst = slice(pinned + evict, length), slice(pinned, pinned + keep)
            for layer in range(self.shape.num_layers):
                cos, sin = self._rotation(layer, -evict)
                moved = self.k[layer][row, :, src]  # (H, keep, D)
                self.k[layer][row, :, dst] = rotate_float32(moved, cos, sin)
                self.v[layer][row, :, dst] = self.v[layer][row, :, src].clone()  # src and dst overlap
        self.lengths[row] = length - evict
        self.evicted[row] += evict

    def _rotation(self, layer: int, shift: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of a re-rotation by ``shift`` positions, built once per layer and shift (angles in
        float64 on the host, then kept on the cache's device: no per-eviction host work or copies)."""
        key = (layer, shift)
        if key not in self._rotations:
            self._rotations[key] = rotation(self.inv_freqs[layer], shift, torch.float32, self.device)
        return self._rotations[key]

    def rollback(self, row: int, keep: int, pinned: int | None = None) -> None:
        """Keep the first ``keep`` tokens of the row's stream and pin ``pinned`` slots from now on (default:
        unchanged). ``keep`` must be what :meth:`RowState.reusable` allows for that pinning."""
        state = self.state(row)
        pinned = state.pinned if pinned is None else pinned
        if pinned >= self.capacity:
            raise ValueError(f"{pinned} pinned tokens leave no room for a window in a cache of {self.capacity}")
        if not 0 <= keep <= state.stream_length or state.reusable(keep, pinned) != keep:
            raise ValueError(f"cannot keep {keep} tokens of {state} pinning {pinned}")
        if keep == 0:
            self.reset(row, pinned)
        elif state.evicted and keep < state.pinned + state.evicted:  # back to the never-moved pinned slots
            self.lengths[row], self.evicted[row], self.pinned[row] = keep, 0, pinned
        else:
            self.lengths[row], self.pinned[row] = keep - state.evicted, pinned

    # ----- moving rows -------------------------------------------------------------------------------
    def export_row(self, row: int, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """The row's used slots as tensors, (layers, kv_heads, length, head_dim), plus its counters."""
        n = self.lengths[row]
        return {
            "k": torch.stack([k[row, :, :n] for k in self.k]).to(device, copy=True),
            "v": torch.stack([v[row, :, :n] for v in self.v]).to(device, copy=True),
            "meta": torch.tensor([n, self.pinned[row], self.evicted[row]], dtype=torch.int64),
        }

    def import_row(self, row: int, state: dict[str, torch.Tensor]) -> None:
        n, pinned, evicted = (int(x) for x in state["meta"])
        layers, heads, _, head_dim = state["k"].shape
        if n > self.capacity or (layers, heads, head_dim) != (self.shape.num_layers, self.shape.kv_heads, self.shape.head_dim):
            raise ValueError("saved cache does not match this model or cache size")
        self._zero(row)
        for layer in range(self.shape.num_layers):
            self.k[layer][row, :, :n] = state["k"][layer].to(self.device, self.dtype)
            self.v[layer][row, :, :n] = state["v"][layer].to(self.device, self.dtype)
        self.lengths[row], self.pinned[row], self.evicted[row] = n, pinned, evicted
        self.reserved[row] = self.recall_slots
        self._touch(row)

    def copy_row(self, src: int, dst: int) -> None:
        """Make ``dst`` an exact copy of ``src`` (a conversation branching off another)."""
        n = self.lengths[src]
        self._zero(dst)
        for buffers in (self.k, self.v):
            for buf in buffers:
                buf[dst, :, :n] = buf[src, :, :n]
        self.lengths[dst], self.pinned[dst], self.evicted[dst] = n, self.pinned[src], self.evicted[src]
        self.reserved[dst] = self.reserved[src]
        self._touch(dst)

    def swap_rows(self, a: int, b: int) -> None:
        """Exchange two rows (the scheduler keeps decoding rows contiguous so a batch is a view)."""
        if a == b:
            return
        # only the slots either row has used since it was zeroed move (beyond them both rows hold zeros): a
        # session of 200 tokens in a 1,024-slot cache moves a fifth of the bytes (the scheduler swaps rows
        # as requests come and go). A row never zeroed may hold garbage anywhere: then every slot moves.
        dirty = (self.dirty[a], self.dirty[b])
        used = self.capacity if None in dirty else max(dirty)
        for buffers in (self.k, self.v):
            for buf in buffers:
                tmp = buf[a, :, :used].clone()
                buf[a, :, :used] = buf[b, :, :used]
                buf[b, :, :used] = tmp
        for counters in (self.lengths, self.pinned, self.evicted, self.dirty, self.reserved):
            counters[a], counters[b] = counters[b], counters[a]

    # ----- one forward pass --------------------------------------------------------------------------
    def step(self, rows: list[int], new_tokens: int) -> CacheStep:
        """Reserve ``new_tokens`` slots in each row (evicting if needed) for one forward pass."""
        undo = []
        for row in rows:
            if self.dirty[row] is None:
                self._zero(row)
            evict = self._evictions(row, new_tokens)
            undo.append((row, self.state(row), self._snapshot(row, evict) if evict else None))
            if evict:
                self._shift_window(row, evict)
        step = CacheStep(self, rows, [self.lengths[r] for r in rows], new_tokens, undo)
        for row in rows:
            self.lengths[row] += new_tokens
            self._touch(row)
        return step

    def _snapshot(self, row: int, evict: int) -> tuple[int, list[torch.Tensor], list[torch.Tensor]]:
        """What undoing an eviction of ``evict`` window tokens needs, copied before it happens: the window's
        keys (re-rotation changes them) and the evicted values (the others only move)."""
        n, pinned = self.lengths[row], self.pinned[row]
        return (evict, [k[row, :, pinned:n].clone() for k in self.k],
                [v[row, :, pinned : pinned + evict].clone() for v in self.v])

    def _restore(self, row: int, state: RowState, snapshot) -> None:
        if snapshot is not None:
            evict, keys, values = snapshot
            pinned, length = state.pinned, state.length
            keep = length - pinned - evict
            for layer in range(self.shape.num_layers):
                self.k[layer][row, :, pinned:length] = keys[layer]
                v = self.v[layer][row]  # (H, capacity, D)
                if keep > 0:  # the kept values back where they were, then the evicted ones before them
                    v[:, pinned + evict : length] = v[:, pinned : pinned + keep].clone()
                v[:, pinned : pinned + evict] = values[layer]
        self.lengths[row], self.pinned[row], self.evicted[row] = state.length, state.pinned, state.evicted


class CacheStep:
    """The cache as one forward pass sees it: transformers' attention calls ``update`` per layer."""

    def __init__(self, cache: SinkCache, rows: list[int], offsets: list[int], new_tokens: int, undo=()) -> None:
        self.cache = cache
        self._undo = list(undo)  # (row, state before the step, snapshot if it evicted)
        self.rows = rows
        self.offsets = offsets  # first new slot of each row = the new tokens' first position
        # each row's pinned slots and the tokens evicted from between them and its window (after this step's
        # eviction): what tells a slot's place in the text (:meth:`text_positions`)
        self.pinned = [cache.pinned[r] for r in rows]
        self.evicted = [cache.evicted[r] for r in rows]
        self.new_tokens = new_tokens
        self.kv_length = max(offsets) + new_tokens
        contiguous = rows == list(range(rows[0], rows[0] + len(rows)))
        self._row_slice = slice(rows[0], rows[0] + len(rows)) if contiguous else None
        self._row_index = _to_device(rows, cache.device)  # (B,)
        self._slot_index = _to_device(offsets, cache.device)  # (B,)

    def undo(self) -> None:
        """Put every row back as it was before this step (the forward pass failed)."""
        for row, state, snapshot in self._undo:
            self.cache._restore(row, state, snapshot)
        self._undo = []

    def row_buffers(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per layer the step's rows of the key and value buffers, (B, H, capacity, D): views when the rows
        are contiguous (writes land in the cache), else gathered copies that :meth:`write_back` stores."""
        if self._row_slice is not None:
            return [k[self._row_slice] for k in self.cache.k], [v[self._row_slice] for v in self.cache.v]
        return [k[self._row_index] for k in self.cache.k], [v[self._row_index] for v in self.cache.v]

    def write_back(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Store the new slots written into gathered :meth:`row_buffers` (nothing to do for views)."""
        if self._row_slice is not None:
            return
        batch = torch.arange(len(self.rows), device=self.cache.device)
        for layer in range(self.cache.shape.num_layers):
            for buf, rows in ((self.cache.k[layer], keys[layer]), (self.cache.v[layer], values[layer])):
                for t in range(self.new_tokens):
                    buf[self._row_index, :, self._slot_index + t] = rows[batch, :, self._slot_index + t]

    @property
    def row_index(self) -> torch.Tensor:
        """The step's rows (B,) on the cache's device: which row of the buffers (``cache.k``, ``cache.v``)
        each batch row is."""
        return self._row_index

    @property
    def slot_index(self) -> torch.Tensor:
        """Each row's first new slot (= the first new token's position), (B,) on the cache's device."""
        return self._slot_index

    def position_ids(self) -> torch.Tensor:
        """In-cache positions of the new tokens, (B, T)."""
        base = self._slot_index[:, None]  # (B, 1)
        return base + torch.arange(self.new_tokens, device=base.device)[None, :]

    def text_positions(self) -> torch.Tensor:
        """Each slot's place in its row's stream, (B, S): a pinned slot's is its index, a window slot's its
        index plus the tokens evicted before it."""
        device = self._slot_index.device
        slots = torch.arange(self.kv_length, device=device)[None]  # (1, S)
        pinned, evicted = (_to_device(values, device)[:, None] for values in (self.pinned, self.evicted))
        return slots + evicted * (slots >= pinned)

    def attention_mask(self, window: int | None = None) -> torch.Tensor:
        """Boolean (B, 1, T, S): query t of row b sees every slot up to its own (sinks included).

        ``window``: the rule of a sliding-window layer, which sees only the last ``window`` tokens of the
        text (itself included), as the model was trained: a slot is visible when it is at most ``window - 1``
        tokens back *in the text*, so once the row has evicted, the sinks (far back in the text) are hidden
        and the layer never sees further back than its window, whatever the cache holds. Within the window
        the slots are contiguous in the text, so their in-cache distances are the text distances and such a
        layer attends exactly as over the uncut text while the cache's window holds its last ``window``
        tokens."""
        slots = torch.arange(self.kv_length, device=self._slot_index.device)  # (S,)
        last_visible = self.position_ids()[:, :, None]  # (B, T, 1)
        visible = slots[None, None, :] <= last_visible  # (B, T, S)
        if window is not None:
            text = self.text_positions()  # (B, S)
            query_text = text.gather(1, last_visible[:, :, 0])  # (B, T): the new tokens' places in the text
            visible &= query_text[:, :, None] - text[:, None, :] < window
        return visible[:, None]

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Store the new keys/values (B, H, T, D); return the rows' slots (B, H, S, D) to attend over."""
        k_buf, v_buf = self.cache.k[layer_idx], self.cache.v[layer_idx]
        if len(self.rows) == 1:
            row, off = self.rows[0], self.offsets[0]
            k_buf[row, :, off : off + self.new_tokens] = key[0]
            v_buf[row, :, off : off + self.new_tokens] = value[0]
        elif self.new_tokens == 1:
            k_buf[self._row_index, :, self._slot_index] = key[:, :, 0]  # (B, H, D)
            v_buf[self._row_index, :, self._slot_index] = value[:, :, 0]
        else:
            for i, (row, off) in enumerate(zip(self.rows, self.offsets, strict=True)):
                k_buf[row, :, off : off + self.new_tokens] = key[i]
                v_buf[row, :, off : off + self.new_tokens] = value[i]
        if self._row_slice is not None:
            return k_buf[self._row_slice, :, : self.kv_length], v_buf[self._row_slice, :, : self.kv_length]
        return k_buf[self._row_index, :, : self.kv_length], v_buf[self._row_index, :, : self.kv_length]

    # transformers' Cache API bits that model code may query
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.kv_length - self.new_tokens

    @property
    def is_compileable(self) -> bool:
        return False


def _to_device(values: list[int], device: torch.device) -> torch.Tensor:
    """A small index list as a tensor on ``device``: on a GPU through pinned memory without blocking."""
    if device.type != "cuda":
        return torch.tensor(values, device=device)
    return torch.tensor(values).pin_memory().to(device, non_blocking=True)
