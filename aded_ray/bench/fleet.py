"""``aded bench-store``: trace replay by a fleet of processes, with shared, isolated or single-process state.

**Round robin.** The traces are dealt round-robin to ``processes`` OS processes that replay them at the same
time:

- ``shared``: each process's matrix and drafter are connected to one Redis store (own deltas and finished
  requests flushed in the background, the others' pulled in), as a fleet of replicas would be;
- ``isolated``: the same processes, each adapting alone;
- ``single``: one process replays every trace, seeing all traffic at once (the ceiling for sharing).

Fleet processes are paced: a replay step lasts at least ``pace_ms`` (the model's verification pass on this
machine, from the measured cost curve), otherwise a replay, ~100x faster than decoding, would make the
store's sub-second staleness look like dozens of requests.

**Late replica.** ``processes - 1`` replicas serve the first half of the traces through the store; then a
new replica starts and serves the second half, either connected to the store (it warm-starts from the
merged state) or alone (cold), as an autoscaled or restarted replica would.

Reported: MAT of each, and the store's cost on the decode thread per step (recording own deltas + applying
pulled ones, µs).
"""
from __future__ import annotations

import multiprocessing as mp
import time

import numpy as np


class _TimedJournal:
    """Wraps a SharedStore to time what the decode thread spends on it."""

    def __init__(self, store):
        self.store, self.seconds = store, 0.0

    def _timed(self, fn, *args):
        t = time.perf_counter()
        fn(*args)
        self.seconds += time.perf_counter() - t

    def record(self, keys, toks):
        self._timed(self.store.record, keys, toks)

    def drain(self):
        self._timed(self.store.drain)

    def record_request(self, tokens):
        self._timed(self.store.record_request, tokens)

    def drain_history(self, drafter):
        self._timed(self.store.drain_history, drafter)


def _worker(args) -> dict:
    from aded_ray.bench.replay import replay
    from aded_ray.draft.matrix import TrigramMatrix

    store, traces, drafter, url, namespace, start_at, pace_ms = args
    m = TrigramMatrix.load(store)
    d = _make_drafter(drafter, m)
    shared = timed = None
    if url:
        from aded_ray.store.redis_store import SharedStore

        shared = SharedStore(m, url, namespace=namespace, drafter=d)
        shared.drain()
        timed = _TimedJournal(shared)
        m.journal = timed
        if hasattr(d, "journal"):
            d.journal = timed
    while time.time() < start_at:        # every process starts together
        time.sleep(0.005)
    t0 = time.perf_counter()
    res = replay(traces, d, pace_ms=pace_ms)
    wall = time.perf_counter() - t0
    out = {"steps": res.steps, "emitted": res.emitted, "nodes": res.nodes, "wall_s": wall,
           "draft_us": float(np.median(res.draft_us)) if res.draft_us else 0.0}
    if shared is not None:
        out["store_us_per_step"] = 1e6 * timed.seconds / max(res.steps, 1)
        out["store_stats"] = dict(shared.stats)
        shared.close()
    return out


def _make_drafter(name, matrix):
    if name == "aded":
        from aded_ray.draft.mcts import MCTSDrafter

        return MCTSDrafter(matrix)
    from aded_ray.draft.best import BestDrafter

    return BestDrafter(matrix)


def _fleet(jobs_traces, store, drafter, url, ns, pace_ms) -> dict:
    """Replay each list of ``jobs_traces`` in its own process, all starting together; summed result."""
    start_at = time.time() + 8.0           # time for the spawned processes to import and load
    jobs = [(store, tr, drafter, url, ns, start_at, pace_ms) for tr in jobs_traces]
    with mp.get_context("spawn").Pool(len(jobs)) as pool:
        outs = pool.map(_worker, jobs)
    steps = sum(o["steps"] for o in outs)
    r = {"mat": round(sum(o["emitted"] for o in outs) / steps, 4), "steps": steps,
         "nodes_per_step": round(sum(o["nodes"] for o in outs) / steps, 2)}
    if url:
        r["store_us_per_step"] = round(float(np.mean([o["store_us_per_step"] for o in outs])), 2)
        r["drafter_us_p50"] = round(float(np.mean([o["draft_us"] for o in outs])), 1)
        r["dropped_entries"] = sum(o["store_stats"]["dropped_entries"] for o in outs)
        r["applied_entries"] = sum(o["store_stats"]["applied_entries"] for o in outs)
    return r


def run_fleet(traces: list[dict], store: str, *, processes: int = 4, drafter: str = "aded",
              url: str | None = None, pace_ms: float = 0.0) -> dict:
    """MAT of a shared fleet, an isolated fleet and a single process over the same traces (round robin),
    and of a late replica serving the second half warm (shared) or cold."""
    from aded_ray.bench.replay import replay
    from aded_ray.draft.matrix import TrigramMatrix

    results = {}
    deal = [traces[i::processes] for i in range(processes)]
    results["isolated"] = _fleet(deal, store, drafter, None, None, pace_ms)
    if url:
        results["shared"] = _fleet(deal, store, drafter, url, f"bench-{time.time_ns()}", pace_ms)
        half = len(traces) // 2
        ns = f"bench-{time.time_ns()}"
        early = [traces[:half][i::processes - 1] for i in range(max(processes - 1, 1))]
        _fleet(early, store, drafter, url, ns, pace_ms)
        results["late_warm"] = _fleet([traces[half:]], store, drafter, url, ns, 0.0)
        results["late_cold"] = _fleet([traces[half:]], store, drafter, None, None, 0.0)
    m = TrigramMatrix.load(store)
    d = _make_drafter(drafter, m)
    r = replay(traces, d)
    results["single"] = {"mat": round(r.mat, 4), "steps": r.steps, "nodes_per_step": round(r.nodes / r.steps, 2)}
    return results


def markdown(name: str, r: dict, step_ms: float | None) -> str:
    s = r.get("shared", {})
    cost = ""
    if s and step_ms:
        cost = f"{s['store_us_per_step']:.1f} µs ({100 * s['store_us_per_step'] / (1000 * step_ms):.3f}% of a {step_ms:.0f} ms step)"
    elif s:
        cost = f"{s['store_us_per_step']:.1f} µs"
    nan = float("nan")
    warm, cold = r.get("late_warm", {}).get("mat", nan), r.get("late_cold", {}).get("mat", nan)
    return (f"| {name} | {r['single']['mat']:.3f} | {s.get('mat', nan):.3f} | {r['isolated']['mat']:.3f} | "
            f"{s.get('mat', nan) / r['single']['mat']:.1%} | {s.get('mat', nan) / r['isolated']['mat'] - 1:+.1%} | "
            f"{warm:.3f} / {cold:.3f} ({warm / cold - 1:+.1%}) | {cost} |")
