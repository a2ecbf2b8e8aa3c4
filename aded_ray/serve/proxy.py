"""A guard in front of Ray Serve's HTTP proxy (installed with
``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=aded_ray.serve.proxy:middlewares`` in the environment Ray starts
in; ``aded serve`` sets it).

Serve's proxy hands a request to a replica as soon as its headers arrive and lets the replica pull the body,
so a client that sends half a body holds one of the replica's ``max_ongoing_requests`` slots for as long as
it likes. The guard receives the whole body first, within a size limit and a time limit, so no request
holds replica capacity before its body has arrived. It also

- rejects oversized headers (431) and bodies (413, from ``Content-Length`` before reading, or while reading);
- answers a body that does not arrive in time with 408 and closes the connection;
- drops the headers with which a client could change Serve's handling of its request
  (``x-request-timeout-seconds``, ``x-request-disconnect-disabled``, the multiplexed-model id), and a
  malformed ``x-request-id``;
- turns the proxy's own errors (plain-text 503 backpressure, 408 timeout, 404, a missing response when a
  replica dies: 502) into OpenAI error bodies, keeping ``Retry-After``.

Limits (environment of the proxy, i.e. where Ray starts): ``ADED_HTTP_MAX_BODY_BYTES`` (1 MiB),
``ADED_HTTP_BODY_TIMEOUT_S`` (15), ``ADED_HTTP_MAX_HEADER_BYTES`` (32 KiB), ``ADED_HTTP_MAX_PENDING_BODIES``
(512 connections sending a body at once; past that 503).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import re

from aded_ray.serve.errors import error_bytes

log = logging.getLogger("ray.serve")
CALLBACK = "aded_ray.serve.proxy:middlewares"
_STRIP = {b"x-request-timeout-seconds", b"x-request-disconnect-disabled", b"serve_multiplexed_model_id",
          b"serve-multiplexed-model-id"}
_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")
DEFAULTS = {"max_body_bytes": 1 << 20, "body_timeout_s": 15.0, "max_header_bytes": 32 << 10,
            "max_pending_bodies": 512}


def settings_from_env(env=None) -> dict:
    env = os.environ if env is None else env
    out = dict(DEFAULTS)
    for key, cast in (("max_body_bytes", int), ("body_timeout_s", float), ("max_header_bytes", int),
                      ("max_pending_bodies", int)):
        raw = env.get(f"ADED_HTTP_{key.upper()}")
        if raw:
            value = cast(raw)
            if value <= 0:
                raise ValueError(f"ADED_HTTP_{key.upper()} must be positive, got {raw!r}")
            out[key] = value
    return out


def middlewares() -> list:
    """The proxy callback: the guard with the limits from the environment."""
    from starlette.middleware import Middleware

    return [Middleware(ProxyGuard, **settings_from_env())]


class _TooLarge(Exception):
    pass


class ProxyGuard:
    def __init__(self, app, *, max_body_bytes: int = DEFAULTS["max_body_bytes"],
                 body_timeout_s: float = DEFAULTS["body_timeout_s"],
                 max_header_bytes: int = DEFAULTS["max_header_bytes"],
                 max_pending_bodies: int = DEFAULTS["max_pending_bodies"]):
        self.app = app
        self.max_body_bytes, self.body_timeout_s = max_body_bytes, body_timeout_s
        self.max_header_bytes, self.max_pending_bodies = max_header_bytes, max_pending_bodies
        self.pending = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path", "").startswith("/-/"):
            return await self.app(scope, receive, send)   # websockets; Serve's own /-/healthz and /-/routes
        send = _Logged(send, scope)
        headers = scope.get("headers", [])
        size = sum(len(k) + len(v) + 4 for k, v in headers)
        if size > self.max_header_bytes:
            return await _error(send, 431, f"the request headers ({size} bytes) are larger than the limit of "
                                           f"{self.max_header_bytes} bytes", close=True)
        kept = [(k, v) for k, v in headers
                if k.lower() not in _STRIP and not (k.lower() == b"x-request-id" and not _REQUEST_ID.fullmatch(v))]
        scope = dict(scope, headers=kept)
        declared = [v for k, v in kept if k.lower() == b"content-length"]
        if declared:
            if len(declared) > 1 or not declared[0].isdigit():
                return await _error(send, 400, "invalid Content-Length header", close=True)
            if int(declared[0]) > self.max_body_bytes:
                return await _error(send, 413, f"the request body ({int(declared[0])} bytes) is larger than the "
                                               f"limit of {self.max_body_bytes} bytes", close=True)
        if self.pending >= self.max_pending_bodies:
            return await _error(send, 503, "too many requests are sending their bodies; retry later", close=True,
                                retry_after=True)
        self.pending += 1
        try:
            body = await asyncio.wait_for(self._read(receive), self.body_timeout_s)
        except asyncio.TimeoutError:
            return await _error(send, 408, f"the request body did not arrive within {self.body_timeout_s:g} s",
                                close=True)
        except _TooLarge:
            return await _error(send, 413, f"the request body is larger than the limit of {self.max_body_bytes} "
                                           "bytes", close=True)
        finally:
            self.pending -= 1
        if body is None:
            return                                             # the client went away while sending
        delivered = False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()                             # blocks until the client disconnects

        rewriter = _ErrorRewriter(send)
        await self.app(scope, replay, rewriter)
        if not rewriter.started:                               # the proxy gave no answer: the replica failed
            await _error(send, 502, "the replica serving this request failed; retry", retry_after=True)

    async def _read(self, receive) -> bytes | None:
        parts, n = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return None
            chunk = msg.get("body", b"")
            n += len(chunk)
            if n > self.max_body_bytes:
                raise _TooLarge
            parts.append(chunk)
            if not msg.get("more_body", False):
                return b"".join(parts)


async def _error(send, status: int, message: str, *, close: bool = False, retry_after: bool = False) -> None:
    body = error_bytes(status, message)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    if retry_after:
        headers.append((b"retry-after", b"1"))
    start = {"type": "http.response.start", "status": status, "headers": headers}
    await (send.guard(start, status, message) if isinstance(send, _Logged) else send(start))
    await send({"type": "http.response.body", "body": body})


class _Logged:
    """Logs what the guard itself answers (the proxy's access log only sees requests it forwarded)."""

    def __init__(self, send, scope):
        self.send, self.scope = send, scope

    async def __call__(self, message):
        await self.send(message)

    async def guard(self, message, status: int, text: str):
        log.warning("%s %s %d (aded_ray proxy guard: %s)", self.scope.get("method"), self.scope.get("path"), status,
                    text)
        await self.send(message)


class _ErrorRewriter:
    """Passes responses through; an error response that is not JSON (the proxy's own) is re-sent as an
    OpenAI error body with the same status (a failed replica's 500 as 502) and its ``Retry-After``."""

    def __init__(self, send):
        self.send = send
        self.started = False
        self.start = None
        self.buf = b""

    async def __call__(self, message):
        kind = message["type"]
        if kind == "http.response.start":
            status = message["status"]
            ctype = next((v for k, v in message.get("headers", []) if k.lower() == b"content-type"), b"")
            if status >= 400 and not ctype.startswith(b"application/json"):
                self.start = message
                return
            self.started = True
            return await self.send(message)
        if kind == "http.response.body" and self.start is not None:
            if len(self.buf) < 4096:
                self.buf += message.get("body", b"")[:4096]
            if message.get("more_body", False):
                return
            status = self.start["status"]
            text = self.buf.decode("utf-8", "replace").strip() or "error"
            if status == 500:
                status, text = 502, f"the replica serving this request failed; retry ({text[:200]})"
            try:
                text = json.loads(text) if text.startswith('"') else text
            except ValueError:
                pass
            body = error_bytes(status, str(text)[:1000])
            keep = [(k, v) for k, v in self.start.get("headers", [])
                    if k.lower() not in (b"content-type", b"content-length")]
            self.start, self.started = None, True
            await self.send({"type": "http.response.start", "status": status,
                             "headers": keep + [(b"content-type", b"application/json"),
                                                (b"content-length", str(len(body)).encode())]})
            return await self.send({"type": "http.response.body", "body": body})
        return await self.send(message)
