"""``aded``: build-store, record-traces, bench-draft, generate (thin glue over the library)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from aded_ray.data import PROMPT_SETS
from aded_ray.paths import cache_dir, default_store


def _build_store(a) -> int:
    from aded_ray.build_store import build_store

    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    rep = build_store(corpus=a.corpus, out=a.out, model=a.model, top_k=a.top_k, limit=a.limit,
                      authors_out=a.authors_out, distilled=a.distilled, distilled_weight=a.distilled_weight,
                      progress=not a.quiet)
    print(json.dumps(rep) if a.json else "\n".join(f"{k:>20}: {v}" for k, v in rep.items()))
    return 0


def _record_traces(a) -> int:
    from aded_ray.bench.traces import record_traces

    out = a.out or cache_dir() / "traces" / f"{a.prompts}.jsonl"
    record_traces(prompts=a.prompts, out=out, model=a.model, limit=a.limit, max_new_tokens=a.max_new_tokens,
                  batch_size=a.batch_size, dtype=a.dtype, spread=a.spread)
    return 0


def _bench_draft(a) -> int:
    from tqdm import tqdm

    from aded_ray.bench.replay import TABLE_HEAD, authors_replay, replay, result_row
    from aded_ray.bench.traces import load_traces
    from aded_ray.draft.best import BestDrafter
    from aded_ray.draft.lookup import PromptLookupDrafter
    from aded_ray.draft.matrix import TrigramMatrix
    from aded_ray.draft.mcts import MCTSDrafter

    traces = []
    for f in a.traces:
        traces += load_traces(f)[: a.limit]
    store = Path(a.store)
    authors = Path(a.authors_index) if a.authors_index else store.with_suffix(".authors.idx")
    if not a.no_authors and not authors.is_file():
        print(f"authors' index {authors} not found: build it with `aded build-store ... --authors-out "
              f"{authors}`, or pass --no-authors", file=sys.stderr)
        return 2
    matrix = TrigramMatrix.load(store)

    class Budgeted:
        """A drafter held to a fixed node budget."""

        def __init__(self, drafter, budget):
            self.drafter, self.budget = drafter, budget

        def observe(self, seq):
            self.drafter.observe(seq)

        def draft(self, seq):
            return self.drafter.draft(seq, self.budget)

    def warm(d):
        inner = getattr(d, "drafter", d)
        if hasattr(inner, "warm_up"):
            inner.warm_up()      # every per-step kernel, outside the timed region
            return d
        d.observe([0, 1, 0, 1])  # compile the numba kernels outside the timed region
        d.draft([0, 1, 0, 1])
        matrix.reset_deltas()
        getattr(getattr(d, "drafter", d), "reset", lambda: None)()
        return d

    drafters = [("aded_ray parity (ADED MCTS, budget 64)", lambda: warm(MCTSDrafter(matrix, seed=a.seed)))]
    if not a.no_authors:
        drafters.append(("authors' draftretriever (budget 64)", None))     # replayed in a child process
    drafters.append(("prompt lookup (3..1-gram, 10 tokens)", PromptLookupDrafter))
    for b in a.budgets:
        drafters.append((f"aded_ray best (<= {b} nodes)", lambda b=b: warm(Budgeted(BestDrafter(matrix), b))))
    results = []
    for name, make in drafters:
        if make is None:
            results.append(authors_replay(traces, authors, 64, name, sweep_mb=a.sweep_mb))
            continue
        d = make()
        with tqdm(total=len(traces), desc=name, unit="trace", disable=a.json or a.quiet, file=sys.stderr) as bar:
            results.append(replay(traces, d, name, progress=bar, sweep_mb=a.sweep_mb).summary())
    if a.model_loop:
        from aded_ray.bench.model_replay import model_replay
        from aded_ray.verify.loading import load_tokenizer
        from aded_ray.verify.modes import load_for_mode, preferred_cpu_mode

        if a.model_loop_mode == "auto":
            a.model_loop_mode = preferred_cpu_mode()
        model = load_for_mode(None, a.model_loop_mode)
        eos = [load_tokenizer(None).eos_token_id]
        for b in a.budgets:
            name = f"aded_ray best (<= {b} nodes), model verifies ({a.model_loop_mode})"
            d = warm(BestDrafter(matrix))
            with tqdm(total=len(traces), desc=name, unit="trace", disable=a.json or a.quiet, file=sys.stderr) as bar:
                res, same = model_replay(traces, d, model, b, name, eos_ids=eos, progress=bar)
            results.append({**res.summary(), "identical_to_traces": same})
    if a.json:
        main = dict(results[0])
        main["drafters"] = results
        main["traces_files"] = [str(f) for f in a.traces]
        print(json.dumps(main))
    else:
        print(f"{len(traces)} traces from {', '.join(map(str, a.traces))}; store {store}")
        print(TABLE_HEAD)
        for r in results:
            print(result_row(r))
    return 0


def _bench_generalize(a) -> int:
    """Leave-one-set-out: every set scored with the drafter fitted on the other sets (one JSON per set)."""
    from tqdm import tqdm

    from aded_ray.bench import generalize as G
    from aded_ray.bench.traces import load_traces
    from aded_ray.draft.matrix import TrigramMatrix

    folder = Path(a.traces_dir)
    out = Path(a.out_dir)
    if a.table:
        print(G.table(G.load_results(out, a.sets)))
        return 0
    sets = {}
    for name in a.sets:
        f = folder / f"{name}.jsonl"
        if not f.is_file():
            print(f"{f} missing: `aded record-traces --prompts {name} --out {f}`", file=sys.stderr)
            return 2
        sets[name] = load_traces(f)                 # all of them for fitting; --limit of the scored set
    store = Path(a.store)
    authors = store.with_suffix(".authors.idx")
    matrix = TrigramMatrix.load(store)
    from aded_ray.verify.loading import load_tokenizer
    from aded_ray.verify.modes import load_for_mode, preferred_cpu_mode

    if a.mode == "auto":
        a.mode = preferred_cpu_mode()
    model = load_for_mode(None, a.mode)
    eos = [load_tokenizer(None).eos_token_id]
    out.mkdir(parents=True, exist_ok=True)
    for name in a.only or a.sets:
        with tqdm(total=len(sets[name][: a.limit]) * len(a.budgets), desc=name, unit="trace", file=sys.stderr,
                  disable=a.quiet) as bar:
            r = G.evaluate_set(name, sets, matrix, model, budgets=a.budgets, limit=a.limit,
                               authors=authors if authors.is_file() else None, eos_ids=eos, progress=bar)
        r.update(store=str(store), mode=a.mode, limit=a.limit)
        (out / f"{name}.json").write_text(json.dumps(r, indent=1))
        print(G.table([r]), flush=True)
    return 0


def _engine_config(a):
    from aded_ray.config import DraftConfig, EngineConfig, VerifyConfig

    return EngineConfig(store=a.store, draft=DraftConfig(max_nodes=a.max_nodes),
                        verify=VerifyConfig(model=a.model, mode=a.mode, budget=a.budget, device=a.device))


def _run(engine, prompt, a, speculate=True):
    import time

    t0 = time.perf_counter()
    chunks = list(engine.generate(prompt, chat=a.chat, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                                  seed=a.seed, speculate=speculate))
    dt = time.perf_counter() - t0
    stats = chunks[-1].stats
    return "".join(c.text for c in chunks), [t for c in chunks for t in c.token_ids], stats, dt


def _generate(a) -> int:
    from aded_ray.engine import Engine

    engine = Engine(_engine_config(a))
    list(engine.generate("Hello", max_new_tokens=8, speculate=False))
    text, ids, st, dt = _run(engine, a.prompt, a)
    print(text)
    n = len(ids)
    print(f"\n--- aded_ray ({engine.mode}, speculation {'on' if engine.speculate else 'off'}): {n} tokens in "
          f"{dt:.2f} s = {n / dt:.1f} tok/s; steps {st.steps}, MAT {st.mat:.2f}, drafted {st.draft_tokens}, "
          f"accepted {st.accepted_tokens} ({st.acceptance_rate:.1%}), draft {st.draft_s * 1e3:.0f} ms, "
          f"verify {st.verify_s * 1e3:.0f} ms, finish {st.finish_reason}")
    if a.compare:
        text2, ids2, st2, dt2 = _run(engine, a.prompt, a, speculate=False)
        n2 = len(ids2)
        print(f"--- plain decoding ({engine.mode}): {n2} tokens in {dt2:.2f} s = {n2 / dt2:.1f} tok/s")
        print(f"--- speed-up {(n / dt) / (n2 / dt2):.2f}x; outputs identical: {ids == ids2}")
        return 0 if ids == ids2 or a.temperature > 0 else 1
    return 0


def _cost(a) -> int:
    from aded_ray.config import VerifyConfig
    from aded_ray.verify.cost import measure_cost_curve
    from aded_ray.verify.exactness import check_exactness, check_shapes

    ks = tuple(a.ks)
    dev = VerifyConfig(device=a.device).resolved_device()
    widths = [] if a.widths == "none" else (
        VerifyConfig(device=a.device).resolved_widths() if a.widths == "auto" else [int(w) for w in a.widths.split(",")])
    print(f"device {dev}; model {a.shape or a.model}; fixed widths {widths or 'none'}; synced, median of {a.reps}")
    print("| mode | " + " | ".join(f"k={k}" for k in ks) + " | max row diff | argmax mismatches | exact? |")
    print("|---" * (len(ks) + 4) + "|")
    if a.tp_size > 1:
        import os

        import ray

        from aded_ray.tp.group import TPGroup

        os.environ.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
        ray.init(num_cpus=max(2, a.tp_size), include_dashboard=False, _node_ip_address="127.0.0.1",
                 log_to_driver=False)
        group = TPGroup(tp_size=a.tp_size, model=a.model)
        try:
            curve = measure_cost_curve(group.verifier, ks=ks, reps=a.reps).to_dict()
            rep = check_exactness(group.verifier, "fp32", check_shapes((), max(ks) - 1))
            print(f"| fp32, tp={a.tp_size} (gloo, 1 thread per rank) | " + " | ".join(f"{curve[k]:.1f}" for k in ks)
                  + f" | {rep.max_diff:.2g} | {rep.argmax_mismatches} | {'yes' if rep.exact else 'no'} |")
        finally:
            group.shutdown()
            ray.shutdown()
        return 0
    modes = a.modes or (["fp32", "fp32-packed", "fp32-mkl", "bf16", "bf16-packed"] if dev == "cpu" else ["fp32", "bf16", "fp16"])
    for mode in modes:
        m, why = _load_for_cost(a, mode, dev)
        if m is None:
            print(f"| {mode} | skipped: {why} |", flush=True)
            continue
        from aded_ray.verify.target import TreeVerifier

        make = lambda: TreeVerifier(m, widths=widths)  # noqa: E731
        if widths and max(ks) > widths[-1]:
            print(f"| {mode} | skipped: k up to {max(ks)} exceeds the largest width {widths[-1]} |")
            continue
        curve = measure_cost_curve(make, ks=ks, reps=a.reps, cache_len=a.context).to_dict()
        rep = check_exactness(make, mode, check_shapes(widths, max(ks) - 1),
                              vocab=min(30000, m.config.vocab_size))
        print(f"| {mode} | " + " | ".join(f"{curve[k]:.2f}" for k in ks) +
              f" | {rep.max_diff:.2g} | {rep.argmax_mismatches} | {'yes' if rep.exact else 'no'} |", flush=True)
        del m
    return 0


def _load_for_cost(a, mode: str, device: str):
    """The model for one row of ``aded cost`` (or None and why, when this machine cannot run the mode)."""
    from aded_ray.verify.modes import _DTYPES, MklPackedLinear, load_for_mode, mkl_available, pack_linears, \
        probe_packed

    try:
        if not a.shape:
            return load_for_mode(a.model, mode, device), None
        from aded_ray.verify.loading import random_model

        if mode.endswith("-packed") or mode == "fp32-mkl":
            if device != "cpu":
                return None, f"mode {mode} is CPU-only"
            if mode == "fp32-mkl" and not mkl_available():
                return None, "this torch build has no MKL"
            if mode != "fp32-mkl":
                probe_packed(_DTYPES[mode.split("-")[0]])
        if device == "cuda" and mode == "fp32":
            import torch

            torch.backends.cuda.matmul.allow_tf32 = False
        m = random_model(a.shape, dtype=_DTYPES[mode.split("-")[0]], device=device)
        if mode == "fp32-mkl":
            return pack_linears(m, MklPackedLinear), None
        return (pack_linears(m) if mode.endswith("-packed") else m), None
    except (ValueError, RuntimeError) as e:
        return None, str(e).splitlines()[0][:200]


def _bench_store(a) -> int:
    from aded_ray.bench.fleet import HEAD, markdown, run_fleet
    from aded_ray.bench.traces import load_traces

    files = list(a.traces or [])
    if a.rounds is not None and "repeats" not in (a.workload or []):
        raise SystemExit(f"bench-store: --rounds {a.rounds} applies to --workload repeats only")
    from aded_ray.bench import rollouts

    rounds = {}                            # file -> rounds of its requests (the repeats workload)
    for w in a.workload or []:             # the recorded repeated-request workloads (recorded when missing)
        f = cache_dir() / "traces" / f"{w}.jsonl"
        if w == "repeats":
            rounds[str(f)] = a.rounds if a.rounds is not None else 4
        if w == "tasks" and f.is_file() and rollouts.stale_tasks(f):
            print(f"{f}: recorded with another number of functions than {rollouts.TASK_INPUTS}: recording again",
                  file=sys.stderr)
            f.unlink()
        if not f.is_file():
            rollouts.main([w])
        files.append(str(f))
    if not files:
        raise SystemExit("bench-store: give --traces FILE... and/or --workload rollouts tasks repeats")
    server = None
    url = a.redis_url
    if not url:
        from aded_ray.store.server import RedisServer

        server = RedisServer(cache_dir() / "bench-redis")
        url = server.url
    step_ms = None
    from aded_ray.verify.cost import machine_key

    for f in sorted((cache_dir() / "cost").glob(f"cost-{machine_key()}-*.json"), key=lambda f: f.stat().st_mtime):
        d = json.loads(f.read_text())           # the k=16 pass of one request, fp32-packed on the CPU
        if "fp32-packed-cpu" in d.get("key", f.name):
            ms = d.get("ms", {})
            ms = ms.get("1", {}) if isinstance(ms.get("1"), dict) else ms    # per batch size, or one curve
            step_ms = ms.get("16", step_ms)
    try:
        pace = a.pace_ms if a.pace_ms is not None else (step_ms or 0.0)
        step = a.pace_ms or step_ms
        print(f"fleet of {a.processes} processes, drafter {a.drafter}, steps paced to {pace:.1f} ms")
        print(HEAD)
        for f in files:
            traces = load_traces(f)[:a.limit] if a.limit else load_traces(f)
            if f in rounds:
                traces = rollouts.repeat_rounds(traces, rounds[f])
            r = run_fleet(traces, a.store, processes=a.processes,
                          drafter=a.drafter, url=url, pace_ms=pace, first=a.first, share_model=not a.no_share_model)
            print(markdown(Path(f).stem, a.drafter, r, step), flush=True)
            if a.json:
                print(json.dumps(r))
    finally:
        if server is not None:
            server.stop()
    return 0


def _serve(a) -> int:
    """``serve run`` the config, with a local Redis when ``ADED_REDIS_URL`` is unset.

    Ray starts with the proxy guard (``aded_ray.serve.proxy``) in its environment. The local Redis is private
    to this user: loopback only, protected mode, a generated password kept in an owner-only file (passed to
    the replicas as ``ADED_REDIS_PASSWORD``, never printed), owner-only data and config files, and every
    acknowledged write on disk (``appendfsync always``) so a crash loses no shared counts."""
    import os
    import signal
    import subprocess

    from aded_ray.serve.local import RAY_ENV

    env = dict(os.environ)
    for k, v in RAY_ENV.items():
        env.setdefault(k, v)
    server = None
    if not env.get("ADED_REDIS_URL") and not a.no_redis:
        from aded_ray.store.server import RedisServer, load_or_create_password

        pw_file = cache_dir() / "redis" / "password"
        password = load_or_create_password(pw_file)
        server = RedisServer(cache_dir() / "redis", password=password, appendonly=True, appendfsync="always")
        env["ADED_REDIS_URL"] = server.address
        env["ADED_REDIS_PASSWORD"] = password
        print(f"started redis-server for the shared tri-gram store: {server.address} (password in {pw_file})",
              flush=True)

    def default_sigint():  # a shell's `&` makes children ignore SIGINT: serve run must obey it
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    proc = subprocess.Popen([str(Path(sys.executable).with_name("serve")), "run", a.config], env=env,
                            preexec_fn=default_sigint)

    def sigterm(*_):
        raise KeyboardInterrupt  # stop like Ctrl-C: SIGINT to serve run, then the Redis we started

    signal.signal(signal.SIGTERM, sigterm)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        for sig, wait in ((signal.SIGINT, 30), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            proc.send_signal(sig)  # SIGINT: serve run shuts the application and its local Ray down
            try:
                return proc.wait(wait)
            except subprocess.TimeoutExpired:
                continue
        return 1
    finally:
        if server is not None:
            server.stop()


def _soak(a) -> int:
    from aded_ray.serve.soak import markdown, run

    r = run(url=a.url, duration_s=a.duration, concurrency=a.concurrency, bad_fraction=a.bad_fraction,
            replicas=a.replicas, warmup_s=a.warmup, max_tokens=a.max_tokens, out=a.out)
    print(markdown(r))
    if a.out:
        print(f"written: {a.out}")
    return 0 if r["ok"] else 1


def _bench_serve(a) -> int:
    from aded_ray.bench.http import run

    print(json.dumps(run(prompts=a.prompts, limit=a.limit, max_tokens=a.max_tokens, store=a.store)))
    return 0


def _k8s(a) -> int:
    from aded_ray.k8s import write

    print(f"written: {write(a.root)}")
    return 0


def _bench(a) -> int:
    from aded_ray.bench.e2e import markdown, run_bench

    budgets = [b if b == "auto" else int(b) for b in a.budgets]
    r = run_bench(sets=a.sets, limit=a.limit, max_new_tokens=a.max_new_tokens, store=a.store, mode=a.mode,
                  device=a.device, budgets=budgets, out_dir=a.out_dir)
    print(markdown(r))
    print(f"written: {a.out_dir}/bench.md, bench.json, bench.png")
    return 0


def _bench_attention(a) -> int:
    from aded_ray.bench.attention import markdown, run_bench_attention

    r = run_bench_attention(sets=a.sets, limit=a.limit, concurrency=a.concurrency, max_new_tokens=a.max_new_tokens,
                            temperature=a.temperature, store=a.store, mode=a.mode, out_dir=a.out_dir)
    print(markdown(r))
    print(f"written: {a.out_dir}/bench-attention.md, bench-attention.json")
    return 0


def _bench_load(a) -> int:
    from aded_ray.bench.load import HEAD, markdown, run_bench_load

    print(HEAD, flush=True)
    r = run_bench_load(levels=a.levels, max_new_tokens=a.max_new_tokens, min_requests=a.min_requests,
                       store=a.store, mode=a.mode, device=a.device, out_dir=a.out_dir, compiled=a.compiled,
                       baseline_mode=a.baseline_mode, tp_size=a.tp_size)
    print(markdown(r))
    print(f"written: {a.out_dir}/bench-load.md, bench-load.json, bench-load.png")
    return 0


def _bench_compile(a) -> int:
    from aded_ray.bench.compiled import markdown, run_bench_compile

    device = a.device if a.device != "auto" else ("cuda" if __import__("torch").cuda.is_available() else "cpu")
    if a.batched:
        import json
        from pathlib import Path

        from aded_ray.bench import compiled_batch

        print(compiled_batch.HEAD, flush=True)
        r = compiled_batch.run_batched_pass_costs(tokens=tuple(a.widths or (1, 8, 16, 64)), device=device)
        Path(a.out_dir).mkdir(parents=True, exist_ok=True)
        (Path(a.out_dir) / "bench-compile-batched.md").write_text(compiled_batch.markdown(r))
        (Path(a.out_dir) / "bench-compile-batched.json").write_text(json.dumps(r, indent=1))
        print(f"compiling the buckets: {r['compile_s']} s; written: {a.out_dir}/bench-compile-batched.md, .json")
        return 0
    r = run_bench_compile(limit=a.limit, max_new_tokens=a.max_new_tokens, store=a.store, device=device,
                          widths=a.widths, max_len=a.max_len, compile_mode=a.compile_mode, out_dir=a.out_dir)
    print(markdown(r))
    print(f"written: {a.out_dir}/bench-compile.md, bench-compile.json")
    return 0


def _gpu_check(a) -> int:
    from aded_ray.bench.gpu_check import run

    print(run(device=a.device, quick=a.quick, out=Path(a.out), limit=a.limit, max_new_tokens=a.max_new_tokens,
              compiled=a.compiled))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="aded", description="ADED speculative decoding: stores, drafts, benchmarks")
    sub = p.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("build-store", help="build a tri-gram store from a corpus")
    b.add_argument("--corpus", required=True, help="sharegpt | stdlib | PATH (.jsonl, folder or text file)")
    b.add_argument("--model", default=None, help="'smollm2' (bundled, default) or a local HF model folder")
    b.add_argument("--out", default=str(default_store()))
    b.add_argument("--top-k", type=int, default=12, help="successors kept per context")
    b.add_argument("--limit", type=int, default=None, help="only the first N documents")
    b.add_argument("--authors-out", default=None, help="also write the authors' draftretriever index here")
    b.add_argument("--distilled", default=None, help="also count the model's own outputs (a trace file from `aded record-traces`)")
    b.add_argument("--distilled-weight", type=int, default=8, help="times each distilled output is counted")
    b.add_argument("--json", action="store_true")
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(fn=_build_store)

    r = sub.add_parser("record-traces", help="record greedy continuations of the model for a prompt set")
    r.add_argument("--prompts", required=True, choices=PROMPT_SETS)
    r.add_argument("--model", default=None)
    r.add_argument("--out", default=None, help="default: $ADED_CACHE_DIR/traces/<prompts>.jsonl")
    r.add_argument("--limit", type=int, default=None)
    r.add_argument("--max-new-tokens", type=int, default=256)
    r.add_argument("--batch-size", type=int, default=16)
    r.add_argument("--dtype", default="float32", help="float32 (traces) or bfloat16 (a faster dev set)")
    r.add_argument("--spread", action="store_true", help="--limit prompts taken evenly over the set, not its first ones")
    r.set_defaults(fn=_record_traces)

    d = sub.add_parser("bench-draft", help="replay traces through the drafters, side by side")
    d.add_argument("--traces", required=True, nargs="+", help="trace .jsonl files")
    d.add_argument("--store", default=str(default_store()))
    d.add_argument("--authors-index", default=None, help="default: <store>.authors.idx")
    d.add_argument("--no-authors", action="store_true", help="skip the authors' drafter")
    d.add_argument("--limit", type=int, default=None, help="traces per file")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--model-loop", action="store_true",
                   help="also run the best drafter with the model verifying its trees (recycled logits; slow)")
    d.add_argument("--model-loop-mode", default="auto",
                   help="exact verify mode for --model-loop (auto: the service's CPU default on this machine)")
    d.add_argument("--budgets", type=int, nargs="*", default=[30, 16, 8], help="node budgets for the best mode")
    d.add_argument("--sweep-mb", type=float, default=0.0,
                   help="read this many MB of other memory before every replayed step (untimed): the caches as a "
                        "forward pass leaves them (SmolLM2 fp32: 540), so drafting times are the model loop's")
    d.add_argument("--json", action="store_true", help="one JSON object (keys mat, nodes_per_step, draft_us_p50, ...)")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(fn=_bench_draft)

    gz = sub.add_parser("bench-generalize", help="leave-one-set-out: the best drafter on dev sets of other kinds")
    gz.add_argument("--sets", nargs="+", default=["mtbench", "humaneval", "multiturn", "summarize", "codeedit",
                                                  "writetests"], help="dev sets (<traces-dir>/<set>.jsonl each)")
    gz.add_argument("--only", nargs="*", default=None, help="score only these sets (fitting still uses the others)")
    gz.add_argument("--traces-dir", default=str(cache_dir() / "traces" / "dev"))
    gz.add_argument("--out-dir", default="results/generalize")
    gz.add_argument("--store", default=str(default_store()))
    gz.add_argument("--limit", type=int, default=None, help="traces scored per set (fitting uses all)")
    gz.add_argument("--budgets", type=int, nargs="+", default=[30, 16, 8])
    gz.add_argument("--mode", default="auto", help="exact verify mode (auto: the service's CPU default on this machine)")
    gz.add_argument("--table", action="store_true", help="print the table of the results in --out-dir and exit")
    gz.add_argument("--quiet", action="store_true")
    gz.set_defaults(fn=_bench_generalize)

    g = sub.add_parser("generate", help="generate text with speculative decoding")
    g.add_argument("prompt")
    g.add_argument("--chat", action="store_true", help="apply the model's chat template")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--store", default=None, help="tri-gram store (default: the ShareGPT store if built)")
    g.add_argument("--model", default="smollm2")
    g.add_argument("--mode", default="auto", help="auto | fp32 | fp32-packed | fp32-mkl | bf16 | bf16-packed | fp16")
    g.add_argument("--budget", default="auto", help="draft nodes per step: auto (cost model) or a number")
    g.add_argument("--max-nodes", type=int, default=64)
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    g.add_argument("--compare", action="store_true", help="also decode without speculation and compare")
    g.set_defaults(fn=_generate)

    c = sub.add_parser("cost", help="measure ms per forward of k tokens and exactness, for each verify mode")
    c.add_argument("--modes", nargs="+", default=None,
                   help="default: fp32 fp32-packed fp32-mkl bf16 bf16-packed on CPU, fp32 bf16 fp16 on CUDA")
    c.add_argument("--model", default="smollm2")
    c.add_argument("--shape", default=None, help="a random-weight model of this shape instead (llama3-8b, tiny)")
    c.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    c.add_argument("--widths", default="none", help="fixed pass widths: none, auto, or e.g. 64 or 16,64")
    c.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    c.add_argument("--context", type=int, default=128, help="prefix length of the timed passes")
    c.add_argument("--reps", type=int, default=7)
    c.add_argument("--tp-size", type=int, default=1, help="> 1: measure through a DeepSpeed tensor-parallel group")
    c.set_defaults(fn=_cost)

    f = sub.add_parser("bench-store", help="trace replay by a fleet: shared Redis store vs isolated vs single")
    f.add_argument("--traces", nargs="+", help="trace files (aded record-traces, or python -m aded_ray.bench.rollouts)")
    f.add_argument("--workload", nargs="+", choices=("rollouts", "tasks", "repeats"),
                   help="repeated-request workloads from the cache (recorded first when missing)")
    f.add_argument("--limit", type=int, default=None, help="the first N traces of each file")
    f.add_argument("--rounds", type=int, default=None, help="--workload repeats: rounds of the same requests (4)")
    f.add_argument("--first", type=int, default=10, help="late replica: compared on its first N requests")
    f.add_argument("--no-share-model", action="store_true", help="share no recycled predictions nor combiner")
    f.add_argument("--store", default=str(default_store()))
    f.add_argument("--processes", type=int, default=4)
    f.add_argument("--drafter", choices=("aded", "best"), default="aded")
    f.add_argument("--redis-url", default=None, help="default: start a local redis-server")
    f.add_argument("--pace-ms", type=float, default=None,
                   help="minimum replay step time in fleet processes (default: the measured k=16 verify cost)")
    f.add_argument("--json", action="store_true")
    f.set_defaults(fn=_bench_store)

    sv = sub.add_parser("serve", help="serve run a Serve config, starting a local Redis if ADED_REDIS_URL is unset")
    sv.add_argument("config", nargs="?", default="deployments/aded.yaml")
    sv.add_argument("--no-redis", action="store_true", help="no local Redis (no shared store)")
    sv.set_defaults(fn=_serve)

    bs = sub.add_parser("bench-serve", help="single-stream tokens/s over HTTP vs the in-process engine")
    bs.add_argument("--prompts", default="mtbench", choices=("mtbench", "humaneval", "grounded"))
    bs.add_argument("--limit", type=int, default=5)
    bs.add_argument("--max-tokens", type=int, default=128)
    bs.add_argument("--store", default=None)
    bs.set_defaults(fn=_bench_serve)

    k = sub.add_parser("k8s", help="render k8s/ray-service.aded.yaml from deployments/aded.yaml")
    k.add_argument("--root", default=".")
    k.set_defaults(fn=_k8s)

    e = sub.add_parser("bench", help="end-to-end decoding speed against plain decoding and prompt lookup")
    e.add_argument("--sets", nargs="+", default=["mtbench", "humaneval", "grounded"])
    e.add_argument("--limit", type=int, default=10, help="prompts per set")
    e.add_argument("--max-new-tokens", type=int, default=128)
    e.add_argument("--store", default=None)
    e.add_argument("--mode", default="auto", help="verify mode (auto: fp32-mkl on CPU, fp32 on CUDA)")
    e.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    e.add_argument("--budgets", nargs="+", default=["auto"],
                   help="aded_ray rows: 'auto' (cost model) and/or fixed node budgets, e.g. auto 8 16 64")
    e.add_argument("--out-dir", default="results")
    e.set_defaults(fn=_bench)

    ba = sub.add_parser("bench-attention", help="the row-invariant attention against SDPA: speed and outputs "
                                                "equal to plain decoding, greedy and sampled, under batching")
    ba.add_argument("--sets", nargs="+", default=["mtbench", "humaneval"])
    ba.add_argument("--limit", type=int, default=8, help="prompts per set")
    ba.add_argument("--concurrency", type=int, default=4, help="requests submitted at once")
    ba.add_argument("--max-new-tokens", type=int, default=96)
    ba.add_argument("--temperature", type=float, default=0.8)
    ba.add_argument("--store", default=None)
    ba.add_argument("--mode", default="auto")
    ba.add_argument("--out-dir", default="results")
    ba.set_defaults(fn=_bench_attention)

    bl = sub.add_parser("bench-load", help="tokens/s and time per output token at rising concurrency")
    bl.add_argument("--levels", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    bl.add_argument("--max-new-tokens", type=int, default=64)
    bl.add_argument("--min-requests", type=int, default=8, help="requests per level: max(4 x level, this)")
    bl.add_argument("--store", default=None)
    bl.add_argument("--mode", default="auto")
    bl.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    bl.add_argument("--out-dir", default="results")
    bl.add_argument("--compiled", action="store_true",
                    help="also a second engine with batched passes compiled per token bucket (verify.compile)")
    bl.add_argument("--baseline-mode", default=None,
                    help="also a second engine in this verify mode (plain and speculative), e.g. fp32-packed")
    bl.add_argument("--tp-size", type=int, default=1,
                    help="> 1: the engine verifies through a DeepSpeed tensor-parallel group (mode fp32/bf16/fp16)")
    bl.set_defaults(fn=_bench_load)

    bc = sub.add_parser("bench-compile", help="compiled static-KV passes against fp32-packed: pass costs and "
                                              "end-to-end tokens/s, plain and speculative")
    bc.add_argument("--limit", type=int, default=3, help="MT-Bench and HumanEval prompts each")
    bc.add_argument("--max-new-tokens", type=int, default=96)
    bc.add_argument("--widths", type=int, nargs="+", default=None,
                    help="pass widths (default: the engine's for compiled passes on the device)")
    bc.add_argument("--max-len", type=int, default=2048, help="static KV cache positions")
    bc.add_argument("--compile-mode", default=None, help="torch.compile mode (reduce-overhead: CUDA graphs)")
    bc.add_argument("--store", default=None)
    bc.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    bc.add_argument("--out-dir", default="results")
    bc.add_argument("--batched", action="store_true",
                    help="instead: ms per batched ragged pass (tokens = --widths, default 1 8 16 64; 1 and 4 "
                         "requests), fp32-packed eager against the pass compiled per token bucket")
    bc.set_defaults(fn=_bench_compile)

    gc = sub.add_parser("gpu-check", help="exactness, cost curves and end-to-end speed on this device (make gpu-check)")
    gc.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    gc.add_argument("--quick", action=argparse.BooleanOptionalAction, default=None,
                    help="small sizes (default on CPU)")
    gc.add_argument("--limit", type=int, default=12, help="prompts per set (MT-Bench, HumanEval)")
    gc.add_argument("--max-new-tokens", type=int, default=96)
    gc.add_argument("--compiled", action=argparse.BooleanOptionalAction, default=True,
                    help="the compiled static-KV sections (compiling takes minutes on a GPU)")
    gc.add_argument("--out", default="results/gpu-check")
    gc.set_defaults(fn=_gpu_check)

    so = sub.add_parser("soak", help="hostile-mix load on the HTTP service: 5xx, hangs, replica RSS growth")
    so.add_argument("--url", default=None, help="a running service (default: start one here, like make serve)")
    so.add_argument("--duration", type=float, default=600.0, help="seconds of load (default 600)")
    so.add_argument("--concurrency", type=int, default=16)
    so.add_argument("--bad-fraction", type=float, default=0.1, help="share of bad or hostile requests")
    so.add_argument("--replicas", type=int, default=1, help="replicas of the service started here")
    so.add_argument("--warmup", type=float, default=None, help="seconds before the RSS baseline (default 20%%)")
    so.add_argument("--max-tokens", type=int, default=32, help="max_tokens of the good requests")
    so.add_argument("--out", default="results/soak.json")
    so.set_defaults(fn=_soak)

    a = p.parse_args(argv)
    if getattr(a, "budget", "auto") != "auto":
        a.budget = int(a.budget)
    try:
        return a.fn(a)
    except ValueError as e:
        print(f"aded {a.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
