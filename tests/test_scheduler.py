"""The scheduler with a fake model (literal logits, no torch model): joins, leaves, cancellation, ordering,
per-request limits and caps, all in milliseconds. The fake's next token is a function of the request's whole
committed sequence, so a request given another's KV slot (bad slot bookkeeping) changes its output."""
import threading
import time

import numpy as np
import pytest
import torch

from aded_ray.decode import FixedBudget, GenerationStats
from aded_ray.draft.tree import DraftTree
from aded_ray.scheduler import GenRequest, QueueFull, Scheduler
from aded_ray.verify.accept import SamplingParams

V = 50
EOS = 0


def next_token(seq) -> int:
    """The fake model's greedy choice after ``seq``: EOS once the sequence is long enough."""
    h = 7
    for t in seq:
        h = (h * 31 + int(t)) % 1_000_003
    return EOS if len(seq) >= 30 + seq[0] % 7 else 1 + h % (V - 1)


class FakeKV:
    """Per slot the committed tokens; a pass's logits are one-hot on :func:`next_token` of each row's context."""

    prefill_chunk = 4

    def __init__(self, delay: float = 0.0):
        self.slots, self.pending, self.delay, self.passes = [], [], delay, []

    @property
    def used(self):
        return len(self.slots)

    def add_slot(self):
        self.slots.append([])
        self.pending.append(None)
        return len(self.slots) - 1

    def move_slot(self, src, dst):
        self.slots[dst] = list(self.slots[src])

    def drop_last(self):
        self.slots.pop()
        self.pending.pop()

    @property
    def lens(self):
        return np.array([len(s) for s in self.slots])

    def prefill(self, slot, ids, start=0, max_tokens=None):
        assert len(self.slots[slot]) == start
        self.slots[slot] += list(ids[start:start + min(self.prefill_chunk, max_tokens or 99)])
        if len(self.slots[slot]) < len(ids):
            return None
        x = torch.full((V,), -5.0)
        x[next_token(self.slots[slot])] = 5.0
        return x

    def forward_trees(self, roots, trees, width=None):
        time.sleep(self.delay)
        B, W = len(trees), max(len(t) + 1 for t in trees)
        self.passes.append((B, W))
        out = torch.full((B, W, V), -5.0)
        for r, (root, t) in enumerate(zip(roots, trees)):
            ctx = [self.slots[r] + [root]]
            for i in range(len(t)):
                par = t.parents[i]
                ctx.append((ctx[par + 1]) + [int(t.tokens[i])])
            for row, c in enumerate(ctx):
                out[r, row, next_token(c)] = 5.0
            self.pending[r] = ctx
        return torch.cat([out[r, : len(t) + 1] for r, t in enumerate(trees)])   # packed: real rows only

    def commit(self, keeps):
        for r, keep in enumerate(keeps):
            ctx = self.pending[r]
            self.slots[r] = ctx[keep[-1]] if keep else self.slots[r]


class FusingKV(FakeKV):
    """A fake that takes a newcomer's prompt chunk in a decoding pass (slot B, after the B running requests)."""

    fuses_prefill = True

    def forward_trees(self, roots, trees, width=None, prefill=None):
        out = super().forward_trees(roots, trees, width)
        if prefill is not None:
            B = len(trees)
            self.fused.append(B)
            prefill.logits = self.prefill(B, prefill.ids, prefill.start, prefill.max_tokens)
            prefill.ran = len(self.slots[B]) - prefill.start
        return out

    fused: list


class OracleDrafter:
    """Drafts the true continuation for a few tokens (and a wrong sibling), so steps accept several."""

    def observe(self, seq):
        pass

    def draft(self, seq, max_nodes=None):
        seq = list(seq)
        toks, pars = [], []
        for d in range(min(3, max_nodes or 3)):
            t = next_token(seq)
            toks.append(t)
            pars.append(len(toks) - 2)
            seq.append(t)
        if max_nodes and max_nodes > len(toks):
            toks.append((toks[0] + 1) % V or 1)
            pars.append(-1)
        order = sorted(range(len(toks)), key=lambda i: (pars[i] + 1 and 1 + sum(1 for _ in range(i)), i))
        return DraftTree.from_paths([toks[:3], toks[3:4]] if len(toks) > 3 else [toks])


def alone(prompt, max_new):
    seq, out = list(prompt), []
    while len(out) < max_new:
        t = next_token(seq)
        seq.append(t)
        out.append(t)
        if t == EOS:
            break
    return out


def run(sched, prompt, max_new=60, **kw):
    h = sched.submit(GenRequest(prompt, max_new, **kw), GenerationStats())
    return [t for toks, _ in h for t in toks], h


def make(max_batch=4, drafter=OracleDrafter(), budget=4, delay=0.0, max_waiting=64, fuse=False):
    kv = FusingKV(delay) if fuse else FakeKV(delay)
    kv.fused = []
    return Scheduler(kv, drafter, FixedBudget(budget), [EOS], max_batch=max_batch,
                     max_waiting=max_waiting, default_max_nodes=8)


PROMPTS = [[(3 * i + j) % (V - 1) + 1 for j in range(2 + i % 9)] for i in range(12)]


@pytest.mark.parametrize("drafter, budget, fuse", [(OracleDrafter(), 4, False), (None, 0, False),
                                                   (OracleDrafter(), 4, True), (None, 0, True)])
def test_concurrent_requests_equal_alone(drafter, budget, fuse):
    # fuse: newcomers' prompts ride in the running requests' passes (their slot moves down as others end)
    s = make(max_batch=4, drafter=drafter, budget=budget, fuse=fuse)
    res = {}

    def go(i):
        res[i] = run(s, PROMPTS[i], max_new=10 + 5 * i)[0]

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(PROMPTS))]
    [t.start() for t in threads]
    [t.join(10) for t in threads]
    s.close()
    for i, p in enumerate(PROMPTS):
        assert res[i] == alone(p, 10 + 5 * i), i
    assert max(b for b, _ in s.kv.passes) <= 4                      # never more than max_batch at once
    assert max(b for b, _ in s.kv.passes) >= 2                      # and really batched
    assert s.counters.finished == len(PROMPTS) and s.counters.aborted == 0
    assert (s.counters.fused_prefills > 0) == fuse and len(s.kv.fused) == s.counters.fused_prefills
    if drafter is not None:
        assert s.counters.accepted_tokens > 0


def test_cancel_mid_way_frees_the_slot_and_others_continue():
    s = make(max_batch=2, delay=0.005)
    h = s.submit(GenRequest(PROMPTS[0], 500), GenerationStats())
    it = iter(h)
    next(it)
    h.cancel()
    rest = list(it)                                                   # ends promptly
    out, _ = run(s, PROMPTS[5], max_new=20)
    assert out == alone(PROMPTS[5], 20)
    assert s.counters.aborted == 1 and s.kv.used == 0 and len(rest) < 100
    assert h.stats.finish_reason == "abort"
    s.close()


def test_fifo_admission_and_queue_limit():
    s = make(max_batch=1, delay=0.05, max_waiting=2)
    hs = [s.submit(GenRequest(PROMPTS[0], 5), GenerationStats())]
    while s.running == 0:
        time.sleep(0.001)
    hs += [s.submit(GenRequest(PROMPTS[i], 5), GenerationStats()) for i in (1, 2)]     # 1 runs, 2 wait
    assert s.waiting == 2
    with pytest.raises(QueueFull):
        s.submit(GenRequest(PROMPTS[9], 5), GenerationStats())
    finished = []
    for i, h in enumerate(hs):
        list(h)
        finished.append(i)
    assert finished == [0, 1, 2]
    s.close()


def test_per_request_cap_and_speculation_switch():
    s = make(max_batch=4, budget=8)
    out, h = run(s, PROMPTS[3], max_new=30, speculate=False)
    assert out == alone(PROMPTS[3], 30) and h.stats.draft_tokens == 0
    out, h = run(s, PROMPTS[3], max_new=30, max_nodes=2)
    assert out == alone(PROMPTS[3], 30) and 0 < h.stats.draft_tokens <= 2 * h.stats.steps
    s.close()


def test_limits_eos_and_stats_exact():
    s = make()
    for p in PROMPTS[:4]:
        out, h = run(s, p, max_new=7)
        ref = alone(p, 7)
        assert out == ref
        st = h.stats
        assert st.emitted == len(ref) and st.finish_reason == ("stop" if ref[-1] == EOS else "length")
        assert st.steps <= len(ref) and st.accepted_tokens <= st.draft_tokens
    s.close()


def test_seeded_sampling_under_batching_equals_alone():
    p = SamplingParams(temperature=1.0, seed=5)
    s1 = make(max_batch=1)
    ref = run(s1, PROMPTS[2], max_new=20, sampling=p)[0]
    s1.close()
    s = make(max_batch=4)
    res = {}

    def go(i, sp):
        res[i] = run(s, PROMPTS[2] if i == 0 else PROMPTS[i], max_new=20, sampling=sp)[0]

    th = [threading.Thread(target=go, args=(i, p if i == 0 else SamplingParams())) for i in range(4)]
    [t.start() for t in th]
    [t.join(10) for t in th]
    s.close()
    assert res[0] == ref


def test_a_failing_pass_fails_its_requests_not_the_scheduler():
    s = make()
    orig = s.kv.forward_trees
    s.kv.forward_trees = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("device lost"))
    with pytest.raises(RuntimeError, match="device lost"):
        run(s, PROMPTS[1], max_new=10)
    s.kv.forward_trees = orig
    assert run(s, PROMPTS[1], max_new=10)[0] == alone(PROMPTS[1], 10)
    s.close()


class _SwitchBudget(FixedBudget):
    """Plain steps for the first ``plain`` steps, then drafts of 4."""

    def __init__(self, plain):
        super().__init__(0)
        self.plain, self.steps = plain, 0

    def choose(self, batch=1, reqs=None):
        self.steps += 1
        return 0 if self.steps <= self.plain else 4


class _CountingDrafter(OracleDrafter):
    def __init__(self):
        self.observed = self.drafted = self.recycled = 0
        self.lengths = []

    def observe(self, seq):
        self.observed += 1
        self.lengths.append(len(seq))

    def draft(self, seq, max_nodes=None):
        self.drafted += 1
        return super().draft(seq, max_nodes)

    def observe_logits(self, prev, inputs, top_ids, top_p):
        assert top_ids is not None
        self.recycled += 1


def test_a_plain_step_does_no_drafter_work_and_the_drafter_catches_up():
    d = _CountingDrafter()
    s = Scheduler(FakeKV(), d, _SwitchBudget(plain=10), [EOS], max_batch=4, default_max_nodes=8)
    try:
        out, h = run(s, PROMPTS[3], max_new=40)
    finally:
        s.close()
    assert out == alone(PROMPTS[3], 40)
    plain_steps = 10
    assert h.stats.steps > plain_steps
    # after the prefill's recycling, only drafting steps draft and recycle; every step is observed (the
    # plain ones deferred, replayed in order), so the drafter learns what it would have step by step
    assert d.drafted == h.stats.steps - plain_steps
    assert d.observed == h.stats.steps and d.lengths == sorted(d.lengths) and len(set(d.lengths)) == len(d.lengths)
    assert d.recycled == 1 + d.drafted


def test_call_runs_on_the_scheduler_thread_between_steps_and_raises_there():
    s = make(max_batch=2, delay=0.002)
    h = s.submit(GenRequest(PROMPTS[3], 40), GenerationStats())
    seen = []

    def probe():
        seen.append((threading.current_thread().name, len(s.kv.passes)))
        return 42

    while not s.kv.passes:
        time.sleep(0.001)
    assert s.call(probe).result(5) == 42                              # while a request runs
    assert s.call(probe).result(5) == 42 and len(seen) == 2
    assert all(name == "aded-scheduler" for name, _ in seen) and 0 < seen[0][1] < seen[1][1]   # between steps
    with pytest.raises(ZeroDivisionError):
        s.call(lambda: 1 / 0).result(5)
    assert [t for toks, _ in h for t in toks] == alone(PROMPTS[3], 40)   # the request is untouched
    s.close()
    with pytest.raises(RuntimeError, match="shut down"):
        s.call(probe)


class _OneCallDrafter(OracleDrafter):
    """Has ``observe_draft`` (interfaces.StepDrafter): the decode loop must use it instead of the two calls."""

    def __init__(self):
        self.one, self.two = [], 0

    def observe(self, seq):
        self.two += 1

    def observe_draft(self, seq, max_nodes=None):
        self.one.append(len(seq))
        return OracleDrafter.draft(self, seq, max_nodes)


def test_the_decode_loop_drafts_with_one_call_when_the_drafter_has_it():
    d = _OneCallDrafter()
    s = make(max_batch=4, drafter=d, budget=4)
    try:
        out, h = run(s, PROMPTS[5], max_new=30)
    finally:
        s.close()
    assert out == alone(PROMPTS[5], 30) and h.stats.accepted_tokens > 0
    assert d.two == 0 and len(d.one) == h.stats.steps and d.one == sorted(d.one)


class BreakingKV(FakeKV):
    """A KV whose calls fail on demand, as a tensor-parallel group's do once a rank died."""

    fail: set = set()

    def add_slot(self):
        if "add_slot" in self.fail:
            raise RuntimeError("group broken: add_slot")
        return super().add_slot()

    def drop_last(self):
        if "drop_last" in self.fail:
            raise RuntimeError("group broken: drop_last")
        super().drop_last()

    def forward_trees(self, roots, trees, width=None):
        if "forward_trees" in self.fail:
            raise RuntimeError("group broken: forward_trees")
        return super().forward_trees(roots, trees, width)


def _outcome(h, timeout=10):
    """What iterating the handle gives: the tokens, or the error it raised (None: it hung)."""
    box = []

    def it():
        try:
            box.append([t for toks, _ in h for t in toks])
        except Exception as e:  # noqa: BLE001
            box.append(e)

    t = threading.Thread(target=it, daemon=True)
    t.start()
    t.join(timeout)
    return box[0] if box else None


@pytest.mark.parametrize("fail", [{"add_slot"}, {"forward_trees", "drop_last"}])
def test_a_failing_kv_fails_the_request_and_the_scheduler_goes_on(fail):
    kv = BreakingKV()
    kv.fail = set(fail)
    s = Scheduler(kv, OracleDrafter(), FixedBudget(4), [EOS], max_batch=4, default_max_nodes=8)
    try:
        got = _outcome(s.submit(GenRequest(PROMPTS[2], 20), GenerationStats()))
        assert isinstance(got, RuntimeError) and "group broken" in str(got)     # an error, not a hang
        kv.fail = set()
        kv.slots, kv.pending = [], []                      # (what freeing the slots would have done)
        assert _outcome(s.submit(GenRequest(PROMPTS[3], 20), GenerationStats())) == alone(PROMPTS[3], 20)
    finally:
        s.close()
