"""``aded bench``: end-to-end decoding speed, side by side in one process, after a warm-up.

For each prompt set, every prompt is decoded greedily by:

- ``hf generate``: transformers' ``model.generate`` in the verify mode (the plain baseline of that mode);
- ``plain loop``: aded_ray's own decode loop without drafts, same mode (a stronger baseline: same KV cache);
- ``plain (fastest mode)``: plain decoding in the fastest mode the machine has (measured k=1 cost, exact or
  not: a user who does not speculate would pick it), the faster of ``model.generate`` and the plain loop
  (there over the single-request verifier);
- ``hf prompt lookup``: transformers' prompt-lookup decoding (``prompt_lookup_num_tokens=10``), same mode;
- ``aded_ray``: speculative decoding with the cost-model budget (``auto``, warmed up once on the
  input-grounded prompts before timing, as a running service's budget is), same mode; with ``budgets``
  also one row per fixed node budget (``aded_ray b=16`` ...). Each row has its own drafter and its own
  adaptive matrix state (fresh at the start of each set), so no row drafts from another row's outputs.

Every command runs on any machine: ``device`` picks CPU or CUDA; a mode the hardware cannot run is left out
of the fastest-mode search with a note in the results. Tokens/s = new tokens / wall time of the whole
request (prefill included; synchronised, since every row ends with its tokens on the host). Speed-ups are
ratios against the plain baselines measured in the same run. Outputs are compared with plain decoding.

All tensor work runs on the engine's thread (:meth:`~aded_ray.engine.Engine.run_on_thread`): baselines on the
calling thread would start a second OpenMP pool, and with more pool threads than cores every pass of every
row slows (libgomp's throttled waits; ~1.4x on a 2-core machine).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from aded_ray.bench.traces import chat_ids
from aded_ray.data import load_prompts


def _hf_generate(model, tok, ids, max_new, **kw):
    out = model.generate(torch.tensor([ids], device=model.device), max_new_tokens=max_new, do_sample=False,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id, **kw)
    return out[0, len(ids):].tolist()


def fastest_plain_mode(device: str = "cpu", candidates=None) -> tuple[str, dict, dict]:
    """The verify mode with the cheapest one-token pass on this machine, each mode's k=1 cost (ms), and the
    modes skipped because the hardware cannot run them (with the reason)."""
    from aded_ray.verify.cost import measure_cost_curve
    from aded_ray.verify.modes import load_for_mode

    if candidates is None:
        candidates = ("fp32", "fp32-packed", "bf16", "bf16-packed") if device == "cpu" else ("fp32", "bf16", "fp16")
    costs, skipped = {}, {}
    for mode in candidates:
        try:
            m = load_for_mode(None, mode, device)
        except ValueError as e:
            skipped[mode] = str(e)
            continue
        costs[mode] = measure_cost_curve(m, ks=(1,), reps=7)(1)
        del m
    return min(costs, key=costs.get), costs, skipped


def run_bench(*, sets=("mtbench", "humaneval", "grounded"), limit: int = 10, max_new_tokens: int = 128,
              store: str | None = None, mode: str = "auto", device: str = "auto", budgets=("auto",),
              out_dir: str | Path = "results", fast_baselines: bool = True) -> dict:
    from aded_ray.config import EngineConfig, VerifyConfig
    from aded_ray.decode import FixedBudget, NoDraft, generate_ids
    from aded_ray.draft.matrix import TrigramMatrix
    from aded_ray.engine import Chunk, Engine
    from aded_ray.verify.modes import load_for_mode
    from aded_ray.verify.target import TreeVerifier
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = VerifyConfig(device=device).resolved_device()
    engine = Engine(EngineConfig(store=store, verify=VerifyConfig(mode=mode, device=device, budget="auto")))
    on = engine.run_on_thread          # every baseline's tensor work on the engine's thread: one OpenMP pool
    fast_mode, k1_costs, skipped = on(lambda: fastest_plain_mode(device)) if fast_baselines else (
        engine.mode, {}, {})
    tok, model = engine.tokenizer, engine.model
    fast_model = model if fast_mode == engine.mode else on(lambda: load_for_mode(None, fast_mode, device))
    fast_verifier = on(lambda: TreeVerifier(fast_model))

    def fast_loop(ids):              # the decode loop without drafts, single-request verifier, fastest mode
        return on(lambda: [t for c in generate_ids(fast_verifier, NoDraft(), ids, max_new_tokens=max_new_tokens,
                                                   eos_ids=engine.eos_ids) for t in c])

    def hf(m, ids, n, **kw):
        return on(lambda: _hf_generate(m, tok, ids, n, **kw))

    labels = ["aded_ray" if b == "auto" else f"aded_ray b={b}" for b in budgets]
    auto_budget = engine.budget
    warm = chat_ids(tok, [{"role": "user", "content": "Say hello."}])
    hf(model, warm, 8)
    hf(fast_model, warm, 8)
    list(engine.generate("Say hello.", chat=True, max_new_tokens=16))
    on(lambda: list(generate_ids(fast_verifier, NoDraft(), warm, max_new_tokens=16, eos_ids=engine.eos_ids)))
    if engine.speculate:       # the auto budget learns as a running service's has: on other prompts, untimed
        for p in load_prompts("grounded"):
            list(engine.generate(p["messages"], max_new_tokens=max_new_tokens))
    results = {"mode": engine.mode, "device": device, "widths": engine.widths, "fastest_plain_mode": fast_mode,
               "k1_ms_by_mode": k1_costs, "modes_skipped": skipped, "speculation": engine.speculate,
               "speculation_off_reason": engine.speculation_off_reason,
               "exactness": None if engine.exactness is None else engine.exactness.summary(),
               "cost_curve_ms": engine.cost.to_dict()[1] if engine.cost else None,
               "pass_cost_ms": engine.cost.to_dict() if engine.cost else None, "budgets": labels, "sets": {}}
    for name in sets:
        prompts = load_prompts(name, limit)
        states = {}   # per aded_ray row: its own matrix deltas, drafter and budget
        for b, label in zip(budgets, labels):
            matrix = engine._load_matrix(store, TrigramMatrix) if engine.speculate else None
            states[label] = (matrix, engine._make_drafter(matrix) if engine.speculate else None,
                             auto_budget if b == "auto" else FixedBudget(min(int(b), engine.max_nodes)))
        base = ("hf generate", "plain loop", "hf prompt lookup") + (
            ("hf generate (fastest mode)", "plain loop (fastest mode)") if fast_baselines else ())
        runs = {k: {"tokens": 0, "seconds": 0.0} for k in base + tuple(labels)}
        counts = {lab: dict(steps=0, emitted=0, drafted=0, accepted=0, identical=0) for lab in labels}

        def spec(label, messages):
            _, drafter, budget = states[label]
            engine.drafter, engine.budget = drafter, budget
            return list(engine.generate(messages, max_new_tokens=max_new_tokens))

        for p in tqdm(prompts, desc=f"bench {name}", unit="prompt"):
            ids = chat_ids(tok, p["messages"])
            timed = {}
            fns = [
                ("hf generate", lambda: hf(model, ids, max_new_tokens)),
                ("plain loop", lambda: list(engine.generate(p["messages"], max_new_tokens=max_new_tokens,
                                                            speculate=False))),
                ("hf generate (fastest mode)", lambda: hf(fast_model, ids, max_new_tokens)),
                ("plain loop (fastest mode)", lambda: fast_loop(ids)),
                ("hf prompt lookup", lambda: hf(model, ids, max_new_tokens, prompt_lookup_num_tokens=10)),
            ] + [(lab, lambda lab=lab: spec(lab, p["messages"])) for lab in labels]
            fns = [(k, f) for k, f in fns if k in runs]
            for label, fn in fns:
                t0 = time.perf_counter()
                out = fn()
                dt = time.perf_counter() - t0
                timed[label] = out
                n = sum(len(c.token_ids) for c in out) if out and isinstance(out[0], Chunk) else len(out)
                runs[label]["tokens"] += n
                runs[label]["seconds"] += dt
            plain_ids = [t for c in timed["plain loop"] for t in c.token_ids]
            for lab in labels:
                chunks, c = timed[lab], counts[lab]
                st = chunks[-1].stats
                c["steps"] += st.steps
                c["emitted"] += st.emitted
                c["drafted"] += st.draft_tokens
                c["accepted"] += st.accepted_tokens
                c["identical"] += plain_ids == [t for ch in chunks for t in ch.token_ids]
        tps = {k: v["tokens"] / v["seconds"] for k, v in runs.items()}
        fast_rows = ("hf generate (fastest mode)", "plain loop (fastest mode)") if fast_baselines else (
            "hf generate", "plain loop")
        tps["plain (fastest mode)"] = max(tps[k] for k in fast_rows)
        best_fixed = max((tps[lab] for lab in labels if lab != "aded_ray"), default=None)
        rows = {}
        for lab in labels:
            c = counts[lab]
            rows[lab] = {
                "tok_per_s": round(tps[lab], 2),
                "speedup_vs_same_mode": round(tps[lab] / tps["hf generate"], 3),
                "speedup_vs_plain_loop": round(tps[lab] / tps["plain loop"], 3),
                "speedup_vs_fastest_plain": round(tps[lab] / tps["plain (fastest mode)"], 3),
                "speedup_vs_prompt_lookup": round(tps[lab] / tps["hf prompt lookup"], 3),
                "mat": round(c["emitted"] / max(c["steps"], 1), 3),
                "acceptance_rate": round(c["accepted"] / max(c["drafted"], 1), 3),
                "draft_nodes_per_step": round(c["drafted"] / max(c["steps"], 1), 2),
                "identical_to_plain": f"{c['identical']}/{len(prompts)}",
            }
        results["sets"][name] = {"prompts": len(prompts), "tok_per_s": {k: round(v, 2) for k, v in tps.items()},
                                 "rows": rows, **{k: v for k, v in rows[labels[0]].items() if k != "tok_per_s"},
                                 "auto_vs_best_fixed": (round(tps["aded_ray"] / best_fixed, 3)
                                                        if best_fixed and "aded_ray" in labels else None)}
    engine.budget = auto_budget
    results["budget"] = auto_budget.snapshot() if hasattr(auto_budget, "snapshot") else None
    (out_dir / "bench.json").write_text(json.dumps(results, indent=1))
    (out_dir / "bench.md").write_text(markdown(results))
    plot(results, out_dir / "bench.png")
    return results


def markdown(r: dict) -> str:
    lines = [f"device `{r.get('device', 'cpu')}`, verify mode `{r['mode']}`, widths {r.get('widths') or 'none'}; "
             f"speculation {'on' if r.get('speculation', True) else 'OFF: ' + str(r.get('speculation_off_reason'))}; "
             f"fastest plain mode `{r['fastest_plain_mode']}` "
             f"(k=1 ms by mode: {', '.join(f'{k} {v:.1f}' for k, v in r['k1_ms_by_mode'].items())})"]
    for mode, why in (r.get("modes_skipped") or {}).items():
        lines.append(f"- mode {mode} skipped: {why}")
    lines += ["", "| set | row | hf generate tok/s | plain loop tok/s | plain fastest tok/s | hf prompt lookup tok/s | "
              "aded_ray tok/s | vs hf generate | vs plain loop | vs fastest plain | vs prompt lookup | MAT | "
              "accept rate | nodes/step | identical |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in r["sets"].items():
        t = s["tok_per_s"]
        for lab, row in (s.get("rows") or {"aded_ray": s}).items():
            lines.append(
                f"| {name} ({s['prompts']}) | {lab} | {t['hf generate']:.1f} | {t['plain loop']:.1f} | "
                f"{t['plain (fastest mode)']:.1f} | {t['hf prompt lookup']:.1f} | {t[lab]:.1f} | "
                f"{row['speedup_vs_same_mode']:.2f}x | {row['speedup_vs_plain_loop']:.2f}x | "
                f"{row['speedup_vs_fastest_plain']:.2f}x | {row['speedup_vs_prompt_lookup']:.2f}x | {row['mat']:.2f} | "
                f"{row['acceptance_rate']:.1%} | {row['draft_nodes_per_step']:.1f} | {row['identical_to_plain']} |")
        if s.get("auto_vs_best_fixed") is not None:
            lines.append(f"| {name} | auto / best fixed | | | | | | | | | | {s['auto_vs_best_fixed']:.2f} | | | |")
    cc = r.get("cost_curve_ms") or {}
    lines += ["", "cost curve (ms per pass of k tokens): " + ", ".join(f"k={k}: {v:.1f}" for k, v in cc.items())]
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(r["sets"])
    labels = ["hf generate", "plain loop", "plain (fastest mode)", "hf prompt lookup"] + r.get("budgets", ["aded_ray"])
    w = 0.8 / len(labels)
    for i, lab in enumerate(labels):
        ax1.bar([x + i * w for x in range(len(names))], [r["sets"][n]["tok_per_s"][lab] for n in names], w, label=lab)
    ax1.set_xticks([x + 2 * w for x in range(len(names))], names)
    ax1.set_ylabel("tokens / s")
    ax1.legend(fontsize=8)
    ax1.set_title(f"greedy decoding, SmolLM2-135M ({r.get('device', 'cpu')})")
    cc = r.get("cost_curve_ms") or {}
    ax2.plot(list(map(int, cc)), list(cc.values()), "o-")
    ax2.set_xlabel("tokens per forward pass (k)")
    ax2.set_ylabel("ms")
    ax2.set_title(f"cost curve ({r['mode']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
