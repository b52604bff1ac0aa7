"""Single-stream prefill and decode speed: sinkserve vs llama.cpp on the same GGUF and thread count.

Runs only when ``llama_cpp`` (llama-cpp-python, the optional extra ``sinkserve[llamacpp]``; never a runtime
dependency) is importable; otherwise the report says ``"skipped: llama-cpp-python not installed"``.
Both engines get the same token ids (the shipped text, ``prefill_tokens`` of them, then ``decode_steps``
more fed one at a time, teacher-forced so both do identical work) and the same number of CPU threads:

- llama.cpp: ``Llama(model_path=<the embedded GGUF>, n_threads=..., n_batch=chunk)``; ``eval`` of the
  prompt, then ``eval`` of one token per step. It computes in the GGUF's quantized format (Q4_1).
- sinkserve: the :class:`~engine.model.runner.Runner` over a :class:`~engine.cache.sink.SinkCache` (sinks + window,
  StreamingLLM, arXiv 2309.17453; section 4.5 compares it with dense attention and the sliding window with
  re-computation, see the ``decode`` suite), prefilled in chunks of ``chunk``, then one decode step per
  token: prefill on the float weights, decode with the weights the engine serves with (``quantize=auto``
  on a CPU: the GGUF's own Q4_1 codes through torch's int4 kernel, see engine/model/quantize.py).

Report (``llamacpp.json``): ``prefill_tokens_per_s`` and ``decode_tokens_per_s`` of each, and the ratios
sinkserve / llama.cpp.
"""

from __future__ import annotations

import importlib
import logging
import time
from pathlib import Path

import torch

from bench.common import Timer, environment, history_ids, markdown_table, pyplot, ratio, write_report
from engine.cache.sink import SinkCache
from engine.model.loader import LoadedModel, embedded_gguf_path
from engine.model.runner import serving_runner

log = logging.getLogger(__name__)

SKIPPED = "skipped: llama-cpp-python not installed"


def llama_cpp_module():
    try:
        return importlib.import_module("llama_cpp")
    except ImportError:
        return None


def sinkserve_speed(loaded: LoadedModel, ids: list[int], prefill_tokens: int, decode_steps: int, *,
                    sink_tokens: int = 4, window: int = 1020, chunk: int = 512) -> dict:
    cache = SinkCache(loaded.shape, 1, sink_tokens + window, sink_tokens, 64, loaded.inv_freqs,
                      dtype=loaded.dtype, device=loaded.device)
    runner = serving_runner(loaded.model, cache, loaded.quantize, max_rows=1)
    runner.prefill(0, ids[:8], chunk)  # warm the kernels
    cache.reset(0)
    with Timer(loaded.device) as prefill:
        runner.prefill(0, ids[:prefill_tokens], min(chunk, window))
    with Timer(loaded.device) as decode:
        for token in ids[prefill_tokens : prefill_tokens + decode_steps]:
            runner.decode([0], [token])
    owned = runner.decoder is not None and runner.decoder.prefills
    return {"prefill_weights": "a bf16 copy of the dequantized weights (the owned step)" if owned
            else "the dequantized float weights",
            "prefill_tokens_per_s": prefill_tokens / prefill.seconds, "decode_tokens_per_s": decode_steps / decode.seconds,
            "prefill_s": prefill.seconds, "decode_s": decode.seconds}


def llamacpp_speed(module, gguf: Path, ids: list[int], prefill_tokens: int, decode_steps: int, *, threads: int,
                   chunk: int = 512) -> dict:
    llm = module.Llama(model_path=str(gguf), n_ctx=prefill_tokens + decode_steps + 16, n_threads=threads,
                       n_threads_batch=threads, n_batch=chunk, n_gpu_layers=0, verbose=False)
    llm.eval(ids[:8])  # warm up
    llm.reset()
    start = time.perf_counter()
    llm.eval(ids[:prefill_tokens])
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    for token in ids[prefill_tokens : prefill_tokens + decode_steps]:
        llm.eval([token])
    decode_s = time.perf_counter() - start
    version = getattr(module, "__version__", None)
    close = getattr(llm, "close", None)
    if close:
        close()
    return {"prefill_tokens_per_s": prefill_tokens / prefill_s, "decode_tokens_per_s": decode_steps / decode_s,
            "prefill_s": prefill_s, "decode_s": decode_s, "version": version}


def measure_llamacpp(loaded: LoadedModel, *, prefill_tokens: int = 512, decode_steps: int = 64,
                     gguf: Path | None = None, module=None, chunk: int = 512) -> dict:
    """Compare prefill and decode tokens/s of both engines (skipped without llama-cpp-python)."""
    module = module if module is not None else llama_cpp_module()
    report = {"suite": "llamacpp", "environment": environment(loaded, None),
              "settings": {"prefill_tokens": prefill_tokens, "decode_steps": decode_steps, "chunk": chunk,
                           "threads": torch.get_num_threads()},
              "notes": []}
    if module is None:
        report["status"] = SKIPPED
        report["notes"].append(SKIPPED + " (pip install 'sinkserve[llamacpp]')")
        return report
    if loaded.device.type != "cpu":
        report["status"] = f"skipped: llama.cpp is compared on CPU only (sinkserve runs on {loaded.device})"
        return report
    gguf = Path(gguf) if gguf is not None else embedded_gguf_path()
    ids = history_ids(loaded.tokenizer, prefill_tokens + decode_steps)
    ours = sinkserve_speed(loaded, ids, prefill_tokens, decode_steps, chunk=chunk)
    theirs = llamacpp_speed(module, gguf, ids, prefill_tokens, decode_steps, threads=torch.get_num_threads(),
                            chunk=chunk)
    report.update({
        "status": "ok",
        "gguf": str(gguf),
        "sinkserve": ours,
        "llamacpp": theirs,
        "ratios": {
            "prefill_sinkserve_over_llamacpp": ratio(ours["prefill_tokens_per_s"], theirs["prefill_tokens_per_s"]),
            "decode_sinkserve_over_llamacpp": ratio(ours["decode_tokens_per_s"], theirs["decode_tokens_per_s"]),
        },
    })
    mode = report["environment"].get("quantize_in_effect")
    decode_weights = f"{mode} weights" if mode else f"the dequantized weights in {report['environment']['dtype']}"
    report["notes"].append(f"llama.cpp computes in the GGUF's quantized format; sinkserve prefills on {ours['prefill_weights']} "
                           f"and decodes with {decode_weights}. Decode steps are teacher-forced.")
    return report


def table(report: dict) -> str:
    if report.get("status") != "ok":
        return f"{report.get('status')}\n"
    rows = [[name, report[key]["prefill_tokens_per_s"], report[key]["decode_tokens_per_s"]]
            for name, key in (("sinkserve", "sinkserve"), ("llama.cpp", "llamacpp"))]
    rows.append(["sinkserve / llama.cpp", report["ratios"]["prefill_sinkserve_over_llamacpp"],
                 report["ratios"]["decode_sinkserve_over_llamacpp"]])
    return markdown_table(["engine", "prefill tokens/s", "decode tokens/s"], rows)


def plot(report: dict, path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8, 4))
    names = ["sinkserve", "llama.cpp"]
    for ax, key, title in zip(axes, ("prefill_tokens_per_s", "decode_tokens_per_s"), ("prefill", "decode"), strict=True):
        ax.bar(names, [report["sinkserve"][key], report["llamacpp"][key]], color=["tab:blue", "tab:green"])
        ax.set_title(f"{title} tokens/s")
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"Single stream, {report['settings']['threads']} threads ({report['environment']['model']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_llamacpp(loaded: LoadedModel, out_dir, quick: bool = False, **kwargs) -> dict:
    if quick:
        kwargs.setdefault("prefill_tokens", 256)
        kwargs.setdefault("decode_steps", 32)
    report = measure_llamacpp(loaded, **kwargs)
    report["files"] = write_report(out_dir, "llamacpp", report, table(report),
                                   plot if report.get("status") == "ok" else None)
    return report
