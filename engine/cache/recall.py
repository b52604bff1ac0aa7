"""Recall: evicted blocks kept on the host and the most relevant ones spliced back into the sink cache.

A sink cache forgets what it evicts. :class:`Recall` keeps it: each block of evicted keys and values goes,
with its keys un-rotated (RoPE undone, in float32 with angles in float64), to a per-row
:class:`RecallStore` in host memory, bounded by a token budget (the oldest blocks are dropped first and
counted). Beside each block stays a summary per layer and kv head: the per-channel minimum and maximum of
its keys (Quest, Tang et al. 2024, arXiv 2406.10774) and their mean (InfLLM's representative, Xiao et al.
2024, arXiv 2402.04617).

At the start of a turn the new message's queries (per layer, before RoPE: :func:`capture_queries`) score
the stored blocks. ``attention`` (the default): the softmax attention each query would give every stored
token (keys and queries both without RoPE, i.e. at distance 0: the segment puts every recalled block at
one place), summed per block, its largest share over the layer's kv heads and queries (``aggregate="max"``: the heads
that retrieve) averaged over the layers, an exact search over the
host keys as in RetrievalAttention (Liu et al. 2024, arXiv 2409.10516); ``quest``: the upper bound of
``q . k`` over the block from its minimum and maximum keys; ``mean``: ``q . mean key``; the last two are
turned per layer, kv head and query into a softmax over the blocks and reduced the same way. The ``blocks`` best
blocks are spliced, in stream order, into the row's recall segment: slots ``[pinned - recalled,
pinned)``, between the sinks (and any pinned prompt) and the window. Their keys are rotated to those
in-cache slot positions, so RoPE never sees a distance beyond the cache. The window keeps its tokens; it
moves by the change of the segment's size with its keys re-rotated like an eviction's
(:meth:`~engine.cache.sink.SinkCache._shift_window`).

Bookkeeping. The cache reserves ``recall_slots`` slots per row (``SinkCache(recall_slots=...)``); the free
part of the reservation is ``cache.reserved[row]``, so the window never grows into the segment. A
spliced segment counts as pinned slots (never evicted) and its tokens are subtracted from the row's
``evicted`` counter, so ``pinned + evicted`` is still the stream index of the window's first token and
``length + evicted`` the stream's length. :meth:`Recall.clear` drops the segment (before a row is
exported, rolled back or handed to another session).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

from engine.cache.rope import rotate, rotate_float32
from engine.cache.sink import SinkCache

log = logging.getLogger(__name__)

SCORES = ("attention", "quest", "mean")
AGGREGATES = ("max", "mean")  # over a layer's kv heads and queries


def position_rotation(inv_freq: torch.Tensor, positions: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (n, rot_dim) of the angles ``positions * inv_freq`` (float64), as float32 on ``device``."""
    angle = positions.to(torch.float64)[:, None] * inv_freq.to(torch.float64)[None, :]
    angle = torch.cat([angle, angle], dim=-1)
    return angle.cos().to(device, torch.float32), angle.sin().to(device, torch.float32)


def rotate_positions(keys: torch.Tensor, inv_freq: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``keys`` (H, n, D) rotated by ``positions`` (n,) each (negative positions undo a rotation), float32."""
    cos, sin = position_rotation(inv_freq, positions, keys.device)
    return rotate(keys.float(), cos, sin)


@dataclass
class Block:
    """One evicted block: keys un-rotated (float32), values as stored, and the summaries of its keys."""

    start: int  # stream index of its first token
    keys: torch.Tensor  # (L, H, n, D) float32, RoPE undone
    values: torch.Tensor  # (L, H, n, D)
    key_min: torch.Tensor  # (L, H, D)
    key_max: torch.Tensor
    key_mean: torch.Tensor

    @property
    def tokens(self) -> int:
        return self.keys.shape[2]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.key_min, self.key_max,
                                                         self.key_mean))


class RecallStore:
    """A session's evicted blocks in host memory, oldest first, bounded by ``budget_tokens``."""

    def __init__(self, budget_tokens: int = 16384) -> None:
        self.budget_tokens = budget_tokens
        self.blocks: OrderedDict[int, Block] = OrderedDict()
        self.dropped_blocks = 0
        self.dropped_tokens = 0

    @property
    def tokens(self) -> int:
        return sum(b.tokens for b in self.blocks.values())

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.blocks.values())

    def add(self, block: Block) -> None:
        """Keep ``block`` (replacing one with the same start, as when an undone step evicts again); drop the
        oldest blocks while over budget."""
        self.blocks.pop(block.start, None)
        self.blocks[block.start] = block
        self.blocks = OrderedDict(sorted(self.blocks.items()))
        while self.blocks and self.tokens > self.budget_tokens:
            _, old = self.blocks.popitem(last=False)
            self.dropped_blocks += 1
            self.dropped_tokens += old.tokens

    def clear(self) -> None:
        self.blocks.clear()


class Recall:
    """Keeps what ``cache`` evicts and splices the best blocks back at the start of each turn.

    ``blocks``: the recall segment's size in blocks of ``cache.evict_block`` tokens (the cache must reserve
    ``blocks * evict_block`` slots, ``SinkCache(recall_slots=...)``); ``budget_tokens``: host store bound per
    row; ``score``: ``attention``, ``quest`` or ``mean``; ``layers``: the layers whose queries score (None: all);
    ``query_tokens``: the last so many tokens of the message score (None: all of them).
    """

    def __init__(self, cache: SinkCache, blocks: int = 4, budget_tokens: int = 16384, score: str = "attention",
                 layers: list[int] | None = None, query_tokens: int | None = None, aggregate: str = "max") -> None:
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {score!r}")
        if aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
        if cache.recall_slots < blocks * cache.evict_block:
            raise ValueError(f"{blocks} recall blocks need {blocks * cache.evict_block} reserved slots, the cache "
                             f"reserves {cache.recall_slots}")
        self.cache = cache
        self.blocks = blocks
        self.budget_tokens = budget_tokens
        self.score_kind = score
        self.layers = list(range(cache.shape.num_layers)) if layers is None else list(layers)
        self.query_tokens = query_tokens
        self.aggregate = aggregate
        self.stores: dict[int, RecallStore] = {}
        self.segments: dict[int, list[int]] = {}  # row -> starts of the spliced blocks, stream order
        self.recalled_tokens: dict[int, int] = {}  # row -> tokens spliced at its latest turn start
        self.counters = {"turns": 0, "recalled_blocks": 0, "recalled_tokens": 0, "seconds": 0.0}
        cache.on_evict = self._evicted

    # ----- keeping what is evicted ---------------------------------------------------------------------
    def store(self, row: int) -> RecallStore:
        if row not in self.stores:
            self.stores[row] = RecallStore(self.budget_tokens)
        return self.stores[row]

    def _evicted(self, row: int, stream_start: int, first_slot: int, count: int) -> None:
        """The cache's ``on_evict``: copy the ``count`` tokens at ``first_slot..`` to the host, block by block."""
        cache, block = self.cache, cache_block(self.cache)
        for offset in range(0, count, block):
            n = min(block, count - offset)
            slots = slice(first_slot + offset, first_slot + offset + n)
            positions = torch.arange(slots.start, slots.stop)
            keys = torch.stack([rotate_positions(cache.k[layer][row, :, slots], cache.inv_freqs[layer], -positions)
                                for layer in range(cache.shape.num_layers)]).cpu()
            values = torch.stack([cache.v[layer][row, :, slots] for layer in range(cache.shape.num_layers)]).to(
                "cpu", copy=True)
            self.store(row).add(Block(stream_start + offset, keys, values, keys.amin(2), keys.amax(2), keys.mean(2)))

    # ----- scoring -------------------------------------------------------------------------------------
    def scores(self, row: int, queries: list[torch.Tensor], aggregate: str | None = None) -> tuple[list[int], torch.Tensor]:
        """The stored blocks' starts and their relevance to ``queries`` (per layer (Hq, T, D), before RoPE):
        per layer the block's share for each kv head and query, reduced by ``aggregate`` (default: the
        instance's; ``max``: the head and query that favour it most), averaged over the layers."""
        aggregate = aggregate or self.aggregate
        store = self.store(row)
        starts = list(store.blocks)
        if not starts:
            return [], torch.zeros(0)
        blocks = list(store.blocks.values())
        total = torch.zeros(len(starts), dtype=torch.float64)
        for layer in self.layers:
            q = queries[layer].float().cpu()
            if self.query_tokens:
                q = q[:, -self.query_tokens :]
            heads, tokens, dim = q.shape
            kv = self.cache.shape.kv_heads
            q = q.reshape(kv, heads // kv * tokens, dim)  # (H, G*T, D): a kv head's group of query heads
            if self.score_kind == "attention":  # the attention each query would give every stored token, per block
                keys = torch.cat([b.keys[layer] for b in blocks], dim=1)  # (H, N, D)
                weights = torch.softmax(torch.einsum("hqd,hnd->hqn", q, keys) / dim**0.5, dim=-1)
                sizes = [b.tokens for b in blocks]
                share = torch.stack([part.sum(-1) for part in weights.split(sizes, dim=-1)])  # (blocks, H, G*T)
            else:
                if self.score_kind == "quest":
                    hi = torch.stack([b.key_max[layer] for b in blocks])  # (N, H, D)
                    lo = torch.stack([b.key_min[layer] for b in blocks])
                    bound = (torch.einsum("hqd,nhd->nhq", q.clamp(min=0), hi)
                             + torch.einsum("hqd,nhd->nhq", q.clamp(max=0), lo))
                else:
                    bound = torch.einsum("hqd,nhd->nhq", q, torch.stack([b.key_mean[layer] for b in blocks]))
                share = torch.softmax(bound / dim**0.5, dim=0)  # per kv head and query: a distribution over blocks
            reduced = share.flatten(1).amax(1) if aggregate == "max" else share.mean(dim=(1, 2))
            total += reduced.double()
        return starts, total / len(self.layers)

    def choose(self, row: int, queries: list[torch.Tensor]) -> list[int]:
        """Starts of the blocks to splice (stream order): the best ``blocks`` that fit the segment."""
        starts, scores = self.scores(row, queries)
        store, chosen, used = self.store(row), [], 0
        for index in torch.argsort(scores, descending=True).tolist():
            n = store.blocks[starts[index]].tokens
            if len(chosen) < self.blocks and used + n <= self.cache.recall_slots:
                chosen.append(starts[index])
                used += n
        return sorted(chosen)

    # ----- splicing ------------------------------------------------------------------------------------
    def before_turn(self, row: int, queries: list[torch.Tensor]) -> int:
        """Score the row's evicted blocks against a new message's queries and splice the best into the recall
        segment; returns the tokens recalled (0 when nothing was evicted yet)."""
        started = time.perf_counter()
        chosen = self.choose(row, queries) if self.store(row).blocks else []
        self.splice(row, chosen)
        recalled = sum(self.store(row).blocks[s].tokens for s in chosen)
        self.recalled_tokens[row] = recalled
        self.counters["turns"] += 1
        self.counters["recalled_blocks"] += len(chosen)
        self.counters["recalled_tokens"] += recalled
        self.counters["seconds"] += time.perf_counter() - started
        return recalled

    def turn(self, model: torch.nn.Module, row: int, tokens: list[int]) -> int:
        """The start of a turn: the new message ``tokens`` (about to be prefilled into ``row``) choose the
        blocks to recall; returns the tokens recalled (what ``x-sinkserve-recalled-tokens`` reports)."""
        if not tokens or not self.store(row).blocks:
            self.recalled_tokens[row] = 0
            return 0
        return self.before_turn(row, capture_queries(model, self.cache, row, tokens))

    def clear(self, row: int) -> None:
        """Drop the row's recall segment (the window moves back next to the pinned slots)."""
        self.splice(row, [])

    def forget(self, row: int) -> None:
        """Drop the row's segment and its store (the row is reset or given to another session)."""
        self.clear(row)
        self.stores.pop(row, None)
        self.recalled_tokens.pop(row, None)

    def swap_rows(self, a: int, b: int) -> None:
        """Follow :meth:`SinkCache.swap_rows`: the rows' stores, segments and counters change places too."""
        for table in (self.stores, self.segments, self.recalled_tokens):
            va, vb = table.pop(a, None), table.pop(b, None)
            if va is not None:
                table[b] = va
            if vb is not None:
                table[a] = vb

    def copy_row(self, src: int, dst: int) -> None:
        """Follow :meth:`SinkCache.copy_row` (a branching conversation): ``dst`` gets a copy of ``src``'s store
        (the blocks themselves are shared: they are never written) and segment."""
        store = RecallStore(self.budget_tokens)
        store.blocks = OrderedDict(self.store(src).blocks)
        self.stores[dst] = store
        self.segments[dst] = list(self.segments.get(src, []))

    def splice(self, row: int, starts: list[int]) -> None:
        """Make the row's recall segment hold the stored blocks starting at ``starts``, in that order."""
        cache, store = self.cache, self.store(row)
        old = cache.recall_slots - cache.reserved[row]  # tokens in the segment now
        blocks = [store.blocks[s] for s in starts]
        new = sum(b.tokens for b in blocks)
        if new > cache.recall_slots:
            raise ValueError(f"{new} recalled tokens do not fit {cache.recall_slots} reserved slots")
        base, length = cache.pinned[row] - old, cache.lengths[row]
        shift = new - old
        window = slice(base + old, length)
        if shift and window.stop > window.start:
            for layer in range(cache.shape.num_layers):
                cos, sin = cache._rotation(layer, shift)
                moved_k = cache.k[layer][row, :, window].clone()
                moved_v = cache.v[layer][row, :, window].clone()
                dst = slice(window.start + shift, window.stop + shift)
                cache.k[layer][row, :, dst] = rotate_float32(moved_k, cos, sin)
                cache.v[layer][row, :, dst] = moved_v
        if new:
            positions = torch.arange(base, base + new)
            for layer in range(cache.shape.num_layers):
                keys = torch.cat([b.keys[layer] for b in blocks], dim=1).to(cache.device)  # (H, new, D)
                values = torch.cat([b.values[layer] for b in blocks], dim=1)
                cache.k[layer][row, :, base : base + new] = rotate_positions(keys, cache.inv_freqs[layer], positions)
                cache.v[layer][row, :, base : base + new] = values.to(cache.device, cache.dtype)
        cache.lengths[row] = length + shift
        cache.pinned[row] = base + new
        cache.evicted[row] -= shift
        cache.reserved[row] = cache.recall_slots - new
        cache._touch(row)
        self.segments[row] = list(starts)


def cache_block(cache: SinkCache) -> int:
    """Tokens per stored block: the cache's eviction block."""
    return cache.evict_block


def _query_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    modules = [m for name, m in model.named_modules() if name.endswith("self_attn.q_proj")]
    if not modules:
        raise ValueError(f"{type(model).__name__} has no self_attn.q_proj modules to read queries from")
    return modules


@torch.inference_mode()
def capture_queries(model: torch.nn.Module, cache: SinkCache, row: int, tokens: list[int]) -> list[torch.Tensor]:
    """The queries (per layer (Hq, T, D), before RoPE) a transformers model computes for ``tokens`` fed to
    ``row`` after what it holds; the row is left as it was (the pass is undone, nothing is stored)."""
    tokens = tokens[-cache.max_chunk(row) :]
    captured: list[torch.Tensor] = []
    head_dim = cache.shape.head_dim

    def keep(_module, _inputs, out: torch.Tensor) -> None:  # (1, T, Hq * D) -> (Hq, T, D)
        captured.append(out[0].reshape(len(tokens), -1, head_dim).transpose(0, 1).float().cpu())

    hooks = [m.register_forward_hook(keep) for m in _query_modules(model)]
    on_evict, cache.on_evict = cache.on_evict, None
    step = cache.step([row], len(tokens))
    try:
        mask = step.attention_mask()
        if getattr(model.config, "_attn_implementation", "sdpa") != "sdpa":
            mask = torch.zeros(mask.shape, dtype=cache.dtype, device=cache.device).masked_fill(
                ~mask, torch.finfo(cache.dtype).min)
        model(input_ids=torch.tensor([tokens], device=cache.device), position_ids=step.position_ids(),
              attention_mask=mask, cache=step, use_cache=True, logits_to_keep=1)
    finally:
        step.undo()
        cache.on_evict = on_evict
        for hook in hooks:
            hook.remove()
    return captured
