"""``aded bench-load``'s accounting, on a fake engine (no model): whole-run and steady-state tokens/s."""
import time
from types import SimpleNamespace

import pytest

from aded_ray.bench import load


class FakeEngine:
    """Streams ``len(messages)`` tokens (one per chunk, 10 ms apart) for each request; no drafter."""

    def __init__(self):
        self.scheduler = SimpleNamespace(max_batch=1)
        self.drafter, self.speculate = None, False

    def generate(self, messages, max_new_tokens, speculate):
        stats = SimpleNamespace(steps=0, draft_tokens=0, accepted_tokens=0)
        for _ in range(len(messages)):
            time.sleep(0.01)
            stats.steps += 1
            yield SimpleNamespace(token_ids=[7], stats=stats)


def test_steady_window_ends_when_the_first_client_runs_out_of_work():
    # 2 clients, 3 requests: 20, 20 and 5 tokens. The client that takes the 5-token request after its first
    # one finishes at ~250 ms while the other is idle from ~200 ms: the steady window is the first ~200 ms
    msgs = [[0] * 20, [0] * 20, [0] * 5]
    r = load.run_level(FakeEngine(), "batched plain", msgs, 2, 64)
    assert r["tokens"] == 45 and not r["errors"]
    assert r["steady_seconds"] < r["seconds"]
    assert 38 <= r["steady_tokens"] <= 41             # both first requests, not the drained tail
    assert r["steady_seconds"] == pytest.approx(0.2, abs=0.08)
    row = load._merge([r, r], 3)
    assert row["steady_tok_per_s"] == pytest.approx(r["steady_tokens"] / r["steady_seconds"], rel=1e-3)
    assert "steady" in load.HEAD and row["tok_per_s"] < row["steady_tok_per_s"] * 1.5
