"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` with the matching HTTP status.

Used by the replica's FastAPI app (every handler, including 404/405 and body-parse errors) and by the proxy
guard (:mod:`aded_ray.serve.proxy`), which rewrites the proxy's own plain-text errors into the same shape.
"""
from __future__ import annotations

import json

TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error", 409: "conflict_error",
         413: "invalid_request_error", 415: "invalid_request_error", 422: "invalid_request_error",
         429: "rate_limit_error", 431: "invalid_request_error", 499: "client_closed_request",
         500: "server_error", 502: "server_error", 503: "service_unavailable", 504: "timeout_error"}


class APIError(Exception):
    """An error with its HTTP status; raised anywhere in request handling, answered as an OpenAI error."""

    def __init__(self, status: int, message: str, type_: str | None = None, param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param or None, headers
        self.type = type_ or TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.status)


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: int | str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param or None, "code": code}}


def error_bytes(status: int, message: str, param: str | None = None, type_: str | None = None) -> bytes:
    return json.dumps(APIError(status, message, type_, param).body()).encode()


def overloaded(what: str) -> APIError:
    return APIError(503, f"{what}; retry later", "service_unavailable", None, {"Retry-After": "1"})


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "bytes"}


def loc_param(loc) -> str | None:
    """The request field a pydantic error location names: ``('body', 'messages', 0, 'content')`` ->
    ``messages.0.content``; union-member tags (``str``, ``list[int]``, ``function-after[...]``) are dropped,
    and a location that is a character offset (malformed JSON) names no field."""
    parts = []
    for x in loc or ():
        if isinstance(x, int):
            if not parts:         # an index before any field name: a JSON offset, not a field
                return None
            parts.append(str(x))
        elif isinstance(x, str):
            if x == "body" and not parts:
                continue
            if "[" in x or x in _TYPE_TAGS or x.startswith("function-"):
                continue
            parts.append(x)
    return ".".join(parts) or None


_MISMATCH = {"string_type", "list_type", "int_type", "float_type", "bool_type", "dict_type", "model_type",
             "model_attributes_type", "none_required", "is_instance_of", "literal_error", "missing"}


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """One message for a list of pydantic errors, and the first field's name. A value that matches none of a
    union's types yields one error per member; the most specific one is kept (e.g. a token id's range
    rather than "should be a string")."""
    params = [loc_param(e.get("loc")) or "" for e in errors]
    deeper = [e for e, p in zip(errors, params)   # "should be a string" when another member got further
              if not (e.get("type") in _MISMATCH and any(q.startswith(p + ".") for q in params if q))]
    by_param: dict = {}
    for e in deeper or errors:
        by_param.setdefault(loc_param(e.get("loc")), []).append(e)
    msgs, first = [], None
    for p, errs in by_param.items():
        specific = [e for e in errs if e.get("type") not in _MISMATCH] or errs[:1]
        e = max(specific, key=lambda e: len(e.get("loc", ())))
        p = loc_param(e.get("loc")) or p
        first = first or p
        msg = str(e.get("msg", "invalid"))
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        msgs.append(msg if (p and msg.startswith(p + ":")) or not p else f"{p}: {msg}")
        if len(msgs) == 5:
            break
    return "; ".join(msgs) or "invalid request", first


PARAMS = ("max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed", "stop", "prompt",
          "messages")


def from_value_error(e: Exception) -> APIError:
    """A ``ValueError`` from the engine (validation before any work) as a 400 naming the field: the engine's
    :class:`aded_ray.errors.InvalidParameter` carries it; an untyped one is read from the message."""
    msg = str(e)
    if getattr(e, "param", None):
        return APIError(400, msg[:1000], "invalid_request_error", e.param)
    param = next((p for p in PARAMS if p in msg), None)
    if "max_new_tokens" in msg:
        param = "max_tokens"
    elif "max_prompt_tokens" in msg or "prompt" in msg:
        param = "messages" if "messages" in msg else "prompt"
    return APIError(400, msg[:1000], "invalid_request_error", param)
