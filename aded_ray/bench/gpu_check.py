"""``aded gpu-check``: the device checks of one session, in one command, as one Markdown report.

Runs on whatever device there is (``--device auto``: CUDA when present); on a CPU it runs the same steps at
a smaller size (``--quick``), so the script is exercised by every session, lent a GPU or not.

1. Exactness per verify mode and pass widths: :func:`aded_ray.verify.exactness.check_exactness` on the
   shapes the loop uses (which modes may speculate here).
2. Synchronised cost curves: SmolLM2 (real weights) per mode, and an 8B-class Llama shape with random
   weights (GPU only), without and with fixed widths; then the static-KV verifier compiled per width
   (CUDA graphs: SmolLM2 fp32 and the 8B shape in bf16; on CPUs a tiny random Llama, to exercise the path).
3. End to end with the default configuration on this device: plain loop, ``model.generate``, transformers'
   prompt lookup, aded_ray with ``auto`` and fixed budgets; tokens/s, MAT, outputs identical to plain.
4. Under concurrent load (``aded bench-load``).
5. On CUDA only: the static-KV verifier with CUDA graphs per width against the eager one (``aded bench-compile``;
   never run on a GPU yet); then the batched ragged pass compiled per token bucket against the eager one
   (``aded bench-compile --batched``: piecewise CUDA graphs around the attention operator; never run on a GPU).
6. (``make gpu-check`` then runs the tests marked ``gpu``.)
"""
from __future__ import annotations

import json
import time
from pathlib import Path


def _exactness_rows(device: str, modes, quick: bool) -> list[str]:
    from aded_ray.verify.exactness import check_exactness, check_shapes
    from aded_ray.verify.modes import load_for_mode
    from aded_ray.verify.target import TreeVerifier

    rows = ["| mode | widths | rows compared | max logit diff | argmax mismatches | exact (may speculate) |",
            "|---|---|---|---|---|---|"]
    for mode in modes:
        try:
            m = load_for_mode(None, mode, device)
        except ValueError as e:
            rows.append(f"| {mode} | – | skipped: {e} | | | |")
            continue
        for widths in ([], [64]):
            rep = check_exactness(lambda: TreeVerifier(m, widths=widths), mode,
                                  check_shapes(widths, 15 if quick else 63))
            rows.append(f"| {mode} | {widths or 'none'} | {rep.rows_compared} | {rep.max_diff:.3g} | "
                        f"{rep.argmax_mismatches} | {'yes' if rep.exact else 'no'} |")
        del m
    return rows


def _cost_rows(device: str, modes, quick: bool) -> list[str]:
    from aded_ray.verify.cost import measure_cost_curve
    from aded_ray.verify.loading import random_model
    from aded_ray.verify.modes import load_for_mode
    from aded_ray.verify.target import TreeVerifier

    ks = (1, 8, 16) if quick else (1, 2, 4, 8, 16, 32, 64)
    rows = ["| model | mode | widths | ctx | " + " | ".join(f"k={k}" for k in ks) + " |",
            "|---" * (len(ks) + 4) + "|"]
    models = [("SmolLM2-135M (real)", mode, lambda mode=mode: load_for_mode(None, mode, device)) for mode in modes]
    if device == "cuda" and not quick:
        models.append(("Llama-3-8B shape (random)", "bf16",
                       lambda: random_model("llama3-8b", dtype="bfloat16", device=device)))
    for name, mode, load in models:
        try:
            m = load()
        except ValueError as e:
            rows.append(f"| {name} | {mode} | – | – | skipped: {e} |")
            continue
        for widths in ([], [64]):
            ctx = 512
            curve = measure_cost_curve(lambda: TreeVerifier(m, widths=widths), ks=ks, cache_len=ctx,
                                       reps=5 if quick else 15).to_dict()
            rows.append(f"| {name} | {mode} | {widths or 'none'} | {ctx} | " +
                        " | ".join(f"{curve[k]:.2f}" for k in ks) + " |")
        del m
        if device == "cuda":
            import torch

            torch.cuda.empty_cache()
    return rows


def _compiled_cost_rows(device: str, quick: bool) -> list[str]:
    """Cost of a pass of the static-KV verifier compiled per width (CUDA graphs on CUDA, inductor on CPUs),
    synchronised, after compiling every width at start (the time is reported). On a CPU (``quick``) a tiny
    random Llama only exercises the path."""
    from aded_ray.verify.cost import measure_cost_curve
    from aded_ray.verify.loading import random_model
    from aded_ray.verify.modes import load_for_mode
    from aded_ray.verify.static import StaticTreeVerifier

    ks = (1, 8, 16, 64)
    cases = [("tiny Llama shape (random)", "fp32", lambda: random_model("tiny", device=device), (1, 8, 16))] if quick \
        else [("SmolLM2-135M (real)", "fp32", lambda: load_for_mode(None, "fp32", device), (1, 8, 16, 64)),
              ("Llama-3-8B shape (random)", "bf16",
               lambda: random_model("llama3-8b", dtype="bfloat16", device=device), (1, 64))]
    rows = ["| model | dtype | widths | ctx | compile s | " + " | ".join(f"k={k}" for k in ks) + " |",
            "|---" * (len(ks) + 5) + "|"]
    for name, dtype, load, widths in cases:
        try:
            m = load()
            t = time.time()
            v = StaticTreeVerifier(m, widths=widths, max_len=1024, compile=True,
                                   compile_mode="reduce-overhead" if device == "cuda" else None,
                                   dynamic=False if device == "cuda" else None)
            v.warm_up()                   # every width compiled (captured) in the window the curve uses
            compile_s = time.time() - t
            curve = measure_cost_curve(lambda: v, ks=ks, cache_len=128, reps=5 if quick else 15).to_dict()
            rows.append(f"| {name} | {dtype} | {list(widths)} | 128 | {compile_s:.0f} | " +
                        " | ".join(f"{curve[k]:.2f}" if k in curve else "–" for k in ks) + " |")
            del v, m
        except Exception as e:          # the report keeps the other rows
            rows.append(f"| {name} | {dtype} | {list(widths)} | – | failed: {type(e).__name__}: {e} |")
        if device == "cuda":
            import torch

            torch.cuda.empty_cache()
    return rows


def run(device: str = "auto", quick: bool | None = None, out: Path | None = None, limit: int = 12,
        max_new_tokens: int = 96, compiled: bool = True) -> str:
    from aded_ray.bench.e2e import markdown, run_bench
    from aded_ray.config import VerifyConfig

    device = VerifyConfig(device=device).resolved_device()
    quick = (device == "cpu") if quick is None else quick
    modes = ["fp32", "bf16", "fp16"] if device == "cuda" else ["fp32", "fp32-packed", "bf16"]
    t0 = time.time()
    parts = [f"# aded gpu-check on {device}" + (" (quick)" if quick else ""), ""]
    if device == "cuda":
        import torch

        parts.append(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
                     f"CUDA {torch.version.cuda}")
    sections = [("Exactness (start-up check on the loop's shapes)", _exactness_rows),
                ("Cost of one verification pass (ms, synchronised, median)", _cost_rows)]
    if compiled:
        sections.append(("Cost of one compiled static-KV pass (ms, synchronised, median; a pass costs its width)",
                         lambda device, modes, quick: _compiled_cost_rows(device, quick)))
    for title, fn in sections:
        t = time.time()
        parts += ["", f"## {title}", ""] + fn(device, modes, quick) + ["", f"({time.time() - t:.0f} s)"]
        print("\n".join(parts), flush=True)
    t = time.time()
    r = run_bench(sets=("mtbench", "humaneval"), limit=3 if quick else limit,
                  max_new_tokens=24 if quick else max_new_tokens, device=device,
                  budgets=("auto", 16, 64) if not quick else ("auto", 16), out_dir=out or Path("results/tmp"),
                  fast_baselines=False)
    parts += ["", "## End to end, default configuration on this device (greedy)", "", markdown(r),
              f"({time.time() - t:.0f} s)"]
    print("\n".join(parts[-4:]), flush=True)
    t = time.time()
    from aded_ray.bench.load import markdown as load_markdown
    from aded_ray.bench.load import run_bench_load

    lr = run_bench_load(levels=(1, 2) if quick else (1, 4, 16, 32), max_new_tokens=12 if quick else 32,
                        min_requests=2 if quick else 8, device=device, out_dir=out or Path("results/tmp"))
    parts += ["", "## Under concurrent load (`aded bench-load`: one at a time, batched plain, batched speculative)",
              "", load_markdown(lr), f"({time.time() - t:.0f} s)"]
    if device == "cuda" and compiled:   # CUDA graphs per width; on CPUs `aded bench-compile` is a run of its own
        t = time.time()
        parts += ["", "## Static KV cache, captured passes (`aded bench-compile`, CUDA graphs)", ""]
        try:
            from aded_ray.bench.compiled import markdown as compile_markdown
            from aded_ray.bench.compiled import run_bench_compile

            parts.append(compile_markdown(run_bench_compile(
                limit=2, max_new_tokens=max_new_tokens, device="cuda", max_len=1024,
                compile_mode="reduce-overhead", out_dir=out or Path("results/tmp"))))
        except Exception as e:          # the report keeps the sections above
            parts.append(f"failed: {type(e).__name__}: {e}")
        parts.append(f"({time.time() - t:.0f} s)")
        print("\n".join(parts[-3:]), flush=True)
    if device == "cuda" and compiled:   # batched ragged passes per token bucket, piecewise CUDA graphs
        t = time.time()
        parts += ["", "## Batched ragged passes compiled per token bucket (`aded bench-compile --batched`)", ""]
        try:
            from aded_ray.bench import compiled_batch

            parts.append(compiled_batch.markdown(compiled_batch.run_batched_pass_costs(
                tokens=(1, 8, 16, 64), batches=(1, 4), reps=8, device="cuda")))
        except Exception as e:          # the report keeps the sections above
            parts.append(f"failed: {type(e).__name__}: {e}")
        parts.append(f"({time.time() - t:.0f} s)")
        print("\n".join(parts[-3:]), flush=True)
    parts += ["", f"total {time.time() - t0:.0f} s"]
    report = "\n".join(parts) + "\n"
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu-check.md").write_text(report)
        (out / "gpu-check.json").write_text(json.dumps(r, indent=1))
    return report
