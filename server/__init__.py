"""sinkserve HTTP layer: OpenAI-compatible routes over ``engine.Engine`` (``create_app`` in ``server.app``)."""
