"""Token-by-token perplexity with each output-projection kernel of the owned decode step forced, against
float32: the gate an 8-bit or bf16 output projection must pass (within 0.5%, issue 14); and with the
decoder layers' 4-bit kernel forced (PyTorch's, or our own ``int4-rows`` / ``int4-amx`` where this machine
builds them), each with an int8 output projection.

    .venv/bin/python scripts/ppl_output_kernels.py [--tokens 3000] [--out docs/results/ppl-decode-head]

Each configuration loads the embedded model, streams the first ``tokens`` tokens of the shipped
tinyshakespeare through a 4 + 1020 sink cache one token at a time (``eval ppl --mode sink --chunk 1``) and
scores every prediction; the output projection's kernel is forced instead of timed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import engine.evaluate.ppl as ppl
from engine.config import EngineConfig
from engine.evaluate.ppl import DEFAULT_TEXT
from engine.model.families.llama import PROJECTIONS
from engine.model.linear import DecodeLinear
from engine.model.loader import load
from engine.model.runner import serving_runner

CONFIGURATIONS = {  # label: (quantize, output projection kernel or None for the timed choice, layers' kernel)
    "float32 (quantize none)": (None, None, None),
    "int4 layers + bf16 output projection": ("int4", "bf16", None),
    "int4 layers + int8 output projection": ("int4", "int8", None),
    "int4 layers + int8 output projection (int8-rows kernel)": ("int4", "int8-rows", None),
    "int4 layers + int4 output projection": ("int4", "int4", None),
    "int4 layers (PyTorch's kernel) + int8 output projection": ("int4", "int8", "int4"),
    "int4-rows layers + int8 output projection": ("int4", "int8", "int4-rows"),
    "int4-amx layers + int8 output projection": ("int4", "int8", "int4-amx"),
}


KEEP = DecodeLinear.keep


def forced_head(kernel: str | None, layers: str | None = None):
    """``serving_runner`` with the owned decode step's output projection forced to ``kernel`` and, with
    ``layers``, the decoder layers' kernel too (at every row count)."""
    def build(model, cache, quantize, max_rows, compile_decode=False):
        if layers:  # tuning keeps every kernel's weights, so the forced one is there
            DecodeLinear.keep = lambda self, choice: setattr(self, "choice", dict(choice))
        try:
            runner = serving_runner(model, cache, quantize, max_rows)
        finally:
            DecodeLinear.keep = KEEP
        if kernel:
            runner.decoder.head = DecodeLinear(model.get_output_embeddings().weight, None, (kernel,))
        if layers:  # every row count (a ValueError where this machine has no such kernel)
            runner.decoder.assign(dict.fromkeys(PROJECTIONS, layers), runner.decoder.head.choice)
        return runner
    return build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=3000)
    parser.add_argument("--out", type=Path, default=Path("docs/results/ppl-decode-head"))
    parser.add_argument("--only", action="append", help="measure only these labels (repeatable; float32 always)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    text = Path(DEFAULT_TEXT).read_text(encoding="utf-8")
    result = {}
    for label, (quantize, kernel, layers) in CONFIGURATIONS.items():
        if args.only and label not in args.only and quantize is not None:
            continue
        loaded = load(EngineConfig(quantize=quantize))
        ids = loaded.tokenizer(text)["input_ids"][: args.tokens]
        ppl.serving_runner = forced_head(kernel, layers)
        result[label] = ppl.stream_ppl(loaded, ids, 1024, 4, 64, chunk=1)["ppl"]
        print(f"{label}: {result[label]:.3f}", flush=True)
    base = result["float32 (quantize none)"]
    report = {"tokens": args.tokens, "ppl": result, "relative_to_float32": {k: v / base - 1 for k, v in result.items()}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ppl.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
