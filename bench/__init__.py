"""Benchmarks of sinkserve: decode cost, follow-up latency, concurrency, memory and llama.cpp.

Each suite (``bench.<suite>``) has a core ``measure_*`` function that takes a loaded model (or a
started :class:`~engine.engine.Engine`) and sizes, and returns a JSON-ready report; ``run_*`` loads the
model, runs it and writes ``OUT/<suite>.json``, ``OUT/<suite>.png`` and ``OUT/<suite>.md``.
The baselines follow StreamingLLM (Xiao et al. 2023, arXiv 2309.17453, section 4.5 "Efficiency
Results"): dense attention whose cache grows with the conversation, and a sliding window with
re-computation, which re-encodes the last ``window`` tokens for every generated token.

``load`` and ``api`` are the exceptions: they drive a server over HTTP (:mod:`bench.load`, :mod:`bench.api`). ``profile``
splits a decode step's time into forward, sampling, detokenization, hand-off and bookkeeping.
``constrained`` compares 8 sessions decoding under a JSON-schema grammar with the same 8 free.

Command line: ``sinkserve bench {decode,followup,concurrency,memory,llamacpp,load,api,profile,constrained,all}`` (see
:mod:`bench.cli`; ``all`` runs every suite but ``load``, ``api``, ``profile`` and ``constrained``).
"""

SUITES = ("decode", "followup", "concurrency", "memory", "llamacpp", "load", "api", "profile", "constrained")
