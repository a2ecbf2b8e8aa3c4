"""Typed errors of the engine: the HTTP layer maps them by type and field, never by parsing messages."""
from __future__ import annotations


class InvalidParameter(ValueError):
    """A request parameter has a bad value. ``param`` names it with the OpenAI request's field name
    (``prompt``, ``messages``, ``max_tokens``, ``temperature``, ``top_p``, ``top_k``, ``seed``, ...)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param
