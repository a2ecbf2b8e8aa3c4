"""``aded bench-store``: trace replay by a fleet of processes, with shared, isolated or single-process state.

**Round robin.** The traces are dealt round-robin, in file order, to ``processes`` OS processes that replay
them at the same time. Rollout files list the ``n`` samples of a prompt together, so with ``n = 8`` and 4
processes each replica gets 2 samples of every prompt and none sees all of them.

- ``shared``: each process's matrix and drafter are connected to one Redis store (own deltas, finished
  requests, the model's recycled predictions and the combiner weights flushed in the background, the
  others' pulled in), as a fleet of replicas would be; steps are paced (below);
- ``isolated``: the same processes, each adapting alone (nothing interacts: not paced);
- ``single``: one process replays every trace, seeing all traffic at once (the ceiling for sharing).

Fleet processes are paced: a replay step lasts at least ``pace_ms`` (the model's verification pass on this
machine, from the measured cost curve), otherwise a replay, ~100x faster than decoding, would make the
store's sub-second staleness look like dozens of requests.

**Late replica.** The last replica joins late: the others start with their deals plus the first half of its
deal (:func:`late_deals`: the traffic a load balancer routes to the live replicas meanwhile), and it starts
when the shared fleet had served half of its deal (scaled by ``p / (p - 1)``: the others carry its share),
serving the second half, connected to the store (warm start from the fleet's merged state) or alone (cold).
Its first ``first`` requests are compared with the same requests served by the shared fleet in which it ran
from the start: both fleets have served every earlier request.

Store cost: what the decode thread spends on the store per step (recording its own deltas, predictions and
finished requests, applying the pulled ones; flush and pull run in a background thread).
"""
from __future__ import annotations

import multiprocessing as mp
import time

import numpy as np


class _TimedJournal:
    """Wraps a SharedStore (and its model-state sync) to time what the decode thread spends on it."""

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

    def record_recycle(self, *args):
        self._timed(self.store.model_sync.record_recycle, *args)


def _worker(args) -> dict:
    from aded_ray.bench.replay import replay
    from aded_ray.draft.matrix import TrigramMatrix

    store, traces, drafter, url, namespace, start_at, pace_ms, share_model = args
    m = TrigramMatrix.load(store)
    d = _make_drafter(drafter, m)
    shared = timed = None
    if url:
        from aded_ray.store.redis_store import SharedStore

        shared = SharedStore(m, url, namespace=namespace, drafter=d, share_model=share_model)
        timed = _TimedJournal(shared)
        m.journal = timed
        if hasattr(d, "journal"):
            d.journal = timed
        if shared.model_sync is not None:
            d.recycle.journal = timed
    while time.time() < start_at:        # every process starts together (a late one when it is due)
        time.sleep(0.005)
    if shared is not None:
        deadline = time.time() + 10
        while not shared.synced and time.time() < deadline:   # the warm start has been loaded
            time.sleep(0.005)
        shared.drain()
    t0 = time.perf_counter()
    res = replay(traces, d, pace_ms=pace_ms)
    wall = time.perf_counter() - t0
    out = {"steps": res.steps, "emitted": res.emitted, "nodes": res.nodes, "wall_s": wall,
           "per_trace": res.per_trace, "draft_us": float(np.median(res.draft_us)) if res.draft_us else 0.0}
    if shared is not None:
        out["store_us_per_step"] = 1e6 * timed.seconds / max(res.steps, 1)
        out["store_stats"] = {**shared.stats, **(shared.model_sync.stats if shared.model_sync else {})}
        shared.close()
    return out


def _make_drafter(name, matrix):
    if name == "aded":
        from aded_ray.draft.mcts import MCTSDrafter

        return MCTSDrafter(matrix)
    from aded_ray.draft.best import BestDrafter

    return BestDrafter(matrix)


def _fleet(jobs_traces, store, drafter, url, ns, pace_ms, delays=None, share_model=True) -> list[dict]:
    """Replay each list of ``jobs_traces`` in its own process, all starting together (``delays[i]`` seconds
    later for process i); per-process results."""
    start_at = time.time() + 8.0           # time for the spawned processes to import and load
    delays = delays or [0.0] * len(jobs_traces)
    jobs = [(store, tr, drafter, url, ns, start_at + dl, pace_ms, share_model) for tr, dl in zip(jobs_traces, delays)]
    with mp.get_context("spawn").Pool(len(jobs)) as pool:
        return pool.map(_worker, jobs)


def _sum(outs: list[dict]) -> dict:
    steps = sum(o["steps"] for o in outs)
    r = {"mat": round(sum(o["emitted"] for o in outs) / steps, 4), "steps": steps,
         "nodes_per_step": round(sum(o["nodes"] for o in outs) / steps, 2)}
    if "store_us_per_step" in outs[0]:
        r["store_us_per_step"] = round(float(np.mean([o["store_us_per_step"] for o in outs])), 2)
        r["store_us_per_step_max"] = round(float(max(o["store_us_per_step"] for o in outs)), 2)
        r["drafter_us_p50"] = round(float(np.mean([o["draft_us"] for o in outs])), 1)
        for k in ("dropped_entries", "applied_entries", "rec_applied", "rec_rejected", "comb_adopted"):
            r[k] = sum(o["store_stats"].get(k, 0) for o in outs)
    return r


def _mat(per_trace) -> float:
    return round(sum(e for _, e in per_trace) / max(sum(s for s, _ in per_trace), 1), 4)


def late_deals(deal: list[list[dict]], half: int) -> list[list[dict]]:
    """The late run's deals: the last replica serves ``deal[-1][half:]``; what it would have served before
    joining, ``deal[-1][:half]``, goes to the others (as a load balancer routes around an absent replica),
    request ``j`` to replica ``j % (p - 1)`` right after that replica's own ``j``-th request, so the fleet it
    joins has seen every earlier request, as the fleet it is compared with had."""
    p = len(deal)
    if p < 2:
        return [deal[0][half:]]
    out = []
    for i in range(p - 1):
        mine = []
        for k, t in enumerate(deal[i]):
            mine.append(t)
            if k < half and k % (p - 1) == i:
                mine.append(deal[-1][k])
        mine += [deal[-1][j] for j in range(len(deal[i]), half) if j % (p - 1) == i]
        out.append(mine)
    return out + [deal[-1][half:]]


def run_fleet(traces: list[dict], store: str, *, processes: int = 4, drafter: str = "aded",
              url: str | None = None, pace_ms: float = 0.0, first: int = 10, share_model: bool = True) -> dict:
    """MAT of a shared fleet, an isolated fleet and a single process over the same traces (round robin),
    and of a replica that joins late, warm (shared) or cold, on its first ``first`` requests."""
    from aded_ray.bench.replay import replay
    from aded_ray.draft.matrix import TrigramMatrix

    results = {}
    deal = [traces[i::processes] for i in range(processes)]
    results["isolated"] = _sum(_fleet(deal, store, drafter, None, None, 0.0))
    if url:
        outs = _fleet(deal, store, drafter, url, f"bench-{time.time_ns()}", pace_ms, share_model=share_model)
        results["shared"] = _sum(outs)
        last = outs[-1]
        half = len(deal[-1]) // 2
        steps_half = sum(s for s, _ in last["per_trace"][:half])
        delay = last["wall_s"] * steps_half / max(last["steps"], 1)
        late_deal = late_deals(deal, half)
        delay *= processes / max(processes - 1, 1)      # the others serve the absent one's share meanwhile
        late = _fleet(late_deal, store, drafter, url, f"bench-{time.time_ns()}", pace_ms,
                      delays=[0.0] * (processes - 1) + [delay], share_model=share_model)
        cold = _fleet([deal[-1][half:]], store, drafter, None, None, 0.0)
        n = min(first, len(deal[-1]) - half)
        results["late"] = {"delay_s": round(delay, 1), "requests": n,
                           "warm": _mat(late[-1]["per_trace"][:n]), "cold": _mat(cold[0]["per_trace"][:n]),
                           "fleet_same": _mat(last["per_trace"][half:half + n]),
                           "warm_all": _mat(late[-1]["per_trace"]), "cold_all": _mat(cold[0]["per_trace"])}
    m = TrigramMatrix.load(store)
    d = _make_drafter(drafter, m)
    r = replay(traces, d)
    results["single"] = {"mat": round(r.mat, 4), "steps": r.steps, "nodes_per_step": round(r.nodes / r.steps, 2)}
    return results


HEAD = ("| traces | drafter | single process MAT | shared fleet MAT | isolated fleet MAT | shared / isolated | "
        "shared / single | late replica, first requests: warm / fleet on the same (ratio) / cold | "
        "store cost per step (decode thread) |\n|---|---|---|---|---|---|---|---|---|")


def markdown(name: str, drafter: str, r: dict, step_ms: float | None) -> str:
    s, nan = r.get("shared", {}), float("nan")
    cost = ""
    if s:
        cost = f"{s['store_us_per_step']:.0f} µs (max {s['store_us_per_step_max']:.0f})"
        if step_ms:
            cost += f", {100 * s['store_us_per_step'] / (1000 * step_ms):.2f}% of a {step_ms:.1f} ms step"
    lt = r.get("late", {})
    late = (f"{lt['warm']:.3f} / {lt['fleet_same']:.3f} ({lt['warm'] / lt['fleet_same']:.1%}) / {lt['cold']:.3f} "
            f"({lt['requests']} requests)") if lt else ""
    sm = s.get("mat", nan)
    return (f"| {name} | {drafter} | {r['single']['mat']:.3f} | {sm:.3f} | {r['isolated']['mat']:.3f} | "
            f"**{sm / r['isolated']['mat']:.2f}x** | {sm / r['single']['mat']:.1%} | {late} | {cost} |")
