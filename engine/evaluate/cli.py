"""Command lines of the evaluations: ``eval ppl``, ``eval attention`` and ``eval recall``.

Mounted under a CLI with :func:`add_eval_parser` and dispatched with :func:`run_eval`; also runnable on
its own: ``python -m engine.evaluate.cli ppl --tokens 20000 --mode sink,window,dense,recompute``.
"""

from __future__ import annotations

import argparse
import logging
import sys

from engine.config import parse_quantize
from engine.evaluate.ppl import DEFAULT_TEXT, MODES

log = logging.getLogger(__name__)


def _modes(value: str) -> list[str]:
    modes = [m.strip() for m in value.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if not modes or unknown:
        raise argparse.ArgumentTypeError(f"modes must be a comma list of {', '.join(MODES)}")
    return modes


def _fill_eval_parser(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="eval_command", metavar="{ppl,attention,recall}", required=True)

    ppl = commands.add_parser("ppl", help="streaming perplexity: sink cache vs window, dense and recompute")
    ppl.add_argument("--text", default=str(DEFAULT_TEXT), help="text file (default: the shipped tinyshakespeare)")
    ppl.add_argument("--tokens", type=int, default=20_000, help="tokens of the text to score")
    ppl.add_argument("--mode", type=_modes, default=list(MODES), help="comma list of " + ",".join(MODES))
    ppl.add_argument("--sink-tokens", type=int, default=4)
    ppl.add_argument("--window", type=int, default=1020)
    ppl.add_argument("--evict-block", type=int, default=64)
    ppl.add_argument("--chunk", type=int, default=64, help="tokens per forward pass")
    ppl.add_argument("--model", default=None, help="model directory or .gguf (default: the embedded model)")
    ppl.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                     help="auto: bfloat16 on a GPU, else float32")
    ppl.add_argument("--quantize", default="auto", type=parse_quantize,
                        help="auto (int4 on CPU for Q4_1 GGUF weights), none, int4 or int8 (see README)")
    ppl.add_argument("--out", default="results/ppl", help="output folder for ppl.json, ppl.png, ppl.md")

    attention = commands.add_parser("attention", help="share of attention on the first 16 positions per layer")
    attention.add_argument("--text", default=str(DEFAULT_TEXT))
    attention.add_argument("--tokens", type=int, default=1024)
    attention.add_argument("--model", default=None)
    attention.add_argument("--out", default="results/attention")

    _add_recall_parser(commands)


def _ints(value: str) -> list[int]:
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {value!r}") from exc


def _add_recall_parser(commands) -> None:
    from engine.evaluate.recall import MODES as RECALL_MODES

    recall = commands.add_parser("recall", help="passkey retrieval past the window: dense, sink cache, recall")
    recall.add_argument("--seeds", type=int, default=5, help="seeds per depth")
    recall.add_argument("--depths", type=_ints, default=[1500, 3000, 4500, 6000],
                        help="comma list of tokens between the passkey and the question")
    recall.add_argument("--mode", type=lambda v: [m for m in v.split(",") if m], default=list(RECALL_MODES),
                        help="comma list of " + ",".join(RECALL_MODES))
    recall.add_argument("--sink-tokens", type=int, default=4)
    recall.add_argument("--window", type=int, default=1020, help="window of the plain cache (recall reserves "
                        "its segment from it: same cache size)")
    recall.add_argument("--evict-block", type=int, default=64)
    recall.add_argument("--chunk", type=int, default=64)
    recall.add_argument("--recall-blocks", type=int, default=4, help="recall segment size in blocks")
    recall.add_argument("--score", default="attention", choices=["attention", "quest", "mean"])
    recall.add_argument("--ppl-tokens", type=int, default=20_000, help="streaming perplexity tokens (0: skip)")
    recall.add_argument("--turn", type=int, default=1024, help="tokens between recall turns in the perplexity run")
    recall.add_argument("--extra", action="store_true", help="add the recall segment to the cache instead of "
                        "reserving it from the window")
    recall.add_argument("--text", default=str(DEFAULT_TEXT))
    recall.add_argument("--model", default=None)
    recall.add_argument("--out", default="results/recall")


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``eval`` command (with ``ppl``, ``attention`` and ``recall``) to a CLI's sub-parsers."""
    parser = subparsers.add_parser("eval", help="offline evaluations of the sink cache")
    _fill_eval_parser(parser)
    return parser


def run_eval(args: argparse.Namespace) -> dict:
    """Run the evaluation ``args`` describe (parsed by :func:`add_eval_parser`); log a summary."""
    if args.eval_command == "ppl":
        from engine.evaluate.ppl import markdown_table, run_ppl

        report = run_ppl(args.text, args.tokens, args.mode, args.sink_tokens, args.window, args.out,
                         model=args.model, dtype=args.dtype, evict_block=args.evict_block, chunk=args.chunk,
                         quantize=args.quantize)
        log.info("perplexity written to %s\n%s", args.out, markdown_table(report))
        return report
    if args.eval_command == "attention":
        from engine.evaluate.attention import run_attention

        report = run_attention(args.text, args.out, tokens=args.tokens, model=args.model)
        for layer in report["layers"]:
            log.info("layer %2d: position 0 %.3f, positions 0-3 %.3f, rest %.3f", layer["layer"],
                     layer["shares"][0], sum(layer["shares"][:4]), layer["rest"])
        return report
    if args.eval_command == "recall":
        from engine.evaluate.recall import markdown, run_recall

        unknown = sorted(set(args.mode) - {"dense", "sink", "recall"})
        if unknown:
            raise ValueError(f"unknown recall modes {unknown}")
        report = run_recall(args.out, seeds=args.seeds, depths=args.depths, modes=args.mode,
                            sink_tokens=args.sink_tokens, window=args.window, evict_block=args.evict_block,
                            chunk=args.chunk, blocks=args.recall_blocks, score=args.score,
                            ppl_tokens=args.ppl_tokens, turn=args.turn, text_path=args.text, model=args.model,
                            extra=args.extra)
        log.info("recall written to %s\n%s", args.out, markdown(report, args.mode))
        return report
    raise ValueError(f"unknown eval command {args.eval_command!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.evaluate.cli", description="sinkserve evaluations")
    _fill_eval_parser(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_eval(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
