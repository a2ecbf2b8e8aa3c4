"""Continuous batching inside one process: many requests, one forward pass per step.

One scheduler thread owns the model. Each iteration:

1. **leave**: cancelled requests (client gone, stop string seen by the consumer) are dropped at once and their
   KV slots freed;
2. **join**: while fewer than ``max_batch`` requests run, the oldest waiting request starts its prefill in the
   next free slot, one chunk of ``prefill_chunk`` tokens per iteration, so running streams wait at most one
   chunk's pass for a newcomer; when its prompt is complete its first token is decided and it runs;
3. **step**: one speculative step for all running requests together (:func:`aded_ray.decode.step_batch`): the
   budget is chosen for the batch size, each request drafts its own tree (its own drafter session, capped by
   its own ``max_nodes``), all trees are verified in one pass, accepted and compacted per request.

Requests wait in a FIFO of at most ``max_waiting`` (beyond it :meth:`Scheduler.submit` raises
:class:`QueueFull`). Every request's tokens go to its :class:`Handle`, consumed from any thread. Greedy
outputs are those of the request decoded alone; seeded sampling too (uniforms per output position).
"""
from __future__ import annotations

import collections
import concurrent.futures
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from aded_ray.decode import NoDraft, RequestState, catch_up, step_batch
from aded_ray.verify.accept import SamplingParams, reduce_rows
from aded_ray.verify.batch import PrefillChunk

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The waiting queue is full: retry later (HTTP 503 with Retry-After)."""


@dataclass
class GenRequest:
    """One generation request as the scheduler sees it (token ids in, token ids out)."""

    prompt_ids: list
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    speculate: bool = True
    max_nodes: int | None = None      # this request's cap on draft nodes per step (None: the engine's)
    share: bool = True                # may the finished request join the (fleet) history
    preamble: int = 0                 # its first tokens are the chat template's own preamble (cacheable KV)


class Handle:
    """The consumer's end of one request: iterate for ``(new token ids, finish reason or None)``; the
    request's ``stats`` are complete once the iteration ends."""

    def __init__(self, scheduler: "Scheduler", req: GenRequest, stats):
        self.scheduler, self.req, self.stats = scheduler, req, stats
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.cancelled = False
        self.done = False
        self.submitted = time.perf_counter()

    def cancel(self) -> None:
        if not self.done:
            self.cancelled = True
            self.scheduler._wake()

    def __iter__(self):
        while True:
            kind, value = self.events.get()
            if kind == "tokens":
                yield value
            elif kind == "error":
                self.done = True
                raise value
            else:
                self.done = True
                return


@dataclass
class _Slot:
    handle: Handle
    state: RequestState
    prefilled: int = 0


@dataclass
class Counters:
    """Per-step counts with vLLM's meanings (cumulative since start)."""

    steps: int = 0
    drafts: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    accepted_per_position: list = field(default_factory=lambda: [0] * 64)
    emitted: int = 0
    aborted: int = 0
    finished: int = 0
    fused_prefills: int = 0          # prompt chunks prefilled in a decoding pass


class Scheduler:
    def __init__(self, kv, drafter, budget, eos_ids, *, max_batch: int = 32, max_waiting: int = 256,
                 default_max_nodes: int = 64, on_step=None, name: str = "aded-scheduler", start: bool = True,
                 fuse_prefill: bool = True):
        """``start``: run the loop on a new thread named ``name``; without it the owner calls :meth:`run` on
        the thread that should run it (the engine: the thread that built the model, see
        :class:`aded_ray.engine.Engine`). ``fuse_prefill``: while requests run, a newcomer's prompt is
        prefilled in their passes (where the KV layout can: :attr:`BatchKV.fuses_prefill`), not in passes of
        its own that stall them."""
        self.kv = kv
        self.drafter = drafter            # the process drafter (sessions per request), or None: no speculation
        self.budget = budget
        self.eos = frozenset(int(e) for e in eos_ids)
        self.max_batch, self.max_waiting = int(max_batch), int(max_waiting)
        self.default_max_nodes = default_max_nodes
        self.on_step = on_step
        self.fuse_prefill = fuse_prefill
        self.counters = Counters()
        self._cond = threading.Condition()
        self._waiting: collections.deque[Handle] = collections.deque()
        self._running: list[_Slot] = []
        self._prefilling: _Slot | None = None
        self._preamble: tuple | None = None          # (preamble tokens, their KV from BatchKV.save_prefix)
        self._calls: collections.deque = collections.deque()   # (fn, future): run_on_thread's work
        self._closed = False
        self._thread = threading.current_thread()       # (start=False: this thread calls run())
        if start:
            self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
            self._thread.start()

    def run(self) -> None:
        """Run the scheduling loop on the constructing thread until :meth:`close` (``start=False`` only)."""
        if self._thread is not threading.current_thread():
            raise RuntimeError("run() belongs to the thread that built the scheduler with start=False")
        self._loop()

    # ---- the consumers' side ------------------------------------------------------------------------
    def submit(self, req: GenRequest, stats) -> Handle:
        h = Handle(self, req, stats)
        with self._cond:
            if self._closed:
                raise RuntimeError("the scheduler is shut down")
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self._waiting)} requests already wait (max_waiting={self.max_waiting})")
            self._waiting.append(h)
            self._cond.notify()
        return h

    def call(self, fn) -> concurrent.futures.Future:
        """Run ``fn()`` on the scheduler's thread between two iterations; its result (or exception) in the
        returned future. For tensor work that must share the engine's OpenMP pool (benchmarks' baselines): a
        second thread running torch ops slows every pass of the engine (see :class:`aded_ray.engine.Engine`).
        The running requests wait while it runs."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the scheduler is shut down")
            self._calls.append((fn, fut))
            self._cond.notify()
        return fut

    @property
    def running(self) -> int:
        return len(self._running) + (self._prefilling is not None)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    # ---- the scheduler thread -------------------------------------------------------------------------
    def _loop(self) -> None:
        import torch

        torch.set_grad_enabled(False)
        while True:
            with self._cond:
                while not (self._closed or self._waiting or self._running or self._prefilling or self._calls):
                    self._cond.wait()
                if self._closed:
                    break
                calls, self._calls = self._calls, collections.deque()
            for fn, fut in calls:
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn())
                    except BaseException as e:  # noqa: BLE001 - handed to the caller
                        fut.set_exception(e)
            if not (self._waiting or self._running or self._prefilling):
                continue
            try:
                with torch.inference_mode():
                    self._iteration()
            except Exception as e:  # noqa: BLE001 - a failed pass fails the requests in it, not the thread
                log.exception("batched step failed; failing %d running requests", self.running)
                self._fail_all(e)
        for _, fut in self._calls:
            fut.cancel()
        self._fail_all(RuntimeError("the engine shut down"))

    def _iteration(self) -> None:
        self._drop_cancelled()
        budget = self.kv.prefill_chunk          # prompt tokens prefilled per iteration, over all newcomers
        fuse = self.fuse_prefill and bool(self._running) and getattr(self.kv, "fuses_prefill", False)
        while budget > 0:
            self._admit()
            if self._prefilling is None:
                break
            if fuse:                            # the prompt rides in the running requests' pass (below)
                budget -= self._prefill_preamble()
                break
            budget -= self._prefill_chunk(budget)
            if self._prefilling is not None:
                break                           # a long prompt: its next chunk after the next step
        if self._running:
            p = self._prefilling
            self._step(PrefillChunk(p.state.prompt_ids, p.prefilled, budget) if fuse and p and budget > 0 else None)

    def _admit(self) -> None:
        if self._prefilling is not None or len(self._running) >= self.max_batch:
            return
        with self._cond:
            while self._waiting and self._waiting[0].cancelled:
                self._finish_handle(self._waiting.popleft(), aborted=True)
            if not self._waiting:
                return
            h = self._waiting.popleft()
        try:
            slot = self.kv.add_slot()
        except Exception as e:               # (a broken tensor-parallel group): this request fails too
            h.events.put(("error", e))
            raise
        req = h.req
        speculate = req.speculate and self.drafter is not None
        drafter = (self.drafter.session() if hasattr(self.drafter, "session") else self.drafter) \
            if speculate else NoDraft()
        cap = self.default_max_nodes if req.max_nodes is None else min(req.max_nodes, self.default_max_nodes)
        st = RequestState(list(req.prompt_ids), req.max_new_tokens, req.sampling, self.eos, drafter,
                          cap if speculate else 0, h.stats)
        h.stats.prompt_tokens = len(req.prompt_ids)
        assert slot == len(self._running), (slot, len(self._running))
        self._prefilling = _Slot(h, st)

    def _prefill_chunk(self, max_tokens: int) -> int:
        """Prefill up to ``max_tokens`` more of the newcomer's prompt in passes of its own; returns how many
        were run."""
        ran = self._prefill_preamble()
        if max_tokens - ran <= 0:
            return ran
        p, t0 = self._prefilling, time.perf_counter()
        start = p.prefilled
        logits = self.kv.prefill(len(self._running), p.state.prompt_ids, start, max_tokens - ran)
        p.prefilled = int(self.kv.lens[len(self._running)])
        p.state.stats.prefill_s += time.perf_counter() - t0
        if logits is not None:
            self._join(p, logits)
        return ran + p.prefilled - start

    def _prefill_preamble(self) -> int:
        """A newcomer that starts with the chat template's preamble (``GenRequest.preamble`` tokens, no user
        text) always prefills it as a pass of its own, so its KV is the same whether it comes from that pass
        or from the copy kept of the first such pass: a cache hit changes speed only. Returns the tokens
        run (0 on a hit, or without a preamble)."""
        p = self._prefilling
        ids = p.state.prompt_ids
        n = p.handle.req.preamble
        if not (p.prefilled == 0 and 0 < n < len(ids) and hasattr(self.kv, "load_prefix")):
            return 0
        t0 = time.perf_counter()
        slot = len(self._running)
        key = ids[:n]                      # one engine, one template: one preamble (kept while it matches)
        ran = 0
        if self._preamble is None or self._preamble[0] != key:
            self.kv.prefill(slot, ids, 0, n)
            self._preamble = (key, self.kv.save_prefix(slot, n))
            ran = n
        else:
            self.kv.load_prefix(slot, self._preamble[1])
        p.prefilled = n
        p.state.stats.prefill_s += time.perf_counter() - t0
        return ran

    def _join(self, p: _Slot, logits) -> None:
        """The newcomer's prompt is in its slot and ``logits`` follow its last token: it starts running."""
        top_k = 8 if hasattr(p.state.drafter, "observe_logits") else 0
        rows = reduce_rows(logits, p.state.sampling, positions=[0], top_k=top_k)
        self._prefilling = None
        self._running.append(p)
        self._deliver(p, p.state.start(rows))

    def _step(self, chunk: PrefillChunk | None = None) -> None:
        """One step of the running requests; ``chunk``: the newcomer's next prompt tokens ride in its pass."""
        slots = list(self._running)       # delivering may remove finished requests from _running
        states = [s.state for s in slots]
        c = self.counters
        before = [(st.stats.drafts, st.stats.draft_tokens, st.stats.accepted_tokens) for st in states]
        t0 = time.perf_counter()
        outs = step_batch(self.kv, states, self.budget, prefill=chunk)
        c.steps += 1
        for s, out, (d0, t0, a0) in zip(slots, outs, before):
            st = s.state.stats
            c.drafts += st.drafts - d0
            c.draft_tokens += st.draft_tokens - t0
            accepted = st.accepted_tokens - a0
            c.accepted_tokens += accepted
            for i in range(min(accepted, len(c.accepted_per_position))):
                c.accepted_per_position[i] += 1
            self._deliver(s, out)
        if chunk is not None:             # (delivering moved its slot down past any request that ended)
            p = self._prefilling
            p.prefilled = chunk.start + chunk.ran
            p.state.stats.prefill_s += time.perf_counter() - t0
            c.fused_prefills += 1
            if chunk.logits is not None:
                self._join(p, chunk.logits)
        if self.on_step is not None:
            self.on_step(self)

    def _deliver(self, s: _Slot, tokens: list[int]) -> None:
        self.counters.emitted += len(tokens)
        if tokens or s.state.finish is not None:
            s.handle.events.put(("tokens", (tokens, s.state.finish)))
        if s.state.finish is not None:
            self._remove(s)
            self._finish_handle(s.handle, aborted=False)

    def _drop_cancelled(self) -> None:
        for s in [s for s in self._running if s.handle.cancelled]:
            self._remove(s)
            self._finish_handle(s.handle, aborted=True)
        p = self._prefilling
        if p is not None and p.handle.cancelled:
            self._prefilling = None
            self.kv.drop_last()
            self._close_drafter(p)
            self._finish_handle(p.handle, aborted=True)

    def _remove(self, s: _Slot) -> None:
        """Free a running request's slot; the last running request moves into it (and the prefilling one,
        which always sits after the running ones, moves down)."""
        i = self._running.index(s)
        last = len(self._running) - 1
        if i != last:
            self.kv.move_slot(last, i)
            self._running[i] = self._running[last]
        self._running.pop()
        if self._prefilling is not None:
            self.kv.move_slot(last + 1, last)
        self.kv.drop_last()
        self._close_drafter(s)

    @staticmethod
    def _close_drafter(s: _Slot) -> None:
        if s.state.committed is not None:
            catch_up(s.state)              # the drafter learns from every step, also the deferred ones
        close = getattr(s.state.drafter, "close", None)
        if close is not None:
            close(share=s.handle.req.share)

    def _finish_handle(self, h: Handle, aborted: bool) -> None:
        if aborted:
            self.counters.aborted += 1
            if h.stats.finish_reason is None:
                h.stats.finish_reason = "abort"
        else:
            self.counters.finished += 1
        h.events.put(("done", h.stats))

    def _fail_all(self, exc: Exception) -> None:
        slots = self._running + ([self._prefilling] if self._prefilling is not None else [])
        self._running, self._prefilling = [], None
        try:
            while self.kv.used:
                self.kv.drop_last()
        except Exception:  # noqa: BLE001 - the requests still get their error below
            log.exception("freeing the failed requests' KV slots failed")
        for s in slots:
            self._close_drafter(s)
            s.handle.events.put(("error", exc))
        if self._closed:
            with self._cond:
                while self._waiting:
                    self._waiting.popleft().events.put(("error", exc))


def accepted_position_histogram(c: Counters) -> np.ndarray:
    """Accepted tokens per draft position (vLLM's ``spec_decode_num_accepted_tokens_per_pos``)."""
    return np.asarray(c.accepted_per_position)
