"""Generations in a replica: admission (a bounded number decode at once, a bounded number wait, the rest get
503 with Retry-After), CPU-heavy preparation (validation, chat template, tokenization) on a worker thread,
and the engine's blocking iterator consumed on a worker thread, so the replica's event loop only moves
chunks. Cancelling (client gone, timeout) closes the engine iterator, which stops decoding.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

from aded_ray.serve.errors import APIError, from_value_error, overloaded

log = logging.getLogger("ray.serve")
_END = object()


class Generations:
    """Admission control and threads for one replica's engine."""

    def __init__(self, engine, *, max_running: int, max_waiting: int):
        self.engine = engine
        self.max_running, self.max_waiting = max_running, max_waiting
        self._slots = asyncio.Semaphore(max_running)
        self.waiting = 0            # admitted to the queue, waiting for a slot
        self.running = 0            # holding a slot: preparing, decoding or closing
        self.counters = {"finished": 0, "cancelled": 0, "failed": 0, "rejected": 0, "tokens": 0}
        self._lock = threading.Lock()
        self._prep = ThreadPoolExecutor(max_workers=2, thread_name_prefix="aded-prep")
        self._decode = ThreadPoolExecutor(max_workers=max_running, thread_name_prefix="aded-decode")
        self._streams: set[Stream] = set()

    def snapshot(self) -> dict:
        with self._lock:
            return {"running": self.running, "waiting": self.waiting, **{f"{k}_total": v
                                                                        for k, v in self.counters.items()}}

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.counters[key] += n

    def _release(self) -> None:
        self.running -= 1
        self._slots.release()

    async def start(self, prompt, *, chat: bool, max_tokens: int, sampling: dict, private: bool) -> "Stream":
        """Admit the request and start it; raises :class:`APIError` (400 for invalid input, 503 when the
        replica is full) before any output, so an HTTP error status can still be sent."""
        if self._slots.locked() and self.waiting >= self.max_waiting:
            self._count("rejected")
            raise overloaded(f"this replica is busy ({self.running} running, {self.waiting} waiting)")
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        kwargs = dict(chat=chat, max_new_tokens=max_tokens, **sampling)
        if private:
            # no drafter sees it: its text joins no history (local or shared) and no shared tri-gram counts
            kwargs.update(speculate=False)
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self._prep, functools.partial(self._prepare, prompt, kwargs))
        try:
            gen = await asyncio.shield(fut)
        except asyncio.CancelledError:
            fut.add_done_callback(functools.partial(self._orphan, loop))
            raise
        except BaseException:
            self._release()
            raise
        return Stream(self, gen, loop)

    def _prepare(self, prompt, kwargs):
        try:
            if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
                self._check_ids(prompt)
            return self.engine.generate(prompt, **kwargs)
        except ValueError as e:
            raise from_value_error(e) from None
        except (TypeError, UnicodeError) as e:          # the tokenizer refused the text
            raise APIError(400, f"the prompt cannot be tokenized: {e}"[:500], param="prompt") from None
        except Exception as e:
            if type(e).__name__ == "QueueFull":       # the engine's own waiting queue is full
                raise overloaded("the engine's queue is full") from None
            raise

    def _check_ids(self, ids: list[int]) -> None:
        vocab = len(self.engine.tokenizer)
        bad = next((t for t in ids if t >= vocab), None)
        if bad is not None:
            raise APIError(400, f"prompt: token id {bad} is not in the vocabulary (size {vocab})", param="prompt")

    def _orphan(self, loop, fut) -> None:
        """The request was cancelled while it was being prepared: close what the preparation started."""
        gen = None if fut.cancelled() or fut.exception() is not None else fut.result()

        def close():
            try:
                if gen is not None:
                    gen.close()
            finally:
                _call(loop, self._release)
                self._count("cancelled")

        self._decode.submit(close)

    def close(self) -> None:
        for s in list(self._streams):
            s.cancel()
        self._prep.shutdown(wait=False, cancel_futures=True)
        self._decode.shutdown(wait=False, cancel_futures=True)


def _call(loop, fn, *args) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:          # the loop is closed: the replica is going away
        pass


class Stream:
    """The chunks of one started request, produced by a worker thread; iterate with ``async for``.
    ``cancel()`` (or ``aclose()``) stops the generation at its next step and frees the slot."""

    def __init__(self, owner: Generations, gen, loop):
        self.owner, self.gen, self.loop = owner, gen, loop
        self.q: asyncio.Queue = asyncio.Queue()
        self._cancel = threading.Event()
        self.done = False
        self.finished = False
        owner._streams.add(self)
        owner._decode.submit(self._run)

    def _run(self) -> None:
        o = self.owner
        outcome = "finished"
        try:
            for c in self.gen:
                o._count("tokens", len(c.token_ids))
                _call(self.loop, self.q.put_nowait, c)
                if self._cancel.is_set():
                    outcome = "cancelled"
                    break
        except BaseException as e:  # noqa: BLE001 - handed to the request
            outcome = "failed"
            _call(self.loop, self.q.put_nowait, e)
        finally:
            try:
                self.gen.close()
            except Exception:  # noqa: BLE001
                log.exception("closing a generation failed")
            o._count(outcome)
            _call(self.loop, self._finish)

    def _finish(self) -> None:
        self.done = True
        self.owner._streams.discard(self)
        self.owner._release()
        self.q.put_nowait(_END)

    def cancel(self) -> None:
        self._cancel.set()

    async def aclose(self) -> None:
        self.cancel()

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.finished:
            raise StopAsyncIteration
        item = await self.q.get()
        if item is _END:
            self.finished = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item
