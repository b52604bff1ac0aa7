"""Offline evaluations of the sink cache on a long text.

- :mod:`engine.evaluate.ppl`: streaming perplexity of the sink cache against window attention, a dense
  (never evicting) cache and the re-computation oracle (StreamingLLM, Figure 3).
- :mod:`engine.evaluate.attention`: how much attention each layer pays to the first tokens (Figure 2).
- :mod:`engine.evaluate.cli`: ``eval ppl`` and ``eval attention`` command lines.
"""
