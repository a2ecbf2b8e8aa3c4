"""``aded bench-compile``: the compiled static-KV pass against today's passes, side by side in one process.

Three single-request verifiers of the same model, each with its own drafter (over the same store) and its
own cost-model budget (its own measured pass costs):

- ``fp32-packed``: :class:`~aded_ray.verify.target.TreeVerifier`, weights pre-packed for oneDNN, a growable
  KV cache (the CPU default of the single-request path);
- ``static eager``: :class:`~aded_ray.verify.static.StaticTreeVerifier` (preallocated KV, passes padded to
  fixed ``widths``), eager fp32;
- ``static compiled``: the same, every width compiled by ``torch.compile`` (inductor on CPUs; CUDA graphs with
  ``--compile-mode reduce-overhead`` on a GPU), compiled at start-up (the time is reported).

Reported in one run: ms per pass of k = 1, 2, 4, 8, 16, 64 tokens (median over rounds that visit every k, after a
256-token prefix), and end-to-end tokens/s of plain decoding and of speculative decoding (``auto`` budget) on
MT-Bench and HumanEval prompts, greedy, the systems interleaved per prompt; whether every output equals the
``fp32-packed`` plain output.

All tensor work runs on the calling thread and no :class:`~aded_ray.engine.Engine` is built: an engine's
scheduler thread keeps its own OpenMP pool, and two pools on two cores slow every pass by ~50% (see
``Engine``).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

KS = (1, 2, 4, 8, 16, 64)
SYSTEMS = ("fp32-packed", "static eager", "static compiled")


def _verifiers(device: str, widths, max_len: int, compile_mode: str | None):
    from aded_ray.verify.modes import load_for_mode
    from aded_ray.verify.static import StaticTreeVerifier
    from aded_ray.verify.target import TreeVerifier

    packed = load_for_mode(None, "fp32-packed", device) if device == "cpu" else load_for_mode(None, "fp32", device)
    plain = load_for_mode(None, "fp32", device)
    t0 = time.perf_counter()
    compiled = StaticTreeVerifier(plain, widths=widths, max_len=max_len, compile=True, compile_mode=compile_mode,
                                  dynamic=None if device == "cpu" else False)
    compiled.warm_up()
    compile_s = time.perf_counter() - t0
    return {"fp32-packed": TreeVerifier(packed),
            "static eager": StaticTreeVerifier(plain, widths=widths, max_len=max_len),
            "static compiled": compiled}, compile_s


def run_bench_compile(*, limit: int = 3, max_new_tokens: int = 96, store: str | None = None, device: str = "cpu",
                      widths=None, max_len: int = 2048, compile_mode: str | None = None,
                      out_dir: str | Path = "results") -> dict:
    from aded_ray.bench.traces import chat_ids
    from aded_ray.config import DraftConfig, VerifyConfig
    from aded_ray.data import load_prompts
    from aded_ray.decode import FixedBudget, GenerationStats, NoDraft, generate_ids
    from aded_ray.draft.matrix import TrigramMatrix
    from aded_ray.engine import eos_token_ids, make_drafter
    from aded_ray.paths import default_store
    from aded_ray.verify.budget import AdaptiveBudget
    from aded_ray.verify.cost import PassCost, measure_cost_curve
    from aded_ray.verify.loading import load_tokenizer

    tok = load_tokenizer()
    widths = widths or VerifyConfig(compile=True, device=device).resolved_widths()   # the engine's for the device
    verifiers, compile_s = _verifiers(device, widths, max_len, compile_mode)
    eos = eos_token_ids(verifiers["static eager"].model, tok)
    path = Path(store) if store else default_store()
    if store and not path.is_file():
        raise ValueError(f"store {str(path)!r} does not exist; build it with `make store`")

    def matrix():            # no store built (a device machine): an empty matrix, as the engine does
        return TrigramMatrix.load(path) if path.is_file() else TrigramMatrix.empty(len(tok))
    costs, budgets, drafters = {}, {}, {}
    for name, v in verifiers.items():
        curve = measure_cost_curve(lambda v=v: v, ks=(1, 2, 4, 8, 16, 32, 64), cache_len=256, reps=5)
        costs[name] = curve.to_dict()
        budgets[name] = AdaptiveBudget(PassCost(curve, getattr(v, "widths", ()) if name != "fp32-packed" else ()),
                                       max_nodes=63)
        drafters[name] = make_drafter(DraftConfig(), matrix())
    prompts = load_prompts("mtbench")[:limit] + load_prompts("humaneval")[:limit]
    warm = chat_ids(tok, load_prompts("grounded")[0]["messages"])
    for name, v in verifiers.items():                  # numba kernels, allocator, the budgets' first estimates
        for d, b in ((NoDraft(), FixedBudget(0)), (drafters[name], budgets[name])):
            list(generate_ids(v, d, warm, max_new_tokens=32, eos_ids=eos, budget=b))
    runs = {(s, kind): {"tokens": 0, "seconds": 0.0, "steps": 0, "identical": 0, "draft_s": 0.0, "verify_s": 0.0}
            for s in SYSTEMS for kind in ("plain", "speculative")}
    for p in prompts:
        ids = chat_ids(tok, p["messages"])
        ref = None
        for kind in ("plain", "speculative"):
            for s in SYSTEMS:
                st = GenerationStats()
                budget = FixedBudget(0) if kind == "plain" else budgets[s]
                # plain runs keep away from the drafter: it would record the output it is then asked to draft
                drafter = NoDraft() if kind == "plain" else drafters[s]
                t0 = time.perf_counter()
                out = [t for c in generate_ids(verifiers[s], drafter, ids, max_new_tokens=max_new_tokens,
                                               eos_ids=eos, budget=budget, stats=st) for t in c]
                r = runs[(s, kind)]
                r["seconds"] += time.perf_counter() - t0
                r["tokens"] += len(out)
                r["steps"] += st.steps
                r["draft_s"] += st.draft_s
                r["verify_s"] += st.verify_s
                ref = out if ref is None else ref
                r["identical"] += out == ref
    base = runs[("fp32-packed", "plain")]["tokens"] / runs[("fp32-packed", "plain")]["seconds"]
    rows = []
    for (s, kind), r in runs.items():
        tps = r["tokens"] / r["seconds"]
        rows.append({"system": s, "decoding": kind, "tok_per_s": round(tps, 2),
                     "vs_packed_plain": round(tps / base, 3), "mat": round(r["tokens"] / max(r["steps"], 1), 3),
                     "identical": f"{r['identical']}/{len(prompts)}",
                     # host time drafting vs the pass (+ acceptance, compaction), per step: what drafting
                     # beside the pass could hide at most
                     "draft_ms_per_step": round(1e3 * r["draft_s"] / max(r["steps"], 1), 3),
                     "verify_ms_per_step": round(1e3 * r["verify_s"] / max(r["steps"], 1), 2)})
    res = {"device": device, "widths": list(widths), "store": str(path) if path.is_file() else "empty",
           "baseline": "fp32-packed" if device == "cpu" else "fp32 (eager)", "max_new_tokens": max_new_tokens,
           "prompts": len(prompts),
           "compile_s": round(compile_s, 1), "compile_mode": compile_mode, "pass_ms": costs, "rows": rows}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench-compile.json").write_text(json.dumps(res, indent=1))
    (out_dir / "bench-compile.md").write_text(markdown(res))
    return res


def markdown(res: dict) -> str:
    base = res.get("baseline", "fp32-packed")
    lines = [f"device `{res['device']}`, fixed widths {res['widths']}, compile mode `{res['compile_mode']}` "
             f"(compiling every width took {res['compile_s']} s), {res['prompts']} prompts x "
             f"{res['max_new_tokens']} new tokens, greedy; store {res.get('store', '?')}; the first row "
             f"(`fp32-packed`) is the dynamic-KV {base} verifier", "",
             "ms per pass of k tokens after a 256-token prefix (a static pass costs its padded width):", "",
             "| system | " + " | ".join(f"k={k}" for k in KS) + " |", "|---" * (len(KS) + 1) + "|"]
    for s, curve in res["pass_ms"].items():
        curve = {int(k): v for k, v in curve.items()}
        lines.append(f"| {s} | " + " | ".join(f"{curve[k]:.1f}" if k in curve else "–" for k in KS) + " |")
    lines += ["", "| system | decoding | tok/s | vs fp32-packed plain | tokens/step | drafting ms/step | "
                  "pass ms/step | output = fp32-packed plain |", "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['system']} | {r['decoding']} | {r['tok_per_s']} | {r['vs_packed_plain']:.2f}x | "
                     f"{r['mat']} | {r.get('draft_ms_per_step', '')} | {r.get('verify_ms_per_step', '')} | "
                     f"{r['identical']} |")
    return "\n".join(lines) + "\n"
