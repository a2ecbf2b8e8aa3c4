"""``aded bench-store``: trace replay by a fleet of processes, with shared, isolated or single-process state.

The traces are dealt round-robin to ``processes`` OS processes that replay them at the same time:

- ``shared``: each process's matrix is connected to one Redis store (its own deltas flushed in the
  background, the others' pulled in), as a fleet of replicas would be;
- ``isolated``: the same processes, each adapting alone;
- ``single``: one process replays every trace, seeing all traffic (the reference).

Reported: MAT of each, and the store's cost on the decode thread per step (recording own deltas + applying
pulled ones, µs) and the background thread's CPU time per step.
"""
from __future__ import annotations

import multiprocessing as mp
import time

import numpy as np


class _TimedJournal:
    """Wraps a SharedStore to time what the decode thread spends on it."""

    def __init__(self, store):
        self.store, self.seconds, self.calls = store, 0.0, 0

    def record(self, keys, toks):
        t = time.perf_counter()
        self.store.record(keys, toks)
        self.seconds += time.perf_counter() - t

    def drain(self):
        t = time.perf_counter()
        self.store.drain()
        self.seconds += time.perf_counter() - t
        self.calls += 1

    def record_request(self, tokens):
        t = time.perf_counter()
        self.store.record_request(tokens)
        self.seconds += time.perf_counter() - t

    def drain_history(self, drafter):
        t = time.perf_counter()
        self.store.drain_history(drafter)
        self.seconds += time.perf_counter() - t


def _worker(args) -> dict:
    from aded_ray.bench.replay import replay
    from aded_ray.draft.matrix import TrigramMatrix

    store, traces, drafter, url, namespace, start_at = args
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
    res = replay(traces, d)
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


def run_fleet(traces: list[dict], store: str, *, processes: int = 4, drafter: str = "aded",
              url: str | None = None) -> dict:
    """MAT of a shared fleet, an isolated fleet and a single process over the same traces."""
    from aded_ray.bench.replay import replay
    from aded_ray.draft.matrix import TrigramMatrix

    ctx = mp.get_context("spawn")
    results = {}
    for mode in ("isolated", "shared"):
        if mode == "shared" and not url:
            continue
        ns = f"bench-{time.time_ns()}"
        start_at = time.time() + 8.0       # time for the spawned processes to import and load
        jobs = [(store, traces[i::processes], drafter, url if mode == "shared" else None, ns, start_at)
                for i in range(processes)]
        with ctx.Pool(processes) as pool:
            outs = pool.map(_worker, jobs)
        steps = sum(o["steps"] for o in outs)
        emitted = sum(o["emitted"] for o in outs)
        results[mode] = {"mat": round(emitted / steps, 4), "steps": steps,
                         "nodes_per_step": round(sum(o["nodes"] for o in outs) / steps, 2)}
        if mode == "shared":
            results[mode]["store_us_per_step"] = round(float(np.mean([o["store_us_per_step"] for o in outs])), 2)
            results[mode]["drafter_us_p50"] = round(float(np.mean([o["draft_us"] for o in outs])), 1)
            results[mode]["dropped_entries"] = sum(o["store_stats"]["dropped_entries"] for o in outs)
            results[mode]["applied_entries"] = sum(o["store_stats"]["applied_entries"] for o in outs)
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
    return (f"| {name} | {r['single']['mat']:.3f} | {s.get('mat', float('nan')):.3f} | {r['isolated']['mat']:.3f} | "
            f"{s.get('mat', float('nan')) / r['single']['mat']:.1%} | {cost} |")
