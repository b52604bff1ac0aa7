"""Anthropic's Messages API (``/v1/messages``) on the shared serving path: protocol, conversion, replies, errors."""
