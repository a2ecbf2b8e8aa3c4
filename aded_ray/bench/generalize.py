"""Leave-one-set-out evaluation of the best drafter over dev sets of different kinds.

For every scored set S, whatever the drafter fits (today: the accuracy of a request / history match by its
length, the priors of the two suffix sources) is fitted on the traces of the *other* sets only; then S is
decoded with the model verifying every tree (:func:`aded_ray.bench.model_replay.model_replay`) at each node
budget, and the authors' drafter and prompt lookup replay the same traces in the same run. One JSON per
scored set is written; :func:`table` turns a folder of them into the README's markdown table.

``match_accuracy`` measures what the drafter's priors mean: over every step of every trace (context =
prompt + output so far + the step's root token), the top continuation of the longest earlier match of the
context in the request (or in the earlier traces, the history) is checked against the next recorded token,
per match length; the hit rates are made monotone in the length (pool-adjacent-violators, weighted by counts).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from aded_ray.draft.suffix import TokenIndex

MAX_LEN = 16


def pav(hits, counts) -> np.ndarray:
    """Non-decreasing least-squares fit of ``hits / counts`` weighted by ``counts`` (empty bins take their
    left neighbour's value, 0 before any data).

    >>> pav([1, 3, 2, 9], [2, 4, 4, 10]).round(3).tolist()
    [0.5, 0.625, 0.625, 0.9]
    """
    hits, counts = np.asarray(hits, np.float64), np.asarray(counts, np.float64)
    blocks = []                                  # [value, weight, n_bins]
    for h, c in zip(hits, counts):
        blocks.append([h / c if c > 0 else None, c, 1])
        if blocks[-1][0] is None:                # no data: merge into the previous block, weightless
            if len(blocks) > 1:
                blocks[-2][2] += 1
                blocks.pop()
            continue
        while len(blocks) > 1 and blocks[-2][0] is not None and blocks[-2][0] > blocks[-1][0]:
            v2, w2, n2 = blocks.pop()
            v1, w1, n1 = blocks.pop()
            blocks.append([(v1 * w1 + v2 * w2) / (w1 + w2), w1 + w2, n1 + n2])
    out = []
    for v, _, n in blocks:
        out += [0.0 if v is None else v] * n
    return np.asarray(out)


def match_accuracy(traces: list[dict], vocab_size: int, max_len: int = MAX_LEN, max_occ: int = 256):
    """``(request_conf, history_conf, counts)``: per match length m = 0..max_len, how often the top
    continuation of the longest match was the model's next token (monotone), and the step counts."""
    hits = np.zeros((2, max_len + 1))
    counts = np.zeros((2, max_len + 1))
    history = TokenIndex(vocab_size)
    for tr in traces:
        prompt = np.asarray(tr["prompt_ids"], np.int32)
        out = np.asarray(tr["output_ids"], np.int32)
        req = TokenIndex(vocab_size)
        req.extend(prompt)
        for i in range(out.shape[0] - 1):
            req.extend(out[i:i + 1])             # the step's root token
            truth = out[i + 1]
            tail = req.seq[max(0, req.n - max_len - 2):req.n]
            for src, (ix, ctx) in enumerate(((req, ()), (history, tail))):
                if src == 1 and history.n < 2:
                    continue
                tok, cnt, m = ix.matches(ctx, max_len=max_len, max_occ=max_occ, k=16)
                if m > 0:
                    m = min(m, max_len)
                    counts[src, m] += 1
                    hits[src, m] += tok[int(np.argmax(cnt))] == truth
        history.extend(np.concatenate([prompt, out]))
    req_conf = pav(hits[0, 1:], counts[0, 1:])
    hist_conf = pav(hits[1, 1:], counts[1, 1:])
    return (tuple([0.0] + [round(float(x), 3) for x in req_conf]),
            tuple([0.0] + [round(float(x), 3) for x in hist_conf]), counts.astype(int).tolist())


def fit_params(train: dict[str, list[dict]], vocab_size: int) -> dict:
    """The drafter parameters fitted on ``train`` (set name -> traces): the two match-accuracy priors."""
    traces = [t for name in sorted(train) for t in train[name]]
    rc, hc, _ = match_accuracy(traces, vocab_size)
    return {"request_conf": rc, "history_conf": hc}


def evaluate_set(name: str, sets: dict[str, list[dict]], matrix, model, *, budgets=(30, 16, 8), authors=None,
                 eos_ids=(), progress=None, limit: int | None = None) -> dict:
    """Score set ``name`` (its first ``limit`` traces) with everything fitted on all the other sets' traces;
    returns the rows of the run."""
    from aded_ray.bench.model_replay import model_replay
    from aded_ray.bench.replay import authors_replay, replay
    from aded_ray.draft.best import BestDrafter
    from aded_ray.draft.lookup import PromptLookupDrafter

    traces = sets[name][:limit]
    params = fit_params({k: v for k, v in sets.items() if k != name}, matrix.vocab_size)
    rows = []
    if authors is not None:
        rows.append({**authors_replay(traces, authors, 64, "authors' draftretriever (64)"), "drafter": "authors"})
    rows.append({**replay(traces, PromptLookupDrafter(), "prompt lookup").summary(), "drafter": "lookup"})
    for b in budgets:
        matrix.reset_deltas()
        d = BestDrafter(matrix, **params)
        d.warm_up()                             # compile outside the timed region
        res, same = model_replay(traces, d, model, b, f"best <= {b}, model verifies", eos_ids=eos_ids,
                                 progress=progress)
        rows.append({**res.summary(), "drafter": f"best{b}", "budget": b, "identical_to_traces": same})
    matrix.reset_deltas()
    return {"set": name, "traces": len(traces), "fitted_on": sorted(k for k in sets if k != name),
            "params": params, "rows": rows}


def table(results: list[dict]) -> str:
    """The README table: MAT per set at each budget, x the authors', with lookup and the authors' rows."""
    head = ("| set (traces) | authors' MAT | prompt lookup MAT | best <= 30 | <= 16 | <= 8 | x authors at 30 / 16 / 8 "
            "| drafter p50 µs at 30 / 16 / 8: observe + draft (with recycling) |\n|---|---|---|---|---|---|---|---|")
    lines, ratios = [head], {30: [], 16: [], 8: []}
    for r in results:
        by = {row["drafter"]: row for row in r["rows"]}
        a = by.get("authors", {}).get("mat")
        best = [by.get(f"best{b}") for b in (30, 16, 8)]
        x = []
        for b, row in zip((30, 16, 8), best):
            if a and row:
                x.append(f"{row['mat'] / a:.2f}x")
                ratios[b].append((row["mat"] / a, r["set"]))
            else:
                x.append("-")
        mats = [f"{row['mat']:.3f}" if row else "-" for row in best]
        us = [f"{row['draft_us_p50']:.0f}" + (f" ({row['host_us_p50']:.0f})" if "host_us_p50" in row else "")
              if row else "-" for row in best]
        lines.append(f"| {r['set']} ({r['traces']}) | {a:.3f} | {by['lookup']['mat']:.3f} | " + " | ".join(mats)
                     + f" | {' / '.join(x)} | {' / '.join(us)} |" if a else
                     f"| {r['set']} ({r['traces']}) | - | {by['lookup']['mat']:.3f} | " + " | ".join(mats) + " | - | "
                     + " / ".join(us) + " |")
    summary = []
    for b, xs in ratios.items():
        if xs:
            worst = min(xs)
            summary.append(f"<= {b}: mean {np.mean([v for v, _ in xs]):.2f}x, worst {worst[0]:.2f}x ({worst[1]})")
    return "\n".join(lines) + ("\n\n" + "; ".join(summary) if summary else "")


def load_results(folder: str | Path, names=None) -> list[dict]:
    files = sorted(Path(folder).glob("*.json"))
    res = [json.loads(f.read_text()) for f in files]
    if names:
        order = {n: i for i, n in enumerate(names)}
        res = sorted((r for r in res if r["set"] in order), key=lambda r: order[r["set"]])
    return res
