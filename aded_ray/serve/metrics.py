"""Serve metrics with vLLM's meanings: drafts, draft tokens, accepted tokens (mean acceptance length =
1 + accepted / drafts), plus aded_ray histograms of draft time, verify time and tree size."""
from __future__ import annotations


class SpecMetrics:
    def __init__(self, model: str):
        from ray.serve.metrics import Counter, Gauge, Histogram

        tags = ("model",)
        self.tags = {"model": model}
        self.drafts = Counter("aded_spec_decode_num_drafts", "Verification steps that submitted a draft", tags)
        self.draft_tokens = Counter("aded_spec_decode_num_draft_tokens", "Draft nodes submitted for verification",
                                    tags)
        self.accepted = Counter("aded_spec_decode_num_accepted_tokens", "Draft tokens accepted", tags)
        self.emitted = Counter("aded_generation_tokens", "Tokens emitted (committed) to clients", tags)
        self.requests = Counter("aded_requests", "Finished requests by finish reason", tags + ("finish_reason",))
        ms = [0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500]
        self.draft_ms = Histogram("aded_draft_time_ms", "Drafting time per step (ms)", ms, tags)
        self.verify_ms = Histogram("aded_verify_time_ms", "Verification forward time per step (ms)", ms, tags)
        self.tree = Histogram("aded_tree_size", "Draft nodes per step", [1, 2, 4, 8, 16, 32, 64, 128], tags)
        self.redis_up = Gauge("aded_store_redis_up", "1 when the shared tri-gram store's Redis answers", tags)
        self.running = Gauge("aded_num_requests_running", "Requests being decoded", tags)
        self.speculation = Gauge("aded_speculation_enabled",
                                 "1 when the replica speculates; 0 when its verify mode failed the start-up "
                                 "exactness check or speculation is configured off", tags)
        for m in (self.drafts, self.draft_tokens, self.accepted, self.emitted, self.requests, self.draft_ms,
                  self.verify_ms, self.tree, self.redis_up, self.running, self.speculation):
            m.set_default_tags(dict(self.tags))  # a copy: Serve adds its own tags to the dict

    def record_request(self, stats) -> None:
        if stats is None:
            return
        if stats.drafts:
            self.drafts.inc(stats.drafts)
            self.draft_tokens.inc(stats.draft_tokens)
        if stats.accepted_tokens:
            self.accepted.inc(stats.accepted_tokens)
        if stats.emitted:
            self.emitted.inc(stats.emitted)
        self.requests.inc(tags={"finish_reason": stats.finish_reason or "abort"})
        if stats.steps:
            self.draft_ms.observe(1000 * stats.draft_s / stats.steps)
            self.verify_ms.observe(1000 * stats.verify_s / stats.steps)
            self.tree.observe(stats.draft_tokens / stats.steps)
