"""The families whose decode step is owned by this server (one module each)."""
