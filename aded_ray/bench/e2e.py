"""``aded bench``: end-to-end decoding speed, side by side in one process, after a warm-up.

For each prompt set, every prompt is decoded greedily by:

- ``hf generate``: transformers' ``model.generate`` in the verify mode (the plain baseline of that mode);
- ``plain loop``: aded_ray's own decode loop without drafts, same mode (a stronger baseline: same KV cache);
- ``plain (fastest mode)``: plain decoding in the fastest mode the machine has (measured k=1 cost, exact or
  not: a user who does not speculate would pick it), the faster of ``model.generate`` and the plain loop;
- ``hf prompt lookup``: transformers' prompt-lookup decoding (``prompt_lookup_num_tokens=10``), same mode;
- ``aded_ray``: speculative decoding with the cost-model budget, same mode.

Tokens/s = new tokens / wall time of the whole request (prefill included). Speed-ups are ratios against the
plain baselines measured in the same run. Outputs of aded_ray are compared with plain decoding in its mode.
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
    out = model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id, **kw)
    return out[0, len(ids):].tolist()


def fastest_plain_mode(candidates=("fp32", "fp32-packed", "bf16", "bf16-packed")) -> tuple[str, dict]:
    """The verify mode with the cheapest one-token pass on this machine, and each mode's k=1 cost (ms)."""
    from aded_ray.verify.budget import measure_cost_curve
    from aded_ray.verify.modes import load_for_mode

    costs = {}
    for mode in candidates:
        try:
            m = load_for_mode(None, mode)
        except ValueError:
            continue
        costs[mode] = measure_cost_curve(m, ks=(1,), reps=7)(1)
        del m
    return min(costs, key=costs.get), costs


def run_bench(*, sets=("mtbench", "humaneval", "grounded"), limit: int = 10, max_new_tokens: int = 128,
              store: str | None = None, mode: str = "fp32-packed", out_dir: str | Path = "results") -> dict:
    from aded_ray.config import EngineConfig, VerifyConfig
    from aded_ray.engine import Engine
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast_mode, k1_costs = fastest_plain_mode()
    engine = Engine(EngineConfig(store=store, verify=VerifyConfig(mode=mode, budget="auto")))
    tok, model = engine.tokenizer, engine.model
    fast = engine if fast_mode == engine.mode else Engine(
        EngineConfig(store=store, verify=VerifyConfig(mode=fast_mode, budget=0)), speculate=False)
    fast_model = fast.model
    warm = chat_ids(tok, [{"role": "user", "content": "Say hello."}])
    _hf_generate(model, tok, warm, 8)
    _hf_generate(fast_model, tok, warm, 8)
    list(engine.generate("Say hello.", chat=True, max_new_tokens=16))
    list(fast.generate("Say hello.", chat=True, max_new_tokens=16, speculate=False))
    results = {"mode": engine.mode, "fastest_plain_mode": fast_mode, "k1_ms_by_mode": k1_costs,
               "cost_curve_ms": engine.budget.snapshot().get("cost_ms"), "sets": {}}
    for name in sets:
        prompts = load_prompts(name, limit)
        engine.matrix.reset_deltas()
        runs = {k: {"tokens": 0, "seconds": 0.0} for k in
                ("hf generate", "plain loop", "hf generate (fastest mode)", "plain loop (fastest mode)",
                 "hf prompt lookup", "aded_ray")}
        steps = emitted = drafted = accepted = identical = 0
        for p in tqdm(prompts, desc=f"bench {name}", unit="prompt"):
            ids = chat_ids(tok, p["messages"])
            timed = {}
            for label, fn in (
                ("hf generate", lambda: _hf_generate(model, tok, ids, max_new_tokens)),
                ("plain loop", lambda: list(engine.generate(p["messages"], max_new_tokens=max_new_tokens,
                                                            speculate=False))),
                ("hf generate (fastest mode)", lambda: _hf_generate(fast_model, tok, ids, max_new_tokens)),
                ("plain loop (fastest mode)", lambda: list(fast.generate(p["messages"], max_new_tokens=max_new_tokens,
                                                                         speculate=False))),
                ("hf prompt lookup", lambda: _hf_generate(model, tok, ids, max_new_tokens,
                                                          prompt_lookup_num_tokens=10)),
                ("aded_ray", lambda: list(engine.generate(p["messages"], max_new_tokens=max_new_tokens))),
            ):
                t0 = time.perf_counter()
                out = fn()
                dt = time.perf_counter() - t0
                timed[label] = out
                n = sum(len(c.token_ids) for c in out) if label in ("aded_ray", "plain loop", "plain loop (fastest mode)") \
                    else len(out)
                runs[label]["tokens"] += n
                runs[label]["seconds"] += dt
            chunks = timed["aded_ray"]
            st = chunks[-1].stats
            steps, emitted = steps + st.steps, emitted + st.emitted
            drafted, accepted = drafted + st.draft_tokens, accepted + st.accepted_tokens
            plain_ids = [t for c in timed["plain loop"] for t in c.token_ids]
            identical += plain_ids == [t for c in chunks for t in c.token_ids]
        tps = {k: v["tokens"] / v["seconds"] for k, v in runs.items()}
        tps["plain (fastest mode)"] = max(tps["hf generate (fastest mode)"], tps["plain loop (fastest mode)"])
        results["sets"][name] = {
            "prompts": len(prompts), "tok_per_s": {k: round(v, 2) for k, v in tps.items()},
            "speedup_vs_same_mode": round(tps["aded_ray"] / tps["hf generate"], 3),
            "speedup_vs_plain_loop": round(tps["aded_ray"] / tps["plain loop"], 3),
            "speedup_vs_fastest_plain": round(tps["aded_ray"] / tps["plain (fastest mode)"], 3),
            "speedup_vs_prompt_lookup": round(tps["aded_ray"] / tps["hf prompt lookup"], 3),
            "mat": round(emitted / max(steps, 1), 3), "acceptance_rate": round(accepted / max(drafted, 1), 3),
            "draft_nodes_per_step": round(drafted / max(steps, 1), 2),
            "identical_to_plain": f"{identical}/{len(prompts)}",
        }
    results["budget"] = engine.budget.snapshot()
    (out_dir / "bench.json").write_text(json.dumps(results, indent=1))
    (out_dir / "bench.md").write_text(markdown(results))
    plot(results, out_dir / "bench.png")
    return results


def markdown(r: dict) -> str:
    lines = [f"verify mode `{r['mode']}`; fastest plain mode `{r['fastest_plain_mode']}` "
             f"(k=1 ms by mode: {', '.join(f'{k} {v:.1f}' for k, v in r['k1_ms_by_mode'].items())})", "",
             "| set | hf generate tok/s | plain loop tok/s | plain fastest tok/s | hf prompt lookup tok/s | "
             "aded_ray tok/s | vs hf generate | vs plain loop | vs fastest plain | vs prompt lookup | MAT | "
             "accept rate | nodes/step | identical |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in r["sets"].items():
        t = s["tok_per_s"]
        lines.append(f"| {name} ({s['prompts']}) | {t['hf generate']:.1f} | {t['plain loop']:.1f} | "
                     f"{t['plain (fastest mode)']:.1f} | "
                     f"{t['hf prompt lookup']:.1f} | {t['aded_ray']:.1f} | {s['speedup_vs_same_mode']:.2f}x | "
                     f"{s['speedup_vs_plain_loop']:.2f}x | "
                     f"{s['speedup_vs_fastest_plain']:.2f}x | {s['speedup_vs_prompt_lookup']:.2f}x | {s['mat']:.2f} | "
                     f"{s['acceptance_rate']:.1%} | {s['draft_nodes_per_step']:.1f} | {s['identical_to_plain']} |")
    cc = r.get("cost_curve_ms") or {}
    lines += ["", "cost curve (ms per pass of k tokens): " + ", ".join(f"k={k}: {v:.1f}" for k, v in cc.items())]
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(r["sets"])
    labels = ["hf generate", "plain loop", "plain (fastest mode)", "hf prompt lookup", "aded_ray"]
    w = 0.16
    for i, lab in enumerate(labels):
        ax1.bar([x + i * w for x in range(len(names))], [r["sets"][n]["tok_per_s"][lab] for n in names], w, label=lab)
    ax1.set_xticks([x + 2 * w for x in range(len(names))], names)
    ax1.set_ylabel("tokens / s")
    ax1.legend(fontsize=8)
    ax1.set_title("greedy decoding, SmolLM2-135M")
    cc = r.get("cost_curve_ms") or {}
    ax2.plot(list(map(int, cc)), list(cc.values()), "o-")
    ax2.set_xlabel("tokens per forward pass (k)")
    ax2.set_ylabel("ms")
    ax2.set_title(f"cost curve ({r['mode']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
