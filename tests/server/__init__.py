"""Tests of the HTTP layer against a real uvicorn server and a tiny engine."""
