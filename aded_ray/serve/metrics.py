"""Serve metrics with vLLM's meanings, recorded as the engine steps (not once per request).

The engine's scheduler counts per step (:class:`aded_ray.scheduler.Counters`): drafts (steps of a request
that submitted a draft), draft tokens, accepted tokens, accepted tokens per draft position, emitted tokens,
engine steps, finished and aborted requests. :meth:`SpecMetrics.sync` turns the growth of those counts
since its last call into counter increments; the replica calls it every ``interval_s`` (1 s), so a long
request's tokens and acceptance show up while it runs. Mean acceptance length = 1 + accepted / drafts
(per request-step), as in vLLM. Per request: finish reasons, and histograms of draft time, verify time and
tree size per step.
"""
from __future__ import annotations

import threading
from dataclasses import asdict

POSITIONS = 16    # accepted-per-position buckets exported (vLLM: one per speculative position)


def counter_deltas(now: dict, before: dict | None) -> dict:
    """Growth of each count (lists element-wise) since ``before`` (None: since zero)."""
    out = {}
    for k, v in now.items():
        b = (before or {}).get(k)
        if isinstance(v, list):
            b = b or [0] * len(v)
            out[k] = [x - y for x, y in zip(v, b)]
        else:
            out[k] = v - (b or 0)
    return out


class SpecMetrics:
    def __init__(self, model: str):
        from ray.serve.metrics import Counter, Gauge, Histogram

        tags = ("model",)
        self.tags = {"model": model}
        self.drafts = Counter("aded_spec_decode_num_drafts", "Request steps that submitted a draft", tags)
        self.draft_tokens = Counter("aded_spec_decode_num_draft_tokens", "Draft nodes submitted for verification",
                                    tags)
        self.accepted = Counter("aded_spec_decode_num_accepted_tokens", "Draft tokens accepted", tags)
        self.accepted_pos = Counter("aded_spec_decode_num_accepted_tokens_per_pos",
                                    "Draft tokens accepted at each position of the accepted path", tags + ("position",))
        self.emitted = Counter("aded_generation_tokens", "Tokens emitted (committed) to clients", tags)
        self.steps = Counter("aded_engine_steps", "Batched verification steps (one forward pass each)", tags)
        self.aborted = Counter("aded_num_aborted_requests", "Requests cancelled or disconnected before the end", tags)
        self.requests = Counter("aded_requests", "Finished requests by finish reason", tags + ("finish_reason",))
        ms = [0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500]
        self.draft_ms = Histogram("aded_draft_time_ms", "Drafting time per step (ms)", ms, tags)
        self.verify_ms = Histogram("aded_verify_time_ms", "Verification forward time per step (ms)", ms, tags)
        self.tree = Histogram("aded_tree_size", "Draft nodes per step", [1, 2, 4, 8, 16, 32, 64, 128], tags)
        self.redis_up = Gauge("aded_store_redis_up", "1 when the shared tri-gram store's Redis answers", tags)
        self.running = Gauge("aded_num_requests_running", "Requests in the engine's batch", tags)
        self.waiting = Gauge("aded_num_requests_waiting", "Requests waiting for a place in the batch", tags)
        self.speculation = Gauge("aded_speculation_enabled",
                                 "1 when the replica speculates; 0 when its verify mode failed the start-up "
                                 "exactness check or speculation is configured off", tags)
        for m in (self.drafts, self.draft_tokens, self.accepted, self.accepted_pos, self.emitted, self.steps,
                  self.aborted, self.requests, self.draft_ms, self.verify_ms, self.tree, self.redis_up,
                  self.running, self.waiting, self.speculation):
            m.set_default_tags(dict(self.tags))  # a copy: Serve adds its own tags to the dict
        self._last: dict | None = None

    def sync(self, counters, running: int, waiting: int) -> dict:
        """Record what the scheduler counted since the last call; returns the increments."""
        now = asdict(counters)
        d = counter_deltas(now, self._last)
        self._last = now
        for metric, key in ((self.drafts, "drafts"), (self.draft_tokens, "draft_tokens"),
                            (self.accepted, "accepted_tokens"), (self.emitted, "emitted"), (self.steps, "steps"),
                            (self.aborted, "aborted")):
            if d[key] > 0:
                metric.inc(d[key])
        for i, n in enumerate(d["accepted_per_position"][:POSITIONS]):
            if n > 0:
                self.accepted_pos.inc(n, tags={"position": str(i)})
        self.running.set(running)
        self.waiting.set(waiting)
        return d

    def record_request(self, stats) -> None:
        """Per request: its finish reason and its per-step timings (the counts come from :meth:`sync`)."""
        if stats is None:
            return
        self.requests.inc(tags={"finish_reason": stats.finish_reason or "abort"})
        if stats.steps:
            self.draft_ms.observe(1000 * stats.draft_s / stats.steps)
            self.verify_ms.observe(1000 * stats.verify_s / stats.steps)
            self.tree.observe(stats.draft_tokens / stats.steps)


class MetricsSync:
    """A daemon thread calling ``metrics.sync`` with the engine's scheduler counts every ``interval_s``."""

    def __init__(self, metrics: SpecMetrics, scheduler, interval_s: float = 1.0):
        self.metrics, self.scheduler, self.interval_s = metrics, scheduler, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="aded-metrics", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.once()

    def once(self) -> dict:
        s = self.scheduler
        return self.metrics.sync(s.counters, s.running, s.waiting)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.once()
