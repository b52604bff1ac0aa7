"""The cache room: the sink cache (sinks + rolling window per row, in-cache positions) and RoPE re-rotation."""
