"""`aded bench-attention`: what the row-invariant attention costs and what it buys, in one run.

Four engines on the same machine and configuration but for ``verify.attention``: plain decoding and
speculation with torch's SDPA, plain decoding and speculation with the invariant kernel. Each round submits
``concurrency`` requests at once to one engine (continuous batching: rows of several requests share passes),
engines in rotating order, every request greedy and then sampled (temperature 0.8, a fixed seed per request).
Reported per attention: tokens/s of plain decoding and of speculation, their ratio, and how many speculative
outputs equal plain decoding's token for token (greedy and sampled): with SDPA a sampled output can leave
plain decoding's where its seeded uniform falls within the tree pass's rounding of a CDF boundary; with the
invariant kernel it cannot (rows bit for bit).
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

ATTENTIONS = ("sdpa", "invariant")


def _round(engine, prompts, max_new_tokens: int, temperature: float, seeds) -> tuple[list[list[int]], float]:
    """Submit every prompt at once; (output ids per prompt, wall seconds)."""
    outs: list[list[int]] = [[] for _ in prompts]
    errors = []

    def run(i):
        try:
            for c in engine.generate(prompts[i], max_new_tokens=max_new_tokens, temperature=temperature,
                                     seed=seeds[i]):
                outs[i].extend(c.token_ids)
        except Exception as e:  # noqa: BLE001 - reported after the round
            errors.append(e)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return outs, time.perf_counter() - t0


def run_bench_attention(*, sets=("mtbench", "humaneval"), limit: int = 8, concurrency: int = 4,
                        max_new_tokens: int = 96, temperature: float = 0.8, store: str | None = None,
                        mode: str = "auto", out_dir: str | Path = "results") -> dict:
    from aded_ray.config import EngineConfig, VerifyConfig
    from aded_ray.data import load_prompts
    from aded_ray.engine import Engine

    prompts = [p["messages"] for s in sets for p in load_prompts(s, limit)]
    engines = {}
    for att in ATTENTIONS:
        cfg = EngineConfig(store=store, max_batch=max(concurrency, 1), verify=VerifyConfig(mode=mode, attention=att))
        engines[(att, "plain")] = Engine(cfg, speculate=False)
        engines[(att, "spec")] = Engine(cfg)
    for e in engines.values():                                  # warm: first passes, the budget's first steps
        _round(e, prompts[:concurrency], 16, 0.0, [0] * concurrency)
    names = list(engines)
    tokens = {k: 0 for k in names}
    seconds = {k: 0.0 for k in names}
    outputs = {(k, temp): [] for k in names for temp in (0.0, temperature)}
    for b in range(0, len(prompts), concurrency):
        batch = prompts[b:b + concurrency]
        seeds = [1000 + b + i for i in range(len(batch))]
        for temp in (0.0, temperature):
            order = names[(b // concurrency) % len(names):] + names[:(b // concurrency) % len(names)]
            for k in order:
                outs, s = _round(engines[k], batch, max_new_tokens, temp, seeds)
                tokens[k] += sum(map(len, outs))
                seconds[k] += s
                outputs[(k, temp)].extend(outs)
    rows = {}
    for att in ATTENTIONS:
        plain, spec = (att, "plain"), (att, "spec")
        tps = {k: tokens[k] / seconds[k] for k in (plain, spec)}
        same = {temp: sum(a == b for a, b in zip(outputs[(plain, temp)], outputs[(spec, temp)]))
                for temp in (0.0, temperature)}
        e = engines[spec]
        rows[att] = {"plain_tok_s": round(tps[plain], 2), "spec_tok_s": round(tps[spec], 2),
                     "speedup": round(tps[spec] / tps[plain], 3), "greedy_identical": same[0.0],
                     "sampled_identical": same[temperature], "requests": len(prompts),
                     "exactness": None if e.exactness is None else e.exactness.summary()}
    result = {"mode": engines[("sdpa", "spec")].mode, "sets": list(sets), "limit": limit,
              "concurrency": concurrency, "max_new_tokens": max_new_tokens, "temperature": temperature,
              "rows": rows,
              "cross": {"plain sdpa vs plain invariant, greedy identical": sum(
                  a == b for a, b in zip(outputs[(("sdpa", "plain"), 0.0)], outputs[(("invariant", "plain"), 0.0)]))}}
    for e in engines.values():
        e.shutdown()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench-attention.json").write_text(json.dumps(result, indent=1))
    (out_dir / "bench-attention.md").write_text(markdown(result))
    return result


def markdown(r: dict) -> str:
    n = next(iter(r["rows"].values()))["requests"]
    lines = [f"mode {r['mode']}, {n} requests ({', '.join(r['sets'])}), {r['concurrency']} at a time, "
             f"{r['max_new_tokens']} new tokens, greedy and T = {r['temperature']}", "",
             "| attention | plain tok/s | speculative tok/s | speculative / plain | greedy outputs = plain | "
             "sampled outputs = plain |", "|---|---|---|---|---|---|"]
    for att, x in r["rows"].items():
        lines.append(f"| {att} | {x['plain_tok_s']} | {x['spec_tok_s']} | {x['speedup']}x | "
                     f"{x['greedy_identical']}/{n} | {x['sampled_identical']}/{n} |")
    return "\n".join(lines) + "\n"
