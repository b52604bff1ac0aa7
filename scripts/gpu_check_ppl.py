"""scripts/gpu_check.sh's perplexity check: the sink-cache perplexity of one stream in bfloat16 against float32.

    python scripts/gpu_check_ppl.py BF16_PPL_JSON FLOAT32_PPL_JSON [--within 0.01]

Reads the two ``ppl.json`` reports of ``eval ppl --mode sink`` (engine/evaluate/ppl.py), prints one summary
line, and exits 1 when they are more than ``--within`` (a fraction of the float32 figure) apart or do not
score the same stream.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def compare(bf16: dict, f32: dict, within: float) -> tuple[bool, str]:
    """Whether the bf16 perplexity is within ``within`` of the float32 one, and the summary line."""
    if bf16["tokens"] != f32["tokens"] or bf16["model"] != f32["model"]:
        return False, f"perplexity reports of different streams: {bf16['tokens']} tokens of {bf16['model']} " \
                      f"against {f32['tokens']} of {f32['model']}"
    low, ref = bf16["modes"]["sink"]["ppl"], f32["modes"]["sink"]["ppl"]
    gap = abs(low - ref) / ref
    ok = gap <= within
    return ok, (f"perplexity over {bf16['tokens']} tokens ({bf16['model']}, sink cache, {bf16['device']}): "
                f"bfloat16 {low:.3f}, float32 {ref:.3f}, {100 * gap:.2f}% apart "
                f"({'within' if ok else 'FAILED: over'} {100 * within:g}%)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bf16", type=Path)
    parser.add_argument("float32", type=Path)
    parser.add_argument("--within", type=float, default=0.01)
    args = parser.parse_args(argv)
    ok, line = compare(json.loads(args.bf16.read_text()), json.loads(args.float32.read_text()), args.within)
    sys.stdout.write(line + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
