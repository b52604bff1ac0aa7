"""The scheduling room: the scheduler (admission, prefill chunks, batched decode steps) and output processing
(sampling, grammar masks, detokenization, stops)."""
