"""The Ray Serve application: ``import_path: aded_ray.serve.app:build_app`` with typed ``args``.

HTTP (OpenAI-style): ``POST /v1/completions``, ``POST /v1/chat/completions`` (SSE with ``stream``),
``GET /v1/models``, ``GET /health``. Python: ``serve.get_app_handle("aded").remote("a prompt").result()``
returns the completion text (a request object or dict returns the OpenAI-style response);
``handle.options(stream=True).remote(...)`` yields text chunks. Both paths share the request models of
:mod:`aded_ray.serve.openai_api`.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve

from aded_ray.config import DraftConfig, EngineConfig, VerifyConfig
from aded_ray.serve import openai_api as oa

log = logging.getLogger("ray.serve")
_END = object()


class AppArgs(BaseModel):
    """Everything ``deployments/aded.yaml`` can set under ``args`` (all optional)."""

    model_config = ConfigDict(extra="forbid")
    model: str = "smollm2"
    served_model_name: str = "smollm2"
    store: str | None = Field(None, description="tri-gram store file; default: the ShareGPT store if built")
    redis_url: str | None = Field(None, description="shared store; default $ADED_REDIS_URL; 'off' disables")
    num_replicas: int | Literal["auto"] = Field(1, description='a number, or "auto" (Serve autoscaling)')
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    tp_size: int = Field(1, ge=1, le=64, description="tensor-parallel ranks (DeepSpeed AutoTP actors) per replica")
    cpus_per_rank: float = Field(0.5, gt=0, description="CPUs reserved per rank actor (CPU tensor parallelism)")
    step_timeout_s: float = Field(60.0, gt=0, description="a tensor-parallel step longer than this fails")
    mode: str = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(None, ge=1)
    draft: DraftConfig = DraftConfig()
    budget: Literal["auto"] | int = "auto"
    max_prompt_tokens: int = Field(4096, ge=1)
    max_new_tokens: int = Field(1024, ge=1)
    default_max_tokens: int = Field(16, ge=1)
    max_ongoing_requests: int = Field(4, ge=1)
    max_queued_requests: int = Field(16, ge=0)
    flush_interval_s: float = Field(0.2, gt=0, le=60)

    def engine_config(self) -> EngineConfig:
        return EngineConfig(store=self.store, draft=self.draft, max_prompt_tokens=self.max_prompt_tokens,
                            max_new_tokens=self.max_new_tokens,
                            verify=VerifyConfig(model=self.model, mode=self.mode, device=self.device,
                                                threads=self.threads, budget=self.budget, tp_size=self.tp_size,
                                                step_timeout_s=self.step_timeout_s))


class UserConfig(BaseModel):
    """Tunables applied without a restart (``user_config`` / ``reconfigure``)."""

    model_config = ConfigDict(extra="forbid")
    max_nodes: int | None = Field(None, ge=0, le=512)
    budget: Literal["auto"] | int | None = None
    flush_interval_s: float | None = Field(None, gt=0, le=60)


api = FastAPI(title="aded_ray", description="ADED speculative decoding, OpenAI-style")


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.headers = status, message, type_, param, headers


def _loc(err: dict) -> str:
    return ".".join(str(x) for x in err.get("loc", ()) if x not in ("body",) and not str(x).startswith("function-"))


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    errs = exc.errors()
    msg = "; ".join(f"{_loc(e) or 'body'}: {e.get('msg')}" for e in errs[:5])
    return JSONResponse(oa.error_body(msg, "invalid_request_error", _loc(errs[0]) if errs else None, 400),
                        status_code=400)


@api.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError):
    return JSONResponse(oa.error_body(exc.message, exc.type, exc.param, exc.status), status_code=exc.status,
                        headers=exc.headers)


@api.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception):
    log.error("request failed: %s: %s", type(exc).__name__, exc)
    return JSONResponse(oa.error_body(f"generation failed: {type(exc).__name__}: {exc}"[:500], "server_error",
                                      None, 500), status_code=500)


def _value_error(e: Exception) -> APIError:
    msg = str(e)
    param = next((p for p in ("max_tokens", "temperature", "top_p", "top_k", "prompt", "messages")
                  if p in msg), None)
    if "max_new_tokens" in msg:
        param = "max_tokens"
    return APIError(400, msg, "invalid_request_error", param)


@serve.deployment(name="ADEDServer", health_check_period_s=10, health_check_timeout_s=30,
                  graceful_shutdown_timeout_s=60)
class ADEDServer:
    """One replica. HTTP requests are routed through the FastAPI app ``api`` (validation, OpenAI errors);
    handle calls arrive at ``__call__`` with a prompt or a request. (Serve forbids ``__call__`` on
    ``@serve.ingress`` classes, so the FastAPI app is driven here as a plain ASGI app.)"""

    def __init__(self, args: dict):
        from aded_ray.engine import Engine

        self.args = AppArgs(**args)
        # Every torch call of this replica runs on this one thread: construction (model packing, checks) and
        # generation. A second thread issuing OpenMP/oneDNN work starts a second thread team that competes
        # for the cores (measured: packed fp32 passes ~30% slower).
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aded-engine")
        threads = self.args.threads or (max(1, int(self.args.num_cpus)) if self.args.num_cpus >= 1 else None)

        def make_engine():
            if threads:
                import torch

                torch.set_num_threads(threads)
            # with tp_size > 1 the rank actors go into bundles 1..tp of this replica's placement group
            return Engine(self.args.engine_config(), tp_bundle_offset=1 if self.args.tp_size > 1 else None)

        self.engine = self.pool.submit(make_engine).result()
        self.store = None
        url = self.args.redis_url if self.args.redis_url is not None else os.environ.get("ADED_REDIS_URL")
        if url and url != "off":
            from aded_ray.store.redis_store import SharedStore

            self.store = SharedStore(self.engine.matrix, url, drafter=self.engine.drafter,
                                     flush_interval_s=self.args.flush_interval_s,
                                     pull_interval_s=self.args.flush_interval_s)
        self.capacity = self.args.max_ongoing_requests + self.args.max_queued_requests
        self.inflight = 0
        from aded_ray.serve.metrics import SpecMetrics

        self.metrics = SpecMetrics(self.args.served_model_name)
        api.state.server = self
        log.info("aded_ray replica ready: mode %s, speculation %s, shared store %s", self.engine.mode,
                 self.engine.speculate, "on" if self.store else "off")

    # ---- lifecycle ------------------------------------------------------------------------------
    def reconfigure(self, config: dict) -> None:
        cfg = UserConfig(**(config or {}))
        self.engine.reconfigure(max_nodes=cfg.max_nodes, budget=cfg.budget)
        if self.store is not None and cfg.flush_interval_s:
            self.store.flush_interval_s = self.store.pull_interval_s = cfg.flush_interval_s

    def check_health(self) -> None:
        if self.pool._shutdown:
            raise RuntimeError("generation thread pool is shut down")
        if not self.engine.healthy():
            raise RuntimeError(f"tensor-parallel group is broken: {self.engine.group.broken}")
        if self.store is not None:
            self.metrics.redis_up.set(self.store.stats["redis_up"])  # reported, never a health condition

    def __del__(self):
        store = getattr(self, "store", None)
        if store is not None:
            store.close()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()

    # ---- generation core ------------------------------------------------------------------------
    async def _chunks(self, prompt, *, chat: bool, max_tokens: int, sampling: dict) -> AsyncIterator:
        """Run the engine in a worker thread; yield its chunks. Closing this generator stops decoding."""
        if self.inflight >= self.capacity:
            raise APIError(503, f"over capacity ({self.inflight} requests in flight); retry later",
                           "server_overloaded", None, {"Retry-After": "1"})
        try:
            gen = self.engine.generate(prompt, chat=chat, max_new_tokens=max_tokens, **sampling)
        except ValueError as e:
            raise _value_error(e) from e
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def work():
            try:
                for c in gen:
                    loop.call_soon_threadsafe(q.put_nowait, c)
                    if cancel.is_set():
                        break
            except Exception as e:  # noqa: BLE001 - handed to the request
                loop.call_soon_threadsafe(q.put_nowait, e)
            finally:
                gen.close()
                loop.call_soon_threadsafe(q.put_nowait, _END)

        self.inflight += 1
        self.metrics.running.set(self.inflight)
        loop.run_in_executor(self.pool, work)
        stats = None
        try:
            while True:
                item = await q.get()
                if item is _END:
                    break
                if isinstance(item, Exception):
                    raise item
                if item.stats is not None:
                    stats = item.stats
                yield item
        finally:
            cancel.set()
            self.inflight -= 1
            self.metrics.running.set(self.inflight)
            self.metrics.record_request(stats)

    def _check_model(self, req) -> None:
        if req.model is not None and req.model != self.args.served_model_name:
            raise APIError(404, f"model {req.model!r} does not exist; this server serves "
                                f"{self.args.served_model_name!r}", "not_found_error", "model")

    def _limit(self, req) -> int:
        n = req.limit(self.args.default_max_tokens) if isinstance(req, oa.ChatCompletionRequest) else req.max_tokens
        if n > self.args.max_new_tokens:
            raise APIError(400, f"max_tokens {n} is more than this server's limit {self.args.max_new_tokens}",
                           "invalid_request_error", "max_tokens")
        return n

    def _prompt(self, req):
        if isinstance(req, oa.ChatCompletionRequest):
            return [m.model_dump() for m in req.messages], True
        if isinstance(req.prompt, list):
            return self.engine.tokenizer.decode(req.prompt), False
        return req.prompt, False

    async def _complete(self, req) -> dict:
        self._check_model(req)
        prompt, chat = self._prompt(req)
        text, finish, stats, n_out = [], "stop", None, 0
        async for c in self._chunks(prompt, chat=chat, max_tokens=self._limit(req), sampling=req.sampling_kwargs()):
            text.append(c.text)
            n_out += sum(1 for t in c.token_ids if t not in self.engine.eos_ids)
            if c.finish_reason:
                finish, stats = c.finish_reason, c.stats
        n_prompt = stats.prompt_tokens if stats else 0
        extra = stats.to_dict() if (stats and req.return_stats) else None
        make = oa.chat_response if chat else oa.completion_response
        return make(oa.new_id("chatcmpl" if chat else "cmpl"), self.args.served_model_name, "".join(text), finish,
                    n_prompt, n_out, extra)

    async def _sse(self, req) -> AsyncIterator[str]:
        chat = isinstance(req, oa.ChatCompletionRequest)
        rid = oa.new_id("chatcmpl" if chat else "cmpl")
        name = self.args.served_model_name
        prompt, _ = self._prompt(req)
        chunks = self._chunks(prompt, chat=chat, max_tokens=self._limit(req), sampling=req.sampling_kwargs())
        first, n_out, stats = True, 0, None
        try:
            async for c in chunks:
                n_out += sum(1 for t in c.token_ids if t not in self.engine.eos_ids)
                if c.text or c.finish_reason or first:
                    yield f"data: {json.dumps(oa.chunk(rid, name, chat, c.text, c.finish_reason, first))}\n\n"
                    first = False
                if c.finish_reason:
                    stats = c.stats
            if req.stream_options and req.stream_options.include_usage and stats is not None:
                body = oa.chunk(rid, name, chat, None, None)
                body["choices"] = []
                body["usage"] = oa.usage(stats.prompt_tokens, n_out)
                if req.return_stats:
                    body["aded_stats"] = stats.to_dict()
                yield f"data: {json.dumps(body)}\n\n"
        except APIError as e:  # after the 200 header an error travels as a data event
            yield f"data: {json.dumps(oa.error_body(e.message, e.type, e.param, e.status))}\n\n"
        except Exception as e:  # noqa: BLE001
            log.exception("generation failed")
            yield f"data: {json.dumps(oa.error_body(f'generation failed: {e}', 'server_error', None, 500))}\n\n"
        finally:
            await chunks.aclose()
        yield "data: [DONE]\n\n"

    async def _respond(self, req):
        self._check_model(req)
        if req.stream:
            self._limit(req)
            if self.inflight >= self.capacity:
                raise APIError(503, "over capacity; retry later", "server_overloaded", None, {"Retry-After": "1"})
            return StreamingResponse(self._sse(req), media_type="text/event-stream")
        try:
            return await self._complete(req)
        except ValueError as e:
            raise _value_error(e) from e

    # ---- Python handles -------------------------------------------------------------------------
    async def __call__(self, *args, **kwargs):
        """HTTP requests (a starlette ``Request``) and handle calls (a prompt or a request) arrive here."""
        if len(args) == 1 and isinstance(args[0], Request):
            return await _run_asgi(api, args[0])
        req, plain = self._parse_handle_request(*args, **kwargs)
        if _streaming_call():
            return self._stream_text(req)
        try:
            body = await self._complete(req)
        except APIError as e:
            raise ValueError(f"{e.message} (param {e.param})") from None
        except ValueError:
            raise
        if plain:
            return body["choices"][0]["text"] if "text" in body["choices"][0] else \
                body["choices"][0]["message"]["content"]
        return body

    def _parse_handle_request(self, request: Any = None, **kwargs):
        try:
            if isinstance(request, str):
                return oa.CompletionRequest(prompt=request, **kwargs), True
            if isinstance(request, (oa.CompletionRequest, oa.ChatCompletionRequest)):
                return request, False
            if isinstance(request, dict):
                data = {**request, **kwargs}
                cls = oa.ChatCompletionRequest if "messages" in data else oa.CompletionRequest
                return cls(**data), False
        except ValidationError as e:
            raise ValueError(f"invalid request: {e}") from None
        raise ValueError(f"expected a prompt string, a request dict or a request object, got {type(request)!r}")

    async def _stream_text(self, req):
        self._check_model(req)
        prompt, chat = self._prompt(req)
        async for c in self._chunks(prompt, chat=chat, max_tokens=self._limit(req), sampling=req.sampling_kwargs()):
            if c.text:
                yield c.text


@api.post("/v1/completions")
async def completions(req: oa.CompletionRequest, request: Request):
    return await request.app.state.server._respond(req)


@api.post("/v1/chat/completions")
async def chat_completions(req: oa.ChatCompletionRequest, request: Request):
    return await request.app.state.server._respond(req)


@api.get("/v1/models")
async def models(request: Request):
    name = request.app.state.server.args.served_model_name
    return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "aded_ray"}]}


@api.get("/health")
async def health(request: Request):
    s = request.app.state.server
    return {"status": "ok", "speculation": s.engine.speculate, "mode": s.engine.mode, "running": s.inflight,
            "generating": s.engine.busy,
            "redis_up": None if s.store is None else bool(s.store.stats["redis_up"])}


async def _run_asgi(app, request: Request):
    """Drive an ASGI app with a Serve HTTP request; its response is streamed back as it is produced."""
    from starlette.responses import StreamingResponse as _SR

    q: asyncio.Queue = asyncio.Queue()

    async def send(message):
        await q.put(message)

    task = asyncio.create_task(app(request.scope, request.receive, send))
    start = await q.get()
    headers = {k.decode(): v.decode() for k, v in start.get("headers", []) if k.lower() != b"content-length"}

    async def body():
        try:
            while True:
                msg = await q.get()
                if msg.get("type") != "http.response.body":
                    continue
                if msg.get("body"):
                    yield msg["body"]
                if not msg.get("more_body"):
                    break
        finally:
            if not task.done():
                task.cancel()

    return _SR(body(), status_code=start["status"], headers=headers)


def _streaming_call() -> bool:
    """Whether the current handle call was made with ``stream=True`` (Serve does not expose it: the
    replica's streaming entry point is on the stack)."""
    f = sys._getframe(1)
    while f is not None:
        if f.f_code.co_name in ("call_user_generator", "_call_user_generator", "handle_request_streaming"):
            return True
        if f.f_code.co_name in ("call_user_method", "handle_request"):
            return False
        f = f.f_back
    return False


def build_app(args: dict | None = None):
    """Application builder for ``serve run``: validates ``args`` (400-style errors name the field)."""
    a = AppArgs(**(args or {}))
    opts = dict(num_replicas=a.num_replicas, max_ongoing_requests=a.max_ongoing_requests,
                max_queued_requests=a.max_queued_requests,
                backpressure_config={"status_code": 503, "retry_after_s": 1},
                ray_actor_options={"num_cpus": a.num_cpus, "num_gpus": a.num_gpus})
    if a.tp_size > 1:
        # one placement group per replica: bundle 0 for the replica, one bundle per rank actor
        gpu = a.num_gpus > 0 or a.device == "cuda"
        rank = {"CPU": a.cpus_per_rank, "GPU": 1} if gpu else {"CPU": a.cpus_per_rank}
        opts["ray_actor_options"] = {"num_cpus": a.num_cpus, "num_gpus": 0}
        opts["placement_group_bundles"] = [{"CPU": a.num_cpus}] + [rank] * a.tp_size
        opts["placement_group_strategy"] = "STRICT_PACK" if gpu else "PACK"
    return ADEDServer.options(**opts).bind(a.model_dump())
