"""The ``sinkserve`` command: ``serve`` (server/), ``eval`` (engine/evaluate/) and ``bench`` (bench/).

The one module that knows all three, so that none of them needs another's command line: the server does
not import the benchmarks, which use the server (tests/test_layout.py checks both directions).
"""
