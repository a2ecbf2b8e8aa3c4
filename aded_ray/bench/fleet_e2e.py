"""End to end: a fleet of engine processes (the model verifying) serving the rollout workload (or the
repeats workload: the same prompts, greedy, in ``rounds`` rounds of random order; or the tasks workload:
every template over a few functions, greedy), sharing one Redis store or each alone; tokens/s and MAT.

Each process builds an :class:`aded_ray.engine.Engine` (``threads`` torch threads, one request at a time),
warms up on one unrelated request, connects its matrix and drafter to the store (shared) or not
(isolated), and serves its deal of the requests when every process is ready. A request is one sample of a
rollout: the prompt of a recorded rollout trace, temperature 0.8, seed = its position in the workload, so
the shared and the isolated fleet must produce the same tokens (exact speculative sampling): that is
checked. Fleet tokens/s = all completion tokens / the time from the common start to the last replica's end.
"""
from __future__ import annotations

import multiprocessing as mp
import time


def _worker(args) -> dict:
    from aded_ray.config import EngineConfig, VerifyConfig
    from aded_ray.engine import Engine

    store, requests, url, ns, ready_dir, n_procs, max_new, threads, temperature, speculate = args
    eng = Engine(EngineConfig(store=store, max_batch=1, verify=VerifyConfig(threads=threads, device="cpu")))
    list(eng.generate("Say hello.", chat=True, max_new_tokens=8))
    shared = None
    if url:
        from aded_ray.store.redis_store import SharedStore

        shared = SharedStore(eng.matrix, url, namespace=ns, drafter=eng.drafter)
    import os
    from pathlib import Path

    Path(ready_dir, str(os.getpid())).touch()               # start together, once every engine is built
    while len(os.listdir(ready_dir)) < n_procs:
        time.sleep(0.01)
    if shared is not None:
        while not shared.synced:
            time.sleep(0.01)
    t0 = time.time()
    outs = []
    for r in requests:
        ids, stats = [], None
        for ch in eng.generate(r["prompt_ids"], max_new_tokens=max_new, temperature=temperature, seed=r["seed"],
                               speculate=speculate):
            ids += ch.token_ids
            stats = ch.stats or stats
        outs.append({"id": r["id"], "ids": ids, "steps": stats.steps, "emitted": stats.emitted})
    t1 = time.time()
    res = {"start": t0, "end": t1, "outs": outs, "mode": eng.mode, "speculate": eng.speculate}
    if shared is not None:
        shared.flush()                 # then count the finished requests (sampled) the fleet's history holds
        res["hist_len"] = shared.redis.xlen(shared.k_hist)
        res["store"] = {**shared.stats, **(shared.model_sync.stats if shared.model_sync else {})}
        shared.close()
    eng.shutdown()
    return res


def workload_requests(traces: list[dict], per_set: int) -> list[dict]:
    """The requests of the first ``per_set`` prompts of each set (MT-Bench, HumanEval, ShareGPT) of a
    workload's traces (``rollouts``: every sample of each prompt; ``repeats``: its one greedy trace),
    prompt-major, each with its own seed."""
    groups: dict[str, list[dict]] = {}
    for t in traces:
        groups.setdefault(t["group"], []).append(t)
    chosen, per = [], {}
    for g, samples in groups.items():
        kind = g.split("-")[0].split("/")[0].lower()
        if per.get(kind, 0) < per_set:
            per[kind] = per.get(kind, 0) + 1
            chosen += samples
    return [{"id": t["id"], "prompt_ids": t["prompt_ids"], "seed": 1000 + i} for i, t in enumerate(chosen)]


def task_requests(traces: list[dict], functions: int) -> list[dict]:
    """The tasks workload's requests for its first ``functions`` inputs, every template, in the recorded
    (template-major) order: round robin gives a function's requests to different replicas when ``functions``
    is not a multiple of their number, and a later template's request follows the earlier ones' on the others."""
    fn = [t["id"].split("-", 1)[1] for t in traces]            # "task{t}-{function id}"
    keep = set(list(dict.fromkeys(fn))[:functions])
    chosen = [t for t, f in zip(traces, fn) if f in keep]
    return [{"id": t["id"], "prompt_ids": t["prompt_ids"], "seed": 1000 + i} for i, t in enumerate(chosen)]


def fleet_jobs(requests: list[dict], store, url, ready: str, processes: int, max_new: int, threads: int,
               temperature: float, speculate: bool = True) -> list[tuple]:
    """One worker's arguments per process: requests dealt round robin, and **one** store namespace for the
    whole fleet (a namespace per process would be four isolated stores under one Redis)."""
    ns = f"e2e-{time.time_ns()}"
    return [(store, requests[i::processes], url, ns, ready, processes, max_new, threads, temperature, speculate)
            for i in range(processes)]


def run(requests: list[dict], store: str | None, url: str | None, *, processes: int = 4, max_new: int = 96,
        threads: int = 1, temperature: float = 0.8, speculate: bool = True) -> dict:
    import tempfile

    with tempfile.TemporaryDirectory() as ready:
        jobs = fleet_jobs(requests, store, url, ready, processes, max_new, threads, temperature, speculate)
        with mp.get_context("spawn").Pool(processes) as pool:
            outs = pool.map(_worker, jobs)
    tokens = sum(len(o["ids"]) for w in outs for o in w["outs"])
    steps = sum(o["steps"] for w in outs for o in w["outs"])
    emitted = sum(o["emitted"] for w in outs for o in w["outs"])
    wall = max(w["end"] for w in outs) - min(w["start"] for w in outs)
    return {"tokens": tokens, "wall_s": round(wall, 2), "tok_s": round(tokens / wall, 2),
            "mat": round(emitted / max(steps, 1), 4), "mode": outs[0]["mode"], "speculate": outs[0]["speculate"],
            "ids": {o["id"]: o["ids"] for w in outs for o in w["outs"]},
            "store": [w.get("store") for w in outs], "hist_len": max(w.get("hist_len", 0) for w in outs)}


def main(argv=None) -> int:
    import argparse
    import json

    from aded_ray.bench.traces import load_traces
    from aded_ray.paths import cache_dir, default_store
    from aded_ray.store.server import RedisServer

    ap = argparse.ArgumentParser(description="end-to-end fleet on a repeated-request workload: shared vs isolated")
    ap.add_argument("--workload", choices=("rollouts", "repeats", "tasks"), default="rollouts",
                    help="rollouts: every sample of a prompt, temperature 0.8; repeats: the prompts (greedy) "
                         "in --rounds rounds, each in a seeded random order; tasks: every template over the "
                         "first --per-set functions (greedy)")
    ap.add_argument("--traces", default=None, help="default: the workload's recorded traces in the cache")
    ap.add_argument("--rounds", type=int, default=None, help="--workload repeats: rounds of the same requests (4)")
    ap.add_argument("--per-set", type=int, default=1, help="prompts per set (tasks: functions)")
    ap.add_argument("--processes", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--store", default=str(default_store()))
    a = ap.parse_args(argv)
    if a.rounds is not None and a.workload != "repeats":
        raise SystemExit(f"fleet_e2e: --rounds {a.rounds} applies to --workload repeats only")
    a.rounds = 4 if a.rounds is None else a.rounds
    traces = load_traces(a.traces or cache_dir() / "traces" / f"{a.workload}.jsonl")
    reqs = task_requests(traces, a.per_set) if a.workload == "tasks" else workload_requests(traces, a.per_set)
    temperature = 0.0 if a.workload == "tasks" else 0.8
    if a.workload == "repeats":
        from aded_ray.bench.rollouts import repeat_rounds

        reqs, temperature = repeat_rounds(reqs, a.rounds), 0.0
    kw = dict(processes=a.processes, max_new=a.max_new_tokens, threads=a.threads, temperature=temperature)
    srv = RedisServer(cache_dir() / "bench-redis-e2e")
    try:
        plain = run(reqs, a.store, None, speculate=False, **kw)     # the baseline: the same fleet, no drafts
        iso = run(reqs, a.store, None, **kw)
        sh = run(reqs, a.store, srv.url, **kw)
    finally:
        srv.stop()
    same = sum(iso["ids"][k] == sh["ids"][k] for k in iso["ids"])
    same_plain = [sum(plain["ids"][k] == r["ids"][k] for k in plain["ids"]) for r in (iso, sh)]
    what = {"rollouts": f"{a.per_set} prompt(s) per set x samples", "repeats": f"{a.per_set} prompt(s) per set x "
            f"{a.rounds} rounds", "tasks": f"{a.per_set} function(s) x templates"}[a.workload]
    print(f"{len(reqs)} requests ({a.workload}: {what}), {a.processes} processes x "
          f"{a.threads} thread(s), mode {sh['mode']}, speculation {sh['speculate']}, temperature {temperature}, "
          f"max {a.max_new_tokens} tokens; identical outputs shared vs isolated: {same}/{len(reqs)}, "
          f"isolated vs plain: {same_plain[0]}/{len(reqs)}, shared vs plain: {same_plain[1]}/{len(reqs)}")
    print("| fleet | tokens | wall s | tokens/s | x plain | MAT |\n|---|---|---|---|---|---|")
    for name, r in (("plain decoding", plain), ("isolated", iso), ("shared store", sh)):
        print(f"| {name} | {r['tokens']} | {r['wall_s']:.1f} | {r['tok_s']:.2f} | {r['tok_s'] / plain['tok_s']:.2f}x "
              f"| {r['mat']:.3f} |")
    print(f"finished requests in the shared fleet's history: {sh['hist_len']} of {len(reqs)}")
    print(f"shared / isolated tokens/s: {sh['tok_s'] / iso['tok_s']:.3f}x, MAT {sh['mat'] / iso['mat']:.3f}x")
    print(json.dumps({"plain": {k: v for k, v in plain.items() if k != "ids"},
                      "isolated": {k: v for k, v in iso.items() if k != "ids"},
                      "shared": {k: v for k, v in sh.items() if k != "ids"}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
