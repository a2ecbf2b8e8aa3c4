"""``aded bench-compile --batched``: ms per batched ragged pass, ``fp32-packed`` eager (oneDNN-packed linears) and
``fp32-mkl`` eager (MKL-packed linears, the CPU default) against the pass compiled per token bucket
(:mod:`aded_ray.verify.compiled_batch`) over ``fp32-mkl``'s packed weights (what ``verify.compile`` runs on
CPUs) and over plain fp32 weights (inductor packs them itself, a copy per bucket), side by side in one
process.

For each pass size T (tokens in the pass) and each batch size B dividing it: B requests with 256-token
prefixes of different lengths (256 + 9 r), each verifying a chain of T / B - 1 draft nodes; the two systems
interleaved, median over ``reps`` rounds; the compiled system's buckets are exactly the sizes measured. Also
reported: the largest difference between the compiled and ``fp32-packed`` logits and whether every row's argmax
agrees. On GPUs only ``fp32`` eager and compiled run (the packed modes are CPU-only).
"""
from __future__ import annotations

import time

import numpy as np


def run_batched_pass_costs(*, tokens=(1, 8, 16, 64), batches=(1, 4), reps: int = 12, device: str = "cpu") -> dict:
    import torch

    from aded_ray.draft.tree import DraftTree
    from aded_ray.verify.batch import BatchKV
    from aded_ray.verify.modes import load_for_mode, mkl_available

    torch.manual_seed(0)

    models = {"fp32-packed": load_for_mode(None, "fp32-packed" if device == "cpu" else "fp32", device)}
    if device == "cpu" and mkl_available():
        models["fp32-mkl"] = load_for_mode(None, "fp32-mkl", device)
        models["compiled"] = load_for_mode(None, "fp32-mkl", device)        # what verify.compile runs on CPUs
        models["compiled (fp32 weights)"] = load_for_mode(None, "fp32", device)   # inductor packs, per bucket
    else:
        models["compiled"] = load_for_mode(None, "fp32", device)
    mode = "reduce-overhead" if device.startswith("cuda") else None
    rows, compile_s = [], 0.0
    for T in tokens:
        for B in batches:
            if T % B:
                continue
            setups = {}
            for name, m in models.items():
                kv = BatchKV(m, compile_tokens=tokens if name.startswith("compiled") else (), compile_mode=mode)
                rng = np.random.default_rng(T * 100 + B)
                for r in range(B):
                    kv.prefill(kv.add_slot(), rng.integers(100, 40000, 256 + 9 * r).tolist())
                n = T // B - 1
                trees = [DraftTree(rng.integers(100, 40000, n), np.arange(-1, n - 1)) for _ in range(B)]
                setups[name] = (kv, rng.integers(100, 40000, B).tolist(), trees, kv.lens.copy())

            def one(name):
                kv, roots, trees, lens = setups[name]
                kv.lens[:] = lens
                return kv.forward_trees(roots, trees)

            t0 = time.perf_counter()
            compiled = one("compiled")              # the first pass of a bucket compiles it
            if "compiled (fp32 weights)" in setups:
                one("compiled (fp32 weights)")
            compile_s += time.perf_counter() - t0
            eager = one("fp32-packed")
            times = {name: [] for name in setups}
            for _ in range(reps):
                for name in setups:
                    t = time.perf_counter()
                    one(name)
                    times[name].append(1000 * (time.perf_counter() - t))
            e, c = float(np.median(times["fp32-packed"])), float(np.median(times["compiled"]))
            mkl = float(np.median(times["fp32-mkl"])) if "fp32-mkl" in times else None
            c32 = float(np.median(times["compiled (fp32 weights)"])) if "compiled (fp32 weights)" in times else None
            rows.append({"tokens": T, "batch": B, "fp32_packed_ms": round(e, 1), "compiled_ms": round(c, 1),
                         "fp32_mkl_ms": None if mkl is None else round(mkl, 1),
                         "compiled_fp32_weights_ms": None if c32 is None else round(c32, 1),
                         "speedup": round(e / c, 2), "max_diff": float((eager - compiled).abs().max()),
                         "argmax_equal": bool(torch.equal(eager.argmax(-1), compiled.argmax(-1))),
                         "compiled_pass": setups["compiled"][0].compiled_passes > 0})
            print(markdown_row(rows[-1]), flush=True)
    return {"device": device, "rows": rows, "compile_s": round(compile_s, 1)}


HEAD = ("| tokens per pass | requests | `fp32-packed` ms | `fp32-mkl` ms | compiled ms | compiled (fp32 weights) ms | "
        "`fp32-mkl` vs `fp32-packed` | compiled vs `fp32-packed` | compiled vs `fp32-mkl` | max logit diff | "
        "argmax equal |\n|---|---|---|---|---|---|---|---|---|---|---|")


def markdown_row(r: dict) -> str:
    m, c32 = r.get("fp32_mkl_ms"), r.get("compiled_fp32_weights_ms")
    vs = (lambda a, b: f"{a / b:.2f}x" if a and b else "-")
    return (f"| {r['tokens']} | {r['batch']} | {r['fp32_packed_ms']} | {m or '-'} | {r['compiled_ms']} | {c32 or '-'} | "
            f"{vs(r['fp32_packed_ms'], m)} | {r['speedup']:.2f}x | {vs(m, r['compiled_ms'])} | "
            f"{r['max_diff']:.1e} | {r['argmax_equal']} |")


def markdown(res: dict) -> str:
    return "\n".join([HEAD] + [markdown_row(r) for r in res["rows"]] +
                     ["", f"compiling the buckets: {res['compile_s']} s"]) + "\n"
