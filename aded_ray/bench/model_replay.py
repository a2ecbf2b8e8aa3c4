"""Model-in-the-loop replay: a drafter's MAT when the target model really verifies its trees.

Plain trace replay (:mod:`aded_ray.bench.replay`) knows only the recorded continuation, so it cannot give a
drafter what verification gives it in the service: the model's predictions at every drafted node, accepted
or not (``observe_logits``, the recycle source). Here every prompt of the traces is decoded greedily through
the real decode loop (:func:`aded_ray.decode.generate_ids`) with a fixed node budget, in an exact verify
mode, for as many tokens as its trace holds. MAT = committed tokens / verification steps, as in replay;
outputs are compared with the traces (recorded batched, so a rare near-tie may differ).
"""
from __future__ import annotations

import time

from aded_ray.bench.replay import ReplayResult
from aded_ray.decode import FixedBudget, GenerationStats, generate_ids
from aded_ray.verify.modes import verifier_factory


class _Timed:
    """Times the drafter's calls: ``us`` observe + draft of each step (as plain replay does; one
    ``observe_draft`` call when the drafter has it, as the decode loop then calls it), ``rec_us`` the
    recycling of the step's verified predictions (``observe_tree_logits`` / ``observe_logits``), which runs
    after the forward pass; a step's host time is the sum."""

    def __init__(self, drafter):
        self.drafter, self.us, self.rec_us, self.t0 = drafter, [], [], 0.0
        if hasattr(drafter, "observe_logits"):
            self.observe_logits = self._timed(drafter.observe_logits)
        if hasattr(drafter, "observe_tree_logits"):
            self.observe_tree_logits = self._timed(drafter.observe_tree_logits)
        if hasattr(drafter, "observe_draft"):
            self.observe_draft = self._observe_draft

    def _timed(self, fn):
        def call(*args):
            t0 = time.perf_counter()
            fn(*args)
            if self.us:                      # the prefill's recording precedes the first draft: not a step's
                self.rec_us.append((time.perf_counter() - t0) * 1e6)
        return call

    def observe(self, seq):
        self.t0 = time.perf_counter()
        self.drafter.observe(seq)

    def draft(self, seq, b):
        tree = self.drafter.draft(seq, b)
        self.us.append((time.perf_counter() - self.t0) * 1e6)
        return tree

    def _observe_draft(self, seq, b):
        t0 = time.perf_counter()
        tree = self.drafter.observe_draft(seq, b)
        self.us.append((time.perf_counter() - t0) * 1e6)
        return tree


def model_replay(traces: list[dict], drafter, model, budget: int, name: str = "drafter", eos_ids=(),
                 progress=None) -> tuple[ReplayResult, int]:
    """Decode every trace's prompt with ``drafter`` (budget ``budget``) verified by ``model``; returns the
    result and the number of outputs identical to their traces."""
    make = verifier_factory(model)
    res = ReplayResult(name)
    identical = 0
    for tr in traces:
        out = list(tr["output_ids"])
        stats = GenerationStats()
        timed = _Timed(drafter)
        got, last = [], []
        for last in generate_ids(make(), timed, tr["prompt_ids"], max_new_tokens=len(out), eos_ids=eos_ids,
                                 budget=FixedBudget(budget), stats=stats):
            got += last
        identical += got == out
        res.traces += 1
        # a request that ends on a root alone (EOS / length right after a step's bonus) took one more
        # step in replay's accounting, which drafts below every root
        res.steps += stats.steps + stats.ended_on_root
        res.emitted += len(got)
        res.nodes += stats.draft_tokens
        res.empty_steps += stats.steps - stats.drafts
        res.draft_us += timed.us
        # a step whose pass ended the request recycles nothing: NaN, left out of the recycling and host figures
        res.recycle_us += timed.rec_us + [float("nan")] * (len(timed.us) - len(timed.rec_us))
        if progress is not None:
            progress.update(1)
    return res, identical
