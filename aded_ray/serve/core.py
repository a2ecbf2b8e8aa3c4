"""One replica's state and request logic, independent of HTTP: the engine, the shared store, admission, and
the OpenAI-style answers (a whole response, or SSE events) that the FastAPI routes and the Python handles
both use.
"""
from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator

from aded_ray.serve import openai_api as oa
from aded_ray.serve.args import AppArgs
from aded_ray.serve.errors import APIError, error_body
from aded_ray.serve.generation import Generations, Stream

log = logging.getLogger("ray.serve")
PROXY_GUARD = "aded_ray.serve.proxy:middlewares"


def route_package_logs() -> None:
    """Send ``aded_ray.*`` records (the shared store's outage warnings, the engine's notices) through the
    replica's Serve handlers: levelled, timestamped, in the JSON replica log when Serve logs JSON."""
    serve_logger = logging.getLogger("ray.serve")
    if not serve_logger.handlers:
        return
    pkg = logging.getLogger("aded_ray")
    pkg.handlers = list(serve_logger.handlers)
    pkg.setLevel(logging.INFO)
    pkg.propagate = False


class Replica:
    def __init__(self, args: AppArgs, *, app_name: str = "default", replica_id: str = "local"):
        from aded_ray.engine import Engine

        self.args, self.app_name, self.replica_id = args, app_name, replica_id
        route_package_logs()
        # The engine builds its model on its scheduler's thread, which runs every pass (one OpenMP pool per
        # process: see aded_ray.engine.Engine); its intra-op threads follow the replica's CPUs.
        self.engine_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aded-engine")
        threads = args.threads or (max(1, int(args.num_cpus)) if args.num_cpus >= 1 else None)
        cfg = args.engine_config()
        if threads and not cfg.verify.threads:
            cfg = cfg.model_copy(update={"verify": cfg.verify.model_copy(update={"threads": threads})})

        def make_engine():
            # with tp_size > 1 the rank actors go into bundles 1..tp of this replica's placement group
            return Engine(cfg, tp_bundle_offset=1 if args.tp_size > 1 else None)

        self.engine = self.engine_thread.submit(make_engine).result()
        self.store = self._make_store()
        self.gen = Generations(self.engine, max_running=args.max_running, max_waiting=args.max_waiting)
        from aded_ray.serve.metrics import SpecMetrics

        from aded_ray.serve.metrics import MetricsSync

        self.metrics = SpecMetrics(args.served_model_name)
        self.metrics.speculation.set(1 if self.engine.speculate else 0)
        self.metrics_sync = MetricsSync(self.metrics, self.engine.scheduler)
        if os.environ.get("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH") != PROXY_GUARD:
            log.warning("the HTTP proxy runs without aded_ray's guard (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH="
                        "%s where Ray starts): no body timeout or size limit before a request reaches a replica, "
                        "and the proxy's own errors are not OpenAI-shaped", PROXY_GUARD)
        log.info("aded_ray replica ready: mode %s, speculation %s, shared store %s (namespace %s)",
                 self.engine.mode, self.engine.speculate, "on" if self.store else "off",
                 self.store.tenant if self.store else "-")

    def _make_store(self):
        a = self.args
        url = a.redis_url if a.redis_url is not None else os.environ.get("ADED_REDIS_URL")
        if not url or url == "off":
            return None
        from aded_ray.store.redis_store import SharedStore

        # the constructor only checks the credentials (bounded); loading the shared state happens in the
        # store's thread, so a replica starts and serves while Redis is down, and catches up later
        return SharedStore(self.engine.matrix, url, drafter=self.engine.drafter, tenant=a.namespace or self.app_name,
                           flush_interval_s=a.flush_interval_s, pull_interval_s=a.flush_interval_s,
                           share_history=a.share_history, hist_maxlen=a.history_max_entries,
                           retention_s=a.history_retention_s, state_ttl_s=a.state_ttl_s)

    def close(self) -> None:
        self.metrics_sync.close()
        self.gen.close()
        if self.store is not None:
            self.store.close()
        self.engine.shutdown()
        self.engine_thread.shutdown(wait=False)

    # ---- state for /health -----------------------------------------------------------------------
    def health(self) -> dict:
        e = self.engine
        if self.store is not None:
            self.metrics.redis_up.set(self.store.stats["redis_up"])
        g = self.gen.snapshot()
        return {"status": "ok" if e.healthy() else "unhealthy", "replica": self.replica_id,
                "speculation": e.speculate, "speculation_off_reason": e.speculation_off_reason,
                "exactness": None if e.exactness is None else e.exactness.summary(),
                "mode": e.mode, "device": e.device, "widths": e.widths, "compiled": e.compiled_info(),
                "generating": g["running"] > 0,
                "requests": g, "redis_up": None if self.store is None else bool(self.store.stats["redis_up"]),
                "store": None if self.store is None else self.store.summary()}

    # ---- request checks (cheap: on the event loop) -----------------------------------------------
    def check(self, req) -> None:
        a = self.args
        if req.model is not None and req.model != a.served_model_name:
            raise APIError(404, f"model {req.model!r} does not exist; this server serves {a.served_model_name!r}",
                           "not_found_error", "model")
        n = req.limit(a.default_max_tokens)
        if n > a.max_new_tokens:
            raise APIError(400, f"max_tokens {n} is more than this server's limit {a.max_new_tokens}",
                           param="max_completion_tokens" if getattr(req, "max_completion_tokens", None)
                           else "max_tokens")
        chars = oa.text_chars(req)
        if chars > a.prompt_chars:
            raise APIError(400, f"the prompt has {chars} characters, more than this server's limit {a.prompt_chars}",
                           param="messages" if isinstance(req, oa.ChatCompletionRequest) else "prompt")
        if req.return_stats and not a.allow_return_stats:
            raise APIError(400, "return_stats is turned off on this deployment", param="return_stats")

    def private(self, req) -> bool:
        return self.args.private_by_default if req.private is None else req.private

    async def open(self, req) -> tuple[Stream, bool]:
        """Check and start a request: all errors known before output are raised here as :class:`APIError`."""
        self.check(req)
        chat = isinstance(req, oa.ChatCompletionRequest)
        prompt = [m.template_dict() for m in req.messages] if chat else req.prompt
        try:
            stream = await self.gen.start(prompt, chat=chat, max_tokens=req.limit(self.args.default_max_tokens),
                                          sampling=req.sampling_kwargs(), private=self.private(req))
        except APIError as e:
            if chat and e.param == "prompt":
                e.param = "messages"
            raise
        return stream, chat

    # ---- answers ---------------------------------------------------------------------------------
    async def complete(self, req) -> dict:
        stream, chat = await self.open(req)
        text, finish, stats, n_out = [], "stop", None, 0
        eos = set(self.engine.eos_ids)
        try:
            async for c in stream:
                text.append(c.text)
                n_out += sum(1 for t in c.token_ids if t not in eos)
                if c.finish_reason:
                    finish, stats = c.finish_reason, c.stats
        finally:
            stream.cancel()          # a no-op when it finished; stops decoding when this request is cancelled
        self.metrics.record_request(stats)
        n_prompt = stats.prompt_tokens if stats else 0
        extra = stats.to_dict() if (stats and req.return_stats) else None
        make = oa.chat_response if chat else oa.completion_response
        return make(oa.new_id("chatcmpl" if chat else "cmpl"), self.args.served_model_name, "".join(text), finish,
                    n_prompt, n_out, extra)

    async def sse(self, req, stream: Stream, chat: bool) -> AsyncIterator[str]:
        """SSE events of a started request; errors after the 200 header travel as a data event."""
        rid = oa.new_id("chatcmpl" if chat else "cmpl")
        name = self.args.served_model_name
        eos = set(self.engine.eos_ids)
        first, n_out, stats = True, 0, None
        try:
            async for c in stream:
                n_out += sum(1 for t in c.token_ids if t not in eos)
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
        except APIError as e:
            yield f"data: {json.dumps(e.body())}\n\n"
        except Exception as e:  # noqa: BLE001
            log.error("generation failed mid-stream: %s: %s", type(e).__name__, e)
            yield f"data: {json.dumps(error_body(f'generation failed: {type(e).__name__}', 'server_error', None, 500))}\n\n"
        finally:
            stream.cancel()
            self.metrics.record_request(stats)
        yield "data: [DONE]\n\n"

    async def stream_text(self, req) -> AsyncIterator[str]:
        """Text pieces of a request, for ``handle.options(stream=True)``."""
        stream, _ = await self.open(req)
        try:
            async for c in stream:
                if c.text:
                    yield c.text
        finally:
            stream.cancel()
