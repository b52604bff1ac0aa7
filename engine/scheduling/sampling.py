"""Token sampling as small pure functions over logits: one row at a time, or a whole batch at once.

The per-row functions (``process_logits`` then ``sample``; ``V`` = vocabulary size, 49152 for SmolLM2)
are the reference and the path for rows with penalties, logit_bias, a seed or logprobs. Rows with plain
settings (temperature, top-k, top-p, min-p: ``plain``) are sampled together by ``sample_batch``: one op
sequence over the (B, V) logits with the settings as per-row tensors and one host transfer for the whole
batch (as nano-vllm and gpt-fast sample), token-for-token equal to the reference given the same uniform
numbers (tests/engine/test_sampling.py). Draws are by inverse CDF from one uniform number per token, so the
two paths can be compared exactly. Nothing here loops over the vocabulary in Python and nothing modifies
its input in place.

Pipeline (``process_logits``), in this order:

1. ``logit_bias``: added to the logits, each value clamped to [-100, 100] as in the OpenAI API
   reference (https://platform.openai.com/docs/api-reference/chat/create#chat-create-logit_bias).
2. repetition penalty, CTRL-style (Keskar et al. 2019, "CTRL: A Conditional Transformer Language
   Model for Controllable Generation", arXiv:1909.05858, sec. 4.1), as implemented by Hugging Face
   ``RepetitionPenaltyLogitsProcessor``: positive logits of seen tokens are divided by the penalty,
   negative ones multiplied. "Seen" means the ids in ``context_ids``, which the caller chooses
   (the scheduler passes the generated tokens plus a tail of the prompt: the whole history of an
   endless StreamingLLM session would make this grow without bound).
3. presence / frequency penalties with OpenAI semantics
   (https://platform.openai.com/docs/guides/text-generation, "Frequency and presence penalties"):
   ``logit[j] -= presence * (count[j] > 0) + frequency * count[j]``, where ``count`` is counted over
   ``generated_ids`` only -- the tokens generated so far for *this request*, never the prompt.
4. temperature (skipped when 0: greedy decoding takes the argmax of the penalised logits).
5. filters, each setting dropped tokens to ``-inf``: top-k (tokens tied with the k-th are kept, as in
   Hugging Face's and vLLM's top-k); top-p / nucleus sampling (Holtzman et
   al. 2019, "The Curious Case of Neural Text Degeneration", arXiv:1904.09751); min-p (Nguyen et
   al. 2024, "Turning Up the Heat: Min-p Sampling for Creative and Coherent LLM Outputs",
   arXiv:2407.01082). Each filter looks at the distribution left by the previous one, as the
   Hugging Face logits warpers do.

Logprobs (``token_logprobs``): reported from ``log_softmax`` of the logits after steps 1-3 (bias and
penalties) at temperature 1, before temperature and filters. This is the model's own (penalised)
belief, stable across sampling settings, and never ``-inf`` for a token a filter removed; it is
what vLLM reports by default ("raw" logprobs after penalties). ``penalize_logits`` computes it so
the scheduler can share the work with ``filter_logits``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

MAX_TOP_LOGPROBS = 20
MAX_STOP_STRINGS = 4
LOGIT_BIAS_LIMIT = 100.0

TokenIds = Sequence[int] | torch.Tensor


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings; the engine rejects nonsense in ``__post_init__``.

    Range checks tighter than "makes sense" (e.g. OpenAI's temperature <= 2) belong to the server.
    ``temperature == 0`` means greedy decoding. ``top_k == 0`` disables top-k.
    ``presence_penalty`` / ``frequency_penalty`` count the tokens generated for this request only.
    """

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        for problem in _validation_errors(self):
            raise ValueError(problem)


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _validation_errors(p: SamplingParams) -> list[str]:
    """Messages naming each invalid field of ``p``; empty when valid."""
    errors = []
    if not isinstance(p.max_tokens, int) or p.max_tokens < 1:
        errors.append(f"max_tokens must be an integer >= 1, got {p.max_tokens!r}")
    if not _finite(p.temperature) or p.temperature < 0:
        errors.append(f"temperature must be a finite number >= 0, got {p.temperature!r}")
    if not _finite(p.top_p) or not 0 < p.top_p <= 1:
        errors.append(f"top_p must be in (0, 1], got {p.top_p!r}")
    if not isinstance(p.top_k, int) or p.top_k < 0:
        errors.append(f"top_k must be an integer >= 0 (0 disables it), got {p.top_k!r}")
    if not _finite(p.min_p) or not 0 <= p.min_p <= 1:
        errors.append(f"min_p must be in [0, 1], got {p.min_p!r}")
    if not _finite(p.repetition_penalty) or p.repetition_penalty <= 0:
        errors.append(f"repetition_penalty must be a finite number > 0, got {p.repetition_penalty!r}")
    if not _finite(p.presence_penalty):
        errors.append(f"presence_penalty must be a finite number, got {p.presence_penalty!r}")
    if not _finite(p.frequency_penalty):
        errors.append(f"frequency_penalty must be a finite number, got {p.frequency_penalty!r}")
    for token, bias in p.logit_bias.items():
        if not isinstance(token, int) or token < 0:
            errors.append(f"logit_bias keys must be token ids >= 0, got {token!r}")
        if not _finite(bias):
            errors.append(f"logit_bias[{token!r}] must be a finite number, got {bias!r}")
    if p.seed is not None and not isinstance(p.seed, int):
        errors.append(f"seed must be an integer or None, got {p.seed!r}")
    if len(p.stop) > MAX_STOP_STRINGS:
        errors.append(f"stop accepts at most {MAX_STOP_STRINGS} strings, got {len(p.stop)}")
    if any(not isinstance(s, str) or not s for s in p.stop):
        errors.append("stop strings must be non-empty strings")
    if not isinstance(p.top_logprobs, int) or not 0 <= p.top_logprobs <= MAX_TOP_LOGPROBS:
        errors.append(f"top_logprobs must be an integer in 0..{MAX_TOP_LOGPROBS}, got {p.top_logprobs!r}")
    return errors


def make_generator(params: SamplingParams, device: torch.device | str) -> torch.Generator | None:
    """A generator seeded with ``params.seed`` (same seed -> same tokens), or None when unseeded."""
    if params.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(params.seed)


def _as_ids(ids: TokenIds, device: torch.device) -> torch.Tensor:
    """Token ids as a 1-D int64 tensor on ``device``."""
    if isinstance(ids, torch.Tensor):
        return ids.reshape(-1).to(device=device, dtype=torch.long)
    return torch.as_tensor(list(ids), dtype=torch.long, device=device)


def apply_logit_bias(logits: torch.Tensor, logit_bias: dict[int, float]) -> torch.Tensor:
    """``logits`` (V,) plus the bias, each value clamped to [-100, 100]; a new tensor. The ids were checked
    against the vocabulary once, when the request came in (``Engine.check_params``)."""
    if not logit_bias:
        return logits.clone()
    ids = torch.tensor(list(logit_bias), dtype=torch.long, device=logits.device)  # (N,)
    values = torch.tensor(list(logit_bias.values()), dtype=logits.dtype, device=logits.device)
    values = values.clamp(-LOGIT_BIAS_LIMIT, LOGIT_BIAS_LIMIT)  # (N,)
    return logits.index_add(-1, ids, values)  # (V,)


def apply_repetition_penalty(logits: torch.Tensor, context_ids: TokenIds, penalty: float) -> torch.Tensor:
    """CTRL / HF repetition penalty over the distinct ids of ``context_ids``; a new tensor."""
    ids = _as_ids(context_ids, logits.device)  # (N,)
    if penalty == 1.0 or ids.numel() == 0:
        return logits.clone()
    ids = ids.unique()  # (U,)
    seen = logits.index_select(-1, ids)  # (U,)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)  # (U,)
    return logits.index_copy(-1, ids, seen)  # (V,)


def apply_presence_frequency(
    logits: torch.Tensor, generated_ids: TokenIds, presence: float, frequency: float
) -> torch.Tensor:
    """OpenAI penalties: ``logit -= presence * (count > 0) + frequency * count``; a new tensor."""
    ids = _as_ids(generated_ids, logits.device)  # (N,)
    if (presence == 0.0 and frequency == 0.0) or ids.numel() == 0:
        return logits.clone()
    ids, counts = ids.unique(return_counts=True)  # (U,), (U,)
    penalty = presence + frequency * counts.to(logits.dtype)  # (U,)
    return logits.index_add(-1, ids, -penalty)  # (V,)


def penalize_logits(
    logits: torch.Tensor, params: SamplingParams, context_ids: TokenIds, generated_ids: TokenIds
) -> torch.Tensor:
    """Steps 1-3: float32 ``logits`` (V,) after logit_bias, repetition and presence/frequency."""
    out = logits.to(torch.float32)  # (V,)
    out = apply_logit_bias(out, params.logit_bias)
    out = apply_repetition_penalty(out, context_ids, params.repetition_penalty)
    return apply_presence_frequency(out, generated_ids, params.presence_penalty, params.frequency_penalty)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` highest logits and any tied with the ``k``-th (as Hugging Face and vLLM do), the rest
    ``-inf``; ties are kept so the kept set never depends on a sort's tie-breaking."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]  # (1,)
    return logits.masked_fill(logits < kth, -math.inf)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest most-probable set whose probability mass is >= ``p`` (nucleus)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)  # (V,), (V,)
    probs = sorted_logits.softmax(dim=-1)  # (V,)
    mass_before = probs.cumsum(dim=-1) - probs  # (V,) mass of strictly more probable tokens
    drop_sorted = mass_before >= p  # (V,) the first token always has mass_before == 0 < p
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # (V,) back to vocabulary order
    return logits.masked_fill(drop, -math.inf)


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens whose probability is below ``min_p`` times the top token's probability."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(dim=-1)  # (V,)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values  # (1,)
    return logits.masked_fill(probs < threshold, -math.inf)


GREEDY_BELOW = 1e-5  # temperatures this small are greedy (vLLM's _SAMPLING_EPS): dividing by them overflows


def is_greedy(params: SamplingParams) -> bool:
    return params.temperature < GREEDY_BELOW


def filter_logits(penalized: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Steps 4-5: temperature (unless greedy), then top-k, top-p, min-p on float32 logits (V,)."""
    out = penalized if is_greedy(params) else penalized / params.temperature  # (V,)
    out = top_k_filter(out, params.top_k)
    out = top_p_filter(out, params.top_p)
    return min_p_filter(out, params.min_p)


def process_logits(
    logits: torch.Tensor, params: SamplingParams, context_ids: TokenIds, generated_ids: TokenIds
) -> torch.Tensor:
    """Full pipeline on one row ``logits`` (V,): a new float32 tensor (V,), ``-inf`` = filtered out.

    ``context_ids``: ids the repetition penalty treats as seen (caller's choice, e.g. prompt tail +
    generated). ``generated_ids``: ids generated so far for this request (presence/frequency).
    """
    return filter_logits(penalize_logits(logits, params, context_ids, generated_ids), params)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
           uniform: torch.Tensor | None = None) -> int:
    """One token id from processed ``logits`` (V,): argmax when greedy, else a draw.

    The draw is by inverse CDF: the first token whose cumulative probability exceeds ``uniform`` (a 0-d
    tensor in [0, 1), drawn from ``generator`` when not given) times the total, so one uniform number per
    token and the batched :func:`sample_batch` picks the same token from the same number.
    Extreme settings (huge penalties or biases) can overflow the distribution; then the most likely
    finite token is taken rather than failing the request.
    """
    if is_greedy(params):
        return int(logits.nan_to_num(nan=-math.inf).argmax(dim=-1))
    probs = logits.to(torch.float32).softmax(dim=-1)  # (V,)
    cdf = probs.cumsum(dim=-1)  # (V,)
    if not bool(torch.isfinite(probs).all()) or float(cdf[-1]) <= 0:
        return int(logits.nan_to_num(nan=-math.inf).argmax(dim=-1))
    if uniform is None:
        uniform = torch.rand((), generator=generator, device=logits.device)
    point = (uniform.to(cdf.device) * cdf[-1]).reshape(1)  # (1,)
    return int(torch.searchsorted(cdf, point, right=True).clamp_max(cdf.shape[-1] - 1))


def token_logprobs(logits: torch.Tensor, token_id: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """The logprob of ``token_id`` and the ``k`` most likely (id, logprob), descending.

    ``logits`` (V,) should be the output of ``penalize_logits`` (see the module docstring).
    """
    logprobs = logits.to(torch.float32).log_softmax(dim=-1)  # (V,)
    chosen = float(logprobs[token_id])
    if k <= 0:
        return chosen, []
    top = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)  # (k,), sorted descending
    return chosen, list(zip(top.indices.tolist(), top.values.tolist(), strict=True))


# ----- the batched path ----------------------------------------------------------------------------------
def plain(params: SamplingParams) -> bool:
    """Whether :func:`sample_batch` can sample a row with ``params``: temperature, top-k, top-p and min-p
    only (no penalties, logit_bias, seed or logprobs, which take the per-row path above)."""
    return (params.repetition_penalty == 1.0 and params.presence_penalty == 0.0 and params.frequency_penalty == 0.0
            and not params.logit_bias and params.seed is None and not params.logprobs)


def sample_batch(logits: torch.Tensor, params: Sequence[SamplingParams], uniforms: torch.Tensor | None = None
                 ) -> list[int]:
    """One token for each row of ``logits`` (B, V) whose ``params`` are :func:`plain`: one op sequence over
    the whole batch on its device and one host transfer at the end.

    Row ``i`` gets exactly ``sample(process_logits(logits[i], params[i], [], []), params[i],
    uniform=uniforms[i])``: the same filters with per-row settings as tensors, the same inverse-CDF draw
    (on a CPU, rows filtered by top-p only draw among the most probable tokens, :func:`_draw_from_nucleus`:
    the same token, rows whose nucleus edge or draw lies within rounding of the reference's taking the
    general path).
    ``uniforms`` (B,) defaults to fresh draws from the device's default generator.
    """
    if not all(plain(p) for p in params):
        raise ValueError("sample_batch takes rows with plain settings only (see plain())")
    batch, vocab = logits.shape
    device = logits.device
    logits = logits.to(torch.float32)  # (B, V)
    greedy = [is_greedy(p) for p in params]
    if all(greedy):
        return logits.nan_to_num(nan=-math.inf).argmax(dim=-1).tolist()
    temperature = torch.tensor([1.0 if g else p.temperature for p, g in zip(params, greedy, strict=True)],
                               dtype=torch.float32, device=device)  # (B,)
    out = logits / temperature[:, None]  # (B, V)
    if uniforms is None:
        uniforms = torch.rand(batch, device=device)  # (B,)
    if device.type == "cpu" and not any(greedy) and all(_nucleus_only(p, vocab) for p in params):
        tokens = _draw_from_nucleus(out, [p.top_p for p in params], uniforms)
        if tokens is not None:
            return tokens
    out = _top_k_rows(out, [p.top_k if 0 < p.top_k < vocab else 0 for p in params])
    out = _top_p_rows(out, [p.top_p for p in params])
    out = _min_p_rows(out, [p.min_p for p in params])
    probs = out.softmax(dim=-1)  # (B, V)
    cdf = probs.cumsum(dim=-1)  # (B, V)
    points = uniforms.to(device=device, dtype=torch.float32)[:, None] * cdf[:, -1:]  # (B, 1)
    drawn = torch.searchsorted(cdf, points, right=True).clamp_max(vocab - 1)[:, 0]  # (B,)
    total = cdf[:, -1]  # (B,) NaN or inf when a row's probabilities overflowed, 0 when nothing survived
    broken = ~torch.isfinite(total) | (total <= 0)  # (B,) overflowed settings: those rows take the best
    if any(greedy):
        argmax = logits.nan_to_num(nan=-math.inf).argmax(dim=-1)  # (B,)
        drawn = torch.where(torch.tensor(greedy, device=device), argmax, drawn)
        broken &= ~torch.tensor(greedy, device=device)
    tokens, broken_rows = torch.stack([drawn, broken.long()]).tolist()  # the one host transfer
    for row in (i for i, bad in enumerate(broken_rows) if bad):  # rare: the reference's fallback, row by row
        tokens[row] = int(out[row].nan_to_num(nan=-math.inf).argmax())
    return tokens


def _nucleus_only(params: SamplingParams, vocab: int) -> bool:
    """Whether a row's only filter is top-p (no top-k, no min-p): :func:`_draw_from_nucleus` can take it."""
    return params.top_p < 1.0 and not 0 < params.top_k < vocab and params.min_p <= 0.0


def _draw_from_nucleus(scaled: torch.Tensor, ps: list[float], uniforms: torch.Tensor) -> list[int] | None:
    """:func:`sample_batch` for rows of temperature-scaled logits ``scaled`` (B, V) whose only filter is top-p
    ``ps``, drawing among the 16 most probable tokens instead of over the vocabulary: the nucleus of a chat
    model's next token is a handful of tokens (the embedded model's card samples at temperature 0.2, top-p
    0.9), and the general path's full-vocabulary operations after the filter (the mask, softmax, cumulative
    sum, search) were most of sampling: 8 rows of 49,152 logits at the card's settings took 3.5 ms of a
    30 ms step on a 2-core Xeon, 1.1 ms this way (1 row: 1.0 and 0.5 ms; an indication from an ad-hoc
    timing). One pass over the vocabulary remains, the softmax's sum.

    The same token as :func:`sample`'s inverse-CDF draw from the same uniform: the kept tokens' probabilities
    cumulated in vocabulary order, the point ``uniform`` times their total. None (the caller takes the
    general path) when a row's nucleus is not among the 16, its best logit is not finite, a token outside it
    ties with its least probable one (which the reference's stable sort decides), a candidate's mass lies
    within rounding of p (:func:`_edge_tolerance`) or the point within ``DRAW_TOLERANCE`` of a boundary
    between two kept tokens: the sums here and the reference's run in different orders (by the CPU's vector
    width), so only a decision clear of their roundings is the same on every CPU. CPU only (host syncs)."""
    batch, vocab = scaled.shape
    k = min(vocab, TOP_P_CANDIDATES[0])
    top = scaled.topk(k, dim=-1)  # (B, k) descending
    counted = _nucleus_among(scaled, top.values, torch.tensor(ps, dtype=torch.float32))
    if counted is None:
        return None
    kept, weights = counted  # (B, 1), (B, k)
    if not bool((kept < k).all()):
        return None
    if not bool((top.values.gather(-1, kept) < top.values.gather(-1, kept - 1)).all()):
        return None  # the next candidate ties with the least probable kept token
    outside = torch.arange(k)[None] >= kept  # (B, k)
    ids, order = top.indices.masked_fill(outside, vocab).sort(dim=-1)  # (B, k) kept ids in vocabulary order
    cdf = weights.masked_fill(outside, 0.0).gather(-1, order).cumsum(dim=-1)  # (B, k)
    points = uniforms.to(torch.float32)[:, None] * cdf[:, -1:]  # (B, 1)
    drawn = torch.minimum(torch.searchsorted(cdf, points, right=True), kept - 1)  # (B, 1)
    below = torch.where(drawn > 0, cdf.gather(-1, (drawn - 1).clamp_min(0)), 0.0)  # (B, 1) the drawn token's
    above = cdf.gather(-1, drawn)  # (B, 1) cumulative mass starts at below, ends at above
    slack = DRAW_TOLERANCE * cdf[:, -1:]  # (B, 1)
    near = ((points - below <= slack) & (drawn > 0)) | ((above - points <= slack) & (drawn < kept - 1))
    if bool(near.any()):
        return None  # the point sits within rounding of a boundary between two kept tokens: the reference's sum
    return ids.gather(-1, drawn)[:, 0].tolist()


# how near (a fraction of the kept mass) the draw's point may come to a boundary between two kept tokens
# before the candidates' draw defers to the general path: the two cumulate the same few terms, normalized
# (the reference's softmax) or not (here), a few roundings of each term apart; measured 4e-7 at most
DRAW_TOLERANCE = 1e-5


def _top_k_rows(logits: torch.Tensor, ks: list[int]) -> torch.Tensor:
    """:func:`top_k_filter` per row of ``logits`` (B, V) with ``ks[i]`` (0: keep all)."""
    if not any(ks):
        return logits
    k = torch.tensor(ks, device=logits.device)  # (B,)
    values = logits.topk(max(ks), dim=-1).values  # (B, kmax), descending
    kth = values.gather(-1, (k - 1).clamp_min(0)[:, None])  # (B, 1)
    kth = kth.masked_fill((k == 0)[:, None], -math.inf)
    return logits.masked_fill(logits < kth, -math.inf)


def _top_p_rows(logits: torch.Tensor, ps: list[float]) -> torch.Tensor:
    """:func:`top_p_filter` on the rows of ``logits`` (B, V) with ``ps[i] < 1`` (a sort each: only those)."""
    rows = [i for i, p in enumerate(ps) if p < 1.0]
    if not rows:
        return logits
    every = len(rows) == logits.shape[0]
    index = torch.tensor(rows, device=logits.device)  # (R,)
    sub = logits if every else logits.index_select(0, index)  # (R, V)
    p = torch.tensor([ps[i] for i in rows], dtype=torch.float32, device=logits.device)  # (R,)
    keep = _nucleus_from_candidates(sub, p) if sub.device.type == "cpu" else None
    if keep is None:
        sorted_logits, order = sub.sort(dim=-1, descending=True, stable=True)  # (R, V), (R, V)
        probs = sorted_logits.softmax(dim=-1)  # (R, V)
        mass_before = probs.cumsum(dim=-1) - probs  # (R, V)
        drop_sorted = mass_before >= p[:, None]  # (R, V)
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # (R, V) back to vocabulary order
    else:
        drop = ~keep
    filtered = sub.masked_fill(drop, -math.inf)
    return filtered if every else logits.index_copy(0, index, filtered)


TOP_P_CANDIDATES = (16, 256)  # how many of the most probable tokens the CPU's nucleus is looked for among


def _nucleus_from_candidates(logits: torch.Tensor, p: torch.Tensor) -> torch.Tensor | None:
    """The tokens :func:`top_p_filter` keeps in each row of ``logits`` (R, V), as a mask (R, V), found
    among the 16 (then 256) most probable tokens instead of sorting the whole vocabulary: a stable sort of
    49,152 logits costs 4 ms a row on a small CPU, 20% of a decode step, and the nucleus of a chat model's
    next token (the embedded model's card samples at temperature 0.2, top-p 0.9) is a handful of tokens.
    None when a row's nucleus is not among them (or its largest logit is NaN or +inf, which topk puts
    first): then the caller sorts. Ties are kept as the stable sort keeps them, lowest index first. (A host
    sync per stage: CPU only.)"""
    vocab = logits.shape[-1]
    for k in sorted({min(vocab, c) for c in TOP_P_CANDIDATES}):
        top = logits.topk(k, dim=-1)  # (R, k) descending
        counted = _nucleus_among(logits, top.values, p)
        if counted is None:
            return None
        kept = counted[0]  # (R, 1)
        if k == vocab or bool((kept < k).all()):
            break
    else:
        return None
    edge = top.values.gather(-1, kept - 1)  # (R, 1) the least probable kept token's logit
    keep = logits >= edge  # (R, V)
    if bool((keep.sum(dim=-1, keepdim=True) == kept).all()):
        return keep
    above, tied = logits > edge, logits == edge  # (R, V) each: more tokens tie with the edge than fit
    room = kept - above.sum(dim=-1, keepdim=True)  # (R, 1) tied tokens kept
    return above | (tied & (tied.cumsum(dim=-1) <= room))


def _nucleus_among(logits: torch.Tensor, top: torch.Tensor, p: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """How many of the most probable logits ``top`` (R, k), descending, of ``logits`` (R, V) the nucleus of
    mass ``p`` (R,) keeps, (R, 1) and >= 1 (all k when it needs more), with their softmax terms exp(top -
    best) (R, k); None when a row's best logit is not finite (topk puts NaN and +inf first).

    The terms are floored at exp(-87) (the smallest normal float32): at a low temperature most of a row's
    exp() would be denormal numbers, which cost a CPU ten times more, while terms that small can never
    change a sum that holds the top token's 1."""
    best = top[:, :1]  # (R, 1)
    if not bool(best.isfinite().all()):
        return None
    total = (logits - best).clamp_min_(-87.0).exp_().sum(dim=-1, keepdim=True)  # (R, 1)
    weights = (top - best).clamp_min_(-87.0).exp_()  # (R, k)
    probs = weights / total
    mass_before = probs.cumsum(dim=-1) - probs  # (R, k) mass of strictly more probable tokens
    if bool(((mass_before - p[:, None]).abs() <= _edge_tolerance(logits.shape[-1])).any()):
        return None  # a candidate's mass sits within rounding of p: the reference's own sum decides
    return (mass_before < p[:, None]).sum(dim=-1, keepdim=True), weights


def _edge_tolerance(vocab: int) -> float:
    """How far the nucleus mass computed here may lie from the reference's (:func:`top_p_filter`'s softmax
    of the sorted logits) for ``vocab`` logits: that softmax sums in vector lanes, each lane's terms one after
    another, an error of up to (terms per lane) x 2^-24 of the total, with 8 lanes (AVX2) V/8 terms each;
    twice that bound, plus the exp() and division roundings. Measured: 9e-5 at 49,152 logits with AVX2
    kernels (4.7e-5 with AVX-512), within 7.3e-4 here. Rows closer than this to p take the sort."""
    return 1e-6 + vocab * 2.0**-26


def _min_p_rows(logits: torch.Tensor, min_ps: list[float]) -> torch.Tensor:
    """:func:`min_p_filter` per row of ``logits`` (B, V) with ``min_ps[i]`` (0: keep all)."""
    if not any(m > 0.0 for m in min_ps):
        return logits
    min_p = torch.tensor(min_ps, dtype=torch.float32, device=logits.device)  # (B,)
    probs = logits.softmax(dim=-1)  # (B, V)
    threshold = min_p[:, None] * probs.max(dim=-1, keepdim=True).values  # (B, 1)
    return logits.masked_fill(probs < threshold, -math.inf)
