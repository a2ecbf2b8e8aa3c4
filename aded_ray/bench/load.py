"""``aded bench-load``: throughput and latency under concurrent requests, side by side in one process.

At each concurrency c, c closed-loop clients (threads) send the same list of requests (MT-Bench and HumanEval
prompts, greedy, ``max_new_tokens`` each; ``max(4c, min_requests)`` of them) through one engine, as each of
(in two rounds of half the requests, the three systems interleaved in each round):

- ``one at a time``: the scheduler limited to one running request (the engine before batching: every other
  request waits), speculative with the ``auto`` budget;
- ``batched plain``: continuous batching, no speculation (every step one token per request);
- ``batched speculative``: continuous batching with speculation, the batch-aware ``auto`` budget;
- with ``--compiled``: ``compiled plain`` and ``compiled speculative``, the same two on an engine whose batched
  passes are compiled per token bucket (``verify.compile``), run by a process of its own;
- with ``--baseline-mode M``: ``batched plain [M]`` and ``batched speculative [M]``, the same two on an engine
  in verify mode ``M`` (another weight layout, e.g. the previous default), run by a process of its own.

Before each run the drafter forgets its history and adaptive state, so no run drafts from another run's
outputs. The budget keeps what it learnt (as in a running service): it is warmed up once, before the first
level, on other prompts (the input-grounded set), so no run pays for the budget's start. Reported per run: total output tokens / wall time, and the p50 / p99 over
requests of the time per output token after the first (TPOT). Ratios are within one level of one run.

*Steady* tokens/s counts only the window in which every client was busy (from the start until the first
client found the queue empty), then divides by that window: the whole-run figure also holds the drain at the
end, which favours batched plain decoding here (every request runs to the same ``max_new_tokens`` one token a
step, so a level's requests finish together, while speculative requests finish at different times and the
last ones run in a smaller batch). Both are reported; neither replaces the other.
"""
from __future__ import annotations

import json
import queue
import threading
import time
from pathlib import Path

import numpy as np

from aded_ray.data import load_prompts

SYSTEMS = ("one at a time", "batched plain", "batched speculative")
COMPILED = ("compiled plain", "compiled speculative")    # --compiled: a second engine, passes compiled per bucket


def baseline_systems(mode: str) -> tuple[str, str]:
    """The two systems of ``--baseline-mode``: a second engine in another verify mode."""
    return f"batched plain [{mode}]", f"batched speculative [{mode}]"


def _requests(n: int) -> list[list[dict]]:
    """``n`` chat requests, MT-Bench and HumanEval prompts alternating."""
    sets = [load_prompts("mtbench"), load_prompts("humaneval")]
    return [sets[i % 2][(i // 2) % len(sets[i % 2])]["messages"] for i in range(n)]


def _reset(engine) -> None:
    d = engine.drafter
    if hasattr(d, "reset"):
        d.reset()
    if engine.speculate:
        engine.matrix.reset_deltas()


def run_level(engine, system: str, messages: list, concurrency: int, max_new_tokens: int) -> dict:
    sched = engine.scheduler
    sched.max_batch = 1 if system == "one at a time" else max(concurrency, 1)
    speculate = "speculative" in system or system == "one at a time"
    _reset(engine)
    work: queue.SimpleQueue = queue.SimpleQueue()
    for i, m in enumerate(messages):
        work.put((i, m))
    results, errors, idle = {}, [], []

    def client():
        while True:
            try:
                i, m = work.get_nowait()
            except queue.Empty:
                idle.append(time.perf_counter())        # the queue ran dry: from here the batch shrinks
                return
            try:
                times, counts, out = [], [], []
                for c in engine.generate(m, max_new_tokens=max_new_tokens, speculate=speculate):
                    times.append(time.perf_counter())
                    counts.append(len(c.token_ids))
                    out += c.token_ids
                    stats = c.stats
                results[i] = dict(tokens=sum(counts), first=times[0], end=times[-1], ids=out, steps=stats.steps,
                                  drafted=stats.draft_tokens, accepted=stats.accepted_tokens,
                                  chunks=list(zip(times, counts)))
            except Exception as e:  # noqa: BLE001 - reported, never hidden
                errors.append(repr(e))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    wall = time.perf_counter() - t0
    busy = min(idle) if idle else t0 + wall    # every client busy until the first one found no more work
    steady = sum(n for r in results.values() for t, n in r["chunks"] if t <= busy)
    tpot = [1000 * (r["end"] - r["first"]) / (r["tokens"] - 1) for r in results.values() if r["tokens"] > 1]
    return {"system": system, "concurrency": concurrency, "errors": errors, "seconds": wall, "tpot": tpot,
            "steady_tokens": steady, "steady_seconds": busy - t0,
            "tokens": sum(r["tokens"] for r in results.values()), "steps": sum(r["steps"] for r in results.values()),
            "drafted": sum(r["drafted"] for r in results.values()),
            "outputs": {i: r["ids"] for i, r in results.items()}}


def _merge(parts: list[dict], offset: int) -> dict:
    """One row from the rounds of a system: tokens and seconds summed, TPOT percentiles over all requests."""
    tokens, wall = sum(p["tokens"] for p in parts), sum(p["seconds"] for p in parts)
    tpot = [t for p in parts for t in p["tpot"]]
    steps = sum(p["steps"] for p in parts)
    outputs = {i + k * offset: ids for k, p in enumerate(parts) for i, ids in p["outputs"].items()}
    return {"system": parts[0]["system"], "concurrency": parts[0]["concurrency"],
            "requests": len(outputs), "errors": [e for p in parts for e in p["errors"]],
            "tokens": tokens, "seconds": round(wall, 3), "tok_per_s": round(tokens / wall, 2),
            "steady_tok_per_s": round(sum(p["steady_tokens"] for p in parts) /
                                      max(sum(p["steady_seconds"] for p in parts), 1e-9), 2),
            "tpot_ms_p50": round(float(np.percentile(tpot, 50)), 2) if tpot else None,
            "tpot_ms_p99": round(float(np.percentile(tpot, 99)), 2) if tpot else None,
            "mat": round(tokens / max(steps, 1), 3),
            "draft_nodes_per_step": round(sum(p["drafted"] for p in parts) / max(steps, 1), 2),
            "outputs": outputs}


def run_bench_load(*, levels=(1, 2, 4, 8, 16, 32), max_new_tokens: int = 64, min_requests: int = 8,
                   store: str | None = None, mode: str = "auto", device: str = "auto",
                   out_dir: str | Path = "results", compiled: bool = False, baseline_mode: str | None = None,
                   tp_size: int = 1) -> dict:
    """``compiled``: also run a second engine whose batched passes are compiled per token bucket
    (``verify.compile``, the default mode), plain and speculative, interleaved with the others; ``baseline_mode``:
    the second engine runs that verify mode instead. It lives in a process of its own
    (:func:`_second_engine`), which runs its systems' levels when asked. ``tp_size`` > 1: the engine verifies
    through a DeepSpeed tensor-parallel group of that many rank actors (a local Ray is started), and "one at a
    time" is what such a replica did before it batched."""
    if compiled and baseline_mode:
        raise ValueError("bench-load runs one second engine: --compiled or --baseline-mode, not both")
    if tp_size > 1 and (compiled or baseline_mode):
        raise ValueError("bench-load with --tp-size runs one engine: no --compiled or --baseline-mode")
    from aded_ray.config import EngineConfig, VerifyConfig
    from aded_ray.engine import Engine

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tp_size > 1:
        import ray

        if not ray.is_initialized():
            ray.init(num_cpus=max(4, 2 * tp_size), include_dashboard=False, log_to_driver=False)
    engine = Engine(EngineConfig(store=store, verify=VerifyConfig(mode=mode, device=device, tp_size=tp_size),
                                 max_batch=max(levels), max_waiting=4096))
    for p in load_prompts("grounded"):              # warm-up: kernels, cost curve, the budget's estimates
        list(engine.generate(p["messages"], max_new_tokens=max_new_tokens))
    res = {"device": engine.device, "mode": engine.mode, "speculation": engine.speculate,
           "max_new_tokens": max_new_tokens, "rss_mb": _rss_mb(), "levels": []}
    systems, worker = SYSTEMS, None
    second = ()
    if compiled or baseline_mode:
        verify = dict(compile=True) if compiled else dict(mode=baseline_mode)
        worker = _SecondEngine(verify, store, device, max(levels), max_new_tokens)
        res["compiled" if compiled else "baseline"] = worker.info
        second = COMPILED if compiled else baseline_systems(baseline_mode)
        systems = SYSTEMS + second

    def run(system, msgs, c):
        if system in second:
            return worker.run_level(system, msgs, c)
        return run_level(engine, system, msgs, c, max_new_tokens)

    for c in levels:
        msgs = _requests(max(4 * c, min_requests))
        halves = [msgs[: len(msgs) // 2], msgs[len(msgs) // 2:]]
        # two rounds, the systems interleaved in each, so a burst of load on the machine hits all of them alike
        parts = {s: [] for s in systems}
        for h in halves:
            for s in systems:
                parts[s].append(run(s, h, c))
        rows = [_merge(parts[s], len(halves[0])) for s in systems]
        same = sum(len({str(r["outputs"].get(i)) for r in rows}) == 1 for i in range(len(msgs)))
        for r in rows:
            r.pop("outputs")
        level = {"concurrency": c, "requests": len(msgs), "identical_outputs": f"{same}/{len(msgs)}",
                 "rows": rows}
        res["levels"].append(level)
        print(markdown_level(level), flush=True)
    engine.shutdown()
    if worker is not None:
        worker.close()
    (out_dir / "bench-load.json").write_text(json.dumps(res, indent=1))
    (out_dir / "bench-load.md").write_text(markdown(res))
    plot(res, out_dir / "bench-load.png")
    return res


def _rss_mb() -> int:
    """This process's resident memory (Linux; 0 elsewhere)."""
    try:
        return int(int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20)
    except OSError:
        return 0


def _second_engine(conn, verify: dict, store, device: str, max_batch: int, max_new_tokens: int) -> None:
    """The second engine (``--compiled``, ``--baseline-mode``), in a process of its own: two engines in one
    process slow each other's passes by ~45% even when one is idle (each scheduler thread keeps an OpenMP pool; past the core
    count libgomp stops spinning between parallel regions; measured on the 2-core Xeon: 44 -> 64 ms per plain
    step with a second, idle engine in the process)."""
    from aded_ray.config import EngineConfig, VerifyConfig
    from aded_ray.engine import Engine

    t0 = time.perf_counter()
    engine = Engine(EngineConfig(store=store, verify=VerifyConfig(device=device, **verify),
                                 max_batch=max_batch, max_waiting=4096))
    info = {"mode": engine.mode, "buckets": list(engine.scheduler.kv.compile_tokens),
            "engine_start_s": round(time.perf_counter() - t0, 1), "rss_mb": _rss_mb()}
    for p in load_prompts("grounded"):
        list(engine.generate(p["messages"], max_new_tokens=max_new_tokens))
    conn.send(info)
    while (msg := conn.recv()) is not None:
        system, msgs, c = msg
        conn.send(run_level(engine, system, msgs, c, max_new_tokens))
    engine.shutdown()


class _SecondEngine:
    def __init__(self, verify: dict, store, device: str, max_batch: int, max_new_tokens: int):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_second_engine,
                                args=(child, verify, store, device, max_batch, max_new_tokens), daemon=True)
        self.proc.start()
        self.info = self.conn.recv()

    def run_level(self, system: str, msgs: list, c: int) -> dict:
        self.conn.send((system, msgs, c))
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join(120)


HEAD = ("| concurrency | system | tok/s | vs one at a time | vs batched plain | steady tok/s | steady vs plain | "
        "TPOT p50 ms | TPOT p99 ms | MAT | nodes/step | errors |\n|---|---|---|---|---|---|---|---|---|---|---|---|")


def markdown_level(level: dict) -> str:
    rows = {r["system"]: r for r in level["rows"]}
    one, plain = rows["one at a time"]["tok_per_s"], rows["batched plain"]["tok_per_s"]
    steady = rows["batched plain"].get("steady_tok_per_s")
    out = []
    for s in rows:
        r = rows[s]
        st = r.get("steady_tok_per_s")
        sv = f"{st / steady:.2f}x" if st and steady else "-"
        out.append(f"| {level['concurrency']} | {s} | {r['tok_per_s']:.1f} | {r['tok_per_s'] / one:.2f}x | "
                   f"{r['tok_per_s'] / plain:.2f}x | {st if st is not None else '-'} | {sv} | "
                   f"{r['tpot_ms_p50']} | {r['tpot_ms_p99']} | {r['mat']:.2f} | "
                   f"{r['draft_nodes_per_step']:.1f} | {len(r['errors'])} |")
    return "\n".join(out)


def markdown(res: dict) -> str:
    lines = [f"device `{res['device']}`, mode `{res['mode']}`, {res['max_new_tokens']} new tokens per request, "
             "greedy; identical outputs across all systems per level: " +
             ", ".join(f"c={lv['concurrency']}: {lv['identical_outputs']}" for lv in res["levels"]), "", HEAD]
    if "compiled" in res:
        c = res["compiled"]
        lines.insert(1, f"compiled rows: a second engine in its own process, mode `{c['mode']}`, batched passes compiled per token "
                        f"bucket {c['buckets']} (engine start with compiling: {c['engine_start_s']} s, RSS after it "
                        f"{c.get('rss_mb', '?')} MB)")
    if "baseline" in res:
        lines.insert(1, f"`[{res['baseline']['mode']}]` rows: a second engine in its own process, verify mode "
                        f"`{res['baseline']['mode']}`")
    lines += [markdown_level(lv) for lv in res["levels"]]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    cs = [lv["concurrency"] for lv in res["levels"]]
    for s in [r["system"] for r in res["levels"][0]["rows"]]:
        rows = [next(r for r in lv["rows"] if r["system"] == s) for lv in res["levels"]]
        a1.plot(cs, [r["tok_per_s"] for r in rows], "o-", label=s)
        a2.plot(cs, [r["tpot_ms_p50"] for r in rows], "o-", label=s)
    for a, yl in ((a1, "total tokens / s"), (a2, "time per output token, p50 (ms)")):
        a.set_xscale("log", base=2)
        a.set_xlabel("concurrent requests")
        a.set_ylabel(yl)
        a.legend(fontsize=8)
    a1.set_title(f"SmolLM2-135M, {res['device']} ({res['mode']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
