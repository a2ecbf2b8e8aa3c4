"""The replica's HTTP surface (FastAPI, served through ``@serve.ingress`` so Serve's access log and metrics name
each route): ``POST /v1/completions``, ``POST /v1/chat/completions`` (SSE with ``stream``), ``GET /v1/models``,
``GET /v1/models/{id}``, ``GET /health``.

Every answer that is not a success is an OpenAI error body with its status: invalid JSON, wrong types and
unknown fields (400), unknown model or path (404), wrong method (405), slow or oversized bodies (408, 413),
a full replica (503 with Retry-After); an unexpected failure is a 500 in the same shape, logged once. Errors
known before output (a prompt over the limit with ``stream: true`` included) get their status, never a 200.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from aded_ray.serve import openai_api as oa
from aded_ray.serve.errors import APIError, error_body, validation_message

log = logging.getLogger("ray.serve")


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


async def read_body(request: Request, max_bytes: int, timeout_s: float) -> bytes:
    """The request body, bounded in size and in time (the proxy guard normally enforces both first)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise APIError(400, "invalid Content-Length header")
        if int(declared) > max_bytes:
            raise APIError(413, f"the request body ({declared} bytes) is larger than the limit of {max_bytes} bytes")

    async def read() -> bytes:
        parts, n = [], 0
        async for part in request.stream():
            n += len(part)
            if n > max_bytes:
                raise APIError(413, f"the request body is larger than the limit of {max_bytes} bytes")
            parts.append(part)
        return b"".join(parts)

    try:
        return await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout_s:g} s") from None


def parse_request(raw: bytes, cls):
    """Strict JSON (no NaN/Infinity, bounded nesting) into ``cls``; errors are 400s naming the field."""
    if not raw.strip():
        raise APIError(400, "the request body is empty: send a JSON object")
    try:
        data = json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, not {type(data).__name__}")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        msg, param = validation_message(e.errors(include_url=False, include_input=False))
        raise APIError(400, msg, param=param) from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply") from None


class _Stream(StreamingResponse):
    """An SSE response that stops its generation however the response ends (sent, client gone, cancelled)."""

    def __init__(self, content, stream):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._gen_stream = stream

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._gen_stream.cancel()


class CatchAll:
    """Innermost safety net: an unexpected exception becomes one logged 500 with an OpenAI body and is not
    re-raised (so Serve logs no stack trace per request and asyncio no 'Task exception was never
    retrieved')."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as e:  # noqa: BLE001
            log.error("%s %s failed: %s: %s", scope.get("method"), scope.get("path"), type(e).__name__, e,
                      exc_info=not isinstance(e, (RuntimeError, OSError)))
            if not started:
                body = json.dumps(error_body(f"internal error: {type(e).__name__}", "server_error", None, 500))
                await send({"type": "http.response.start", "status": 500,
                            "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": body.encode()})


def build_api() -> FastAPI:
    """A fresh app (one per replica); ``app.state.server`` is set to the replica's :class:`Replica`."""
    api = FastAPI(title="aded_ray", description="ADED speculative decoding, OpenAI-style", docs_url=None,
                  redoc_url=None, openapi_url=None)
    api.add_middleware(CatchAll)

    @api.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        msg = {404: f"no route {request.url.path}", 405: f"method {request.method} is not allowed on "
                                                            f"{request.url.path}"}.get(exc.status_code, str(exc.detail))
        return JSONResponse(APIError(exc.status_code, msg).body(), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @api.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        msg, param = validation_message(exc.errors())
        return JSONResponse(APIError(400, msg, param=param).body(), status_code=400)

    async def generate(request: Request, cls):
        server = request.app.state.server
        a = server.args
        req = parse_request(await read_body(request, a.max_body_bytes, a.body_timeout_s), cls)
        if req.stream:
            stream, chat = await server.open(req)       # validation, admission, tokenization: before the 200
            return _Stream(server.sse(req, stream, chat), stream)
        return await server.complete(req)

    @api.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, oa.CompletionRequest)

    @api.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, oa.ChatCompletionRequest)

    @api.get("/v1/models")
    async def models(request: Request):
        return {"object": "list", "data": [oa.model_card(request.app.state.server.args.served_model_name)]}

    @api.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        name = request.app.state.server.args.served_model_name
        if model_id != name:
            raise APIError(404, f"model {model_id!r} does not exist; this server serves {name!r}",
                           "not_found_error", "model")
        return oa.model_card(name)

    @api.get("/health")
    async def health(request: Request):
        t0 = time.perf_counter()
        body = request.app.state.server.health()
        body["answered_ms"] = round(1000 * (time.perf_counter() - t0), 3)
        return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)

    return api
