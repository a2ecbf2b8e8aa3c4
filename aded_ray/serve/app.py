"""The Ray Serve application: ``import_path: aded_ray.serve.app:build_app`` with typed ``args``.

HTTP (OpenAI-style, :mod:`aded_ray.serve.routes`): ``POST /v1/completions``, ``POST /v1/chat/completions``
(SSE with ``stream``), ``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /health``. Python:
``serve.get_app_handle("aded").remote("a prompt").result()`` returns the completion text (a request object
or dict returns the OpenAI-style response); ``handle.options(stream=True).remote(...)`` yields text chunks.
Both paths share :mod:`aded_ray.serve.core` and the request models of :mod:`aded_ray.serve.openai_api`.

The module map: ``args`` (configuration), ``openai_api`` (request/response models), ``errors`` (OpenAI
error bodies), ``generation`` (admission and worker threads), ``core`` (one replica's request logic),
``routes`` (the FastAPI app), ``proxy`` (the guard in front of Serve's proxy), ``metrics``, ``local``
(starting the service for tests and the soak).
"""
from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any

from pydantic import ValidationError
from ray import serve

from aded_ray.serve import openai_api as oa
from aded_ray.serve.args import AppArgs, UserConfig
from aded_ray.serve.errors import APIError
from aded_ray.serve.routes import build_api

__all__ = ["ADEDServer", "AppArgs", "UserConfig", "build_app"]
log = logging.getLogger("ray.serve")


@serve.ingress(build_api)
class _Ingress:
    """The replica. FastAPI (through ``@serve.ingress``) answers HTTP; handle calls reach ``__call__`` of the
    subclass below (Serve forbids ``__call__`` on the class it wraps)."""

    def __init__(self, args: dict):
        self.args = AppArgs(**args)
        self.replica = None

    def reconfigure(self, config: dict) -> None:
        cfg = UserConfig(**(config or {}))
        self.replica.engine.reconfigure(max_nodes=cfg.max_nodes, budget=cfg.budget)
        store = self.replica.store
        if store is not None and cfg.flush_interval_s:
            store.flush_interval_s = store.pull_interval_s = cfg.flush_interval_s

    def check_health(self) -> None:
        """The engine (and its tensor-parallel group), never Redis: the store's state is a metric."""
        r = self.replica
        if r is None:
            raise RuntimeError("the replica is not initialised")
        if not r.engine.healthy():
            raise RuntimeError(f"tensor-parallel group is broken: {r.engine.group.broken}")
        if r.store is not None:
            r.metrics.redis_up.set(r.store.stats["redis_up"])


class ADEDServer(_Ingress):
    async def __init__(self, args: dict):
        from aded_ray.serve.core import Replica

        await super().__init__(args)
        try:
            ctx = serve.get_replica_context()
            app_name, replica_id = ctx.app_name, ctx.replica_id.unique_id
        except Exception:  # noqa: BLE001 - outside a Serve replica
            app_name, replica_id = "default", "local"
        loop = asyncio.get_running_loop()
        # built off the event loop: loading the model and checking the verify mode take seconds
        self.replica = await loop.run_in_executor(
            None, lambda: Replica(self.args, app_name=app_name, replica_id=replica_id))
        self.app.state.server = self.replica

    async def __del__(self):
        r = getattr(self, "replica", None)
        if r is not None:
            r.close()
        await super().__del__()

    async def __call__(self, *args, **kwargs):
        """HTTP requests arrive as ASGI ``(scope, receive, send)``; handle calls as a prompt or a request."""
        if len(args) == 3 and isinstance(args[0], dict) and args[0].get("type") in ("http", "websocket", "lifespan"):
            return await super().__call__(*args)
        req, plain = _parse_handle_request(*args, **kwargs)
        if _streaming_call():
            return self._stream_text(req)
        try:
            body = await self.replica.complete(req)
        except APIError as e:
            raise ValueError(f"{e.message} (param {e.param})") from None
        if plain:
            choice = body["choices"][0]
            return choice["text"] if "text" in choice else choice["message"]["content"]
        return body

    async def _stream_text(self, req):
        try:
            async for text in self.replica.stream_text(req):
                yield text
        except APIError as e:
            raise ValueError(f"{e.message} (param {e.param})") from None


def _parse_handle_request(request: Any = None, **kwargs):
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


_Deployment = serve.deployment(name="ADEDServer", health_check_period_s=10, health_check_timeout_s=30,
                               graceful_shutdown_timeout_s=60)(ADEDServer)


def build_app(args: dict | None = None):
    """Application builder for ``serve run``: validates ``args`` (errors name the field)."""
    a = AppArgs(**(args or {}))
    opts = dict(num_replicas=a.num_replicas, max_ongoing_requests=a.serve_max_ongoing,
                max_queued_requests=a.max_queued_requests,
                backpressure_config={"status_code": 503, "retry_after_s": 1},
                ray_actor_options={"num_cpus": a.num_cpus, "num_gpus": a.num_gpus})
    if a.num_replicas == "auto":     # Serve's defaults, with the target following the replica's batch
        opts["autoscaling_config"] = {"target_ongoing_requests": a.autoscale_target}
    if a.tp_size > 1:
        # one placement group per replica: bundle 0 for the replica, one bundle per rank actor
        gpu = a.num_gpus > 0 or a.device == "cuda"
        rank = {"CPU": a.cpus_per_rank, "GPU": 1} if gpu else {"CPU": a.cpus_per_rank}
        opts["ray_actor_options"] = {"num_cpus": a.num_cpus, "num_gpus": 0}
        opts["placement_group_bundles"] = [{"CPU": a.num_cpus}] + [rank] * a.tp_size
        opts["placement_group_strategy"] = "STRICT_PACK" if gpu else "PACK"
    return _Deployment.options(**opts).bind(a.model_dump())
