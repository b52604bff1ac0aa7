"""Perplexity of prompt processing: chunked prefill through transformers' float32 forward against the owned
step's prefill on its bf16 copy of the layers (engine/model/linear.py ``PREFILL_KERNEL``), the gate that
copy must pass before prompts run on it (within 0.5% of float32, as the output projection's kernels).

    .venv/bin/python scripts/ppl_prefill.py [--tokens 3000] [--out docs/results/ppl-prefill]

Each configuration loads the embedded model (int4 decoding, as served), streams the first ``tokens``
tokens of the shipped tinyshakespeare through a 4 + 1020 sink cache in chunks of ``chunk`` tokens (every
chunk a prefill pass: ``eval ppl --mode sink --chunk N``) and scores every prediction.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import engine.evaluate.ppl as ppl
from engine.config import EngineConfig
from engine.evaluate.ppl import DEFAULT_TEXT
from engine.model.loader import load
from engine.model.runner import serving_runner

CONFIGURATIONS = {"float32 (transformers' forward)": False, "bf16 (owned prefill)": True}


def prefill_with(owned: bool):
    """``serving_runner`` whose prompt chunks run through the owned step (True) or transformers (False)."""
    def build(model, cache, quantize, max_rows, compile_decode=False):
        runner = serving_runner(model, cache, quantize, max_rows)
        if not runner.decoder.prefills:
            raise SystemExit("no bf16 prefill on this CPU (oneDNN has no native bf16 here)")
        runner.decoder.prefills = owned
        return runner
    return build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=3000)
    parser.add_argument("--chunks", default="64,256")
    parser.add_argument("--out", type=Path, default=Path("docs/results/ppl-prefill"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    text = Path(DEFAULT_TEXT).read_text(encoding="utf-8")
    loaded = load(EngineConfig())
    ids = loaded.tokenizer(text)["input_ids"][: args.tokens]
    report = {"tokens": args.tokens, "ppl": {}, "seconds": {}, "relative_to_float32": {}}
    for chunk in (int(c) for c in args.chunks.split(",")):
        for label, owned in CONFIGURATIONS.items():
            ppl.serving_runner = prefill_with(owned)
            result = ppl.stream_ppl(loaded, ids, 1024, 4, 64, chunk=chunk)
            key = f"chunk {chunk}: {label}"
            report["ppl"][key], report["seconds"][key] = result["ppl"], result["seconds"]
            print(f"{key}: {result['ppl']:.4f} ({result['seconds']:.1f} s)", flush=True)
        base = report["ppl"][f"chunk {chunk}: float32 (transformers' forward)"]
        report["relative_to_float32"][chunk] = report["ppl"][f"chunk {chunk}: bf16 (owned prefill)"] / base - 1
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ppl.json").write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
