"""Where attention goes: the share each layer gives to the first tokens (StreamingLLM, Figure 2).

One plain forward of the first ``tokens`` tokens of a text with the eager attention implementation and
``output_attentions=True``. For each layer, the attention weights are averaged over heads and over query
positions ``>= FIRST`` (so every query can see all of the first ``FIRST`` keys), giving the share of
attention on each of key positions ``0..FIRST-1`` and on all the other keys ("rest"). Attention sinks show
up as a large share on position 0 (or the first few) in most layers beyond the first two.

Writes ``attention.json`` and ``attention.png`` (a heatmap: layers x positions 0..15 + rest).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from engine.config import EngineConfig
from engine.evaluate.ppl import DEFAULT_TEXT, text_ids
from engine.model.loader import LoadedModel, load

log = logging.getLogger(__name__)

FIRST = 16  # key positions reported one by one


def _set_attn(model: torch.nn.Module, implementation: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(implementation)
    else:
        model.config._attn_implementation = implementation


@torch.inference_mode()
def attention_shares(loaded: LoadedModel, ids: list[int]) -> list[list[float]]:
    """Per layer: shares of attention on key positions 0..FIRST-1, then on the rest (sums to 1)."""
    if len(ids) <= FIRST:
        raise ValueError(f"need more than {FIRST} tokens, got {len(ids)}")
    model = loaded.model
    previous = getattr(model.config, "_attn_implementation", None) or "sdpa"
    _set_attn(model, "eager")
    try:
        out = model(input_ids=torch.tensor([ids], device=loaded.device), use_cache=False,
                    output_attentions=True, logits_to_keep=1)
    finally:
        _set_attn(model, previous)
    if not out.attentions or out.attentions[0] is None:
        raise RuntimeError("the model returned no attention weights")
    shares = []
    for weights in out.attentions:  # (1, heads, T, T)
        w = weights[0, :, FIRST:, :].double()  # queries >= FIRST: (heads, Q, T)
        first = w[..., :FIRST].mean(dim=(0, 1))  # (FIRST,)
        rest = w[..., FIRST:].sum(-1).mean()
        shares.append([*first.tolist(), rest.item()])
    return shares


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = [layer["shares"] + [layer["rest"]] for layer in report["layers"]]
    rows = len(data)
    fig, ax = plt.subplots(figsize=(9, max(3.0, 0.25 * rows + 1.5)))
    image = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(FIRST + 1), [str(i) for i in range(FIRST)] + ["rest"])
    ax.set_yticks(range(rows), [str(i) for i in range(rows)])
    ax.set_xlabel("key position")
    ax.set_ylabel("layer")
    ax.set_title(f"{report['model']}: share of attention (mean over heads, queries >= {FIRST}), "
                 f"{report['tokens']} tokens", fontsize=9)
    bar = fig.colorbar(image, ax=ax)
    bar.set_label("share of attention")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_attention(text_path: str | Path | None, out_dir: str | Path, tokens: int = 1024, model: str | None = None,
                  loaded: LoadedModel | None = None) -> dict:
    """Measure each layer's attention on the first tokens of a text; write attention.json and .png."""
    text_path = Path(text_path) if text_path else DEFAULT_TEXT
    if loaded is None:
        loaded = load(EngineConfig(model=model))
    ids = text_ids(loaded.tokenizer, text_path, tokens)
    shares = attention_shares(loaded, ids)
    report = {
        "model": loaded.name,
        "text": str(text_path),
        "tokens": len(ids),
        "first_positions": FIRST,
        "query_positions": f">= {FIRST}",
        "layers": [{"layer": i, "shares": s[:FIRST], "rest": s[FIRST]} for i, s in enumerate(shares)],
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "attention.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(report, out / "attention.png")
    log.info("wrote %s and %s", out / "attention.json", out / "attention.png")
    return report
