"""Serve metrics follow the scheduler's per-step counts (vLLM meanings), and the request fields that steer
speculation per request reach the engine."""
import pytest

from aded_ray.scheduler import Counters
from aded_ray.serve import openai_api as oa
from aded_ray.serve.metrics import MetricsSync, counter_deltas


def test_deltas_of_counts_and_per_position_lists():
    before = {"drafts": 2, "accepted_per_position": [3, 1, 0]}
    now = {"drafts": 5, "accepted_per_position": [4, 3, 1]}
    assert counter_deltas(now, before) == {"drafts": 3, "accepted_per_position": [1, 2, 1]}
    assert counter_deltas(now, None) == now


class _Metric:
    def __init__(self):
        self.total, self.by_tag, self.value = 0, {}, None

    def inc(self, n=1, tags=None):
        self.total += n
        if tags:
            k = tuple(sorted(tags.items()))
            self.by_tag[k] = self.by_tag.get(k, 0) + n

    def set(self, v):
        self.value = v


class _Sched:
    def __init__(self):
        self.counters, self.running, self.waiting = Counters(), 3, 5


def test_sync_records_what_ran_since_the_last_sync_while_requests_still_run():
    from aded_ray.serve.metrics import SpecMetrics

    m = SpecMetrics.__new__(SpecMetrics)        # the recording logic, without Ray's metric backend
    for name in ("drafts", "draft_tokens", "accepted", "accepted_pos", "emitted", "steps", "aborted",
                 "running", "waiting"):
        setattr(m, name, _Metric())
    m._last = None
    s = _Sched()
    sync = MetricsSync.__new__(MetricsSync)
    sync.metrics, sync.scheduler = m, s
    c = s.counters
    c.steps, c.drafts, c.draft_tokens, c.accepted_tokens, c.emitted = 4, 4, 20, 6, 10
    c.accepted_per_position[:3] = [3, 2, 1]
    sync.once()
    assert (m.steps.total, m.drafts.total, m.draft_tokens.total, m.accepted.total) == (4, 4, 20, 6)
    assert m.running.value == 3 and m.waiting.value == 5
    c.steps, c.accepted_tokens, c.aborted = 6, 9, 1
    c.accepted_per_position[0] = 5
    sync.once()                                 # only the growth is added
    assert m.steps.total == 6 and m.accepted.total == 9 and m.aborted.total == 1
    assert m.accepted_pos.by_tag[(("position", "0"),)] == 5 and m.accepted_pos.by_tag[(("position", "2"),)] == 1


def test_request_fields_steer_speculation_per_request():
    r = oa.CompletionRequest(prompt="hi", speculate=False, max_nodes=4)
    kw = r.sampling_kwargs()
    assert kw["speculate"] is False and kw["max_nodes"] == 4
    assert oa.CompletionRequest(prompt="hi").sampling_kwargs()["speculate"] is True
    with pytest.raises(ValueError, match="max_nodes"):
        oa.ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], max_nodes=513)
