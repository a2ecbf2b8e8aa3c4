"""Trace replay: measure drafters on recorded greedy continuations, without running the model.

Each step of a trace mirrors real greedy decoding: the context is the prompt plus the output so far plus the
step's root token (the model's own next token, known from the trace); the drafter observes it (adaptive
update) and drafts a tree; the step accepts the longest tree path that matches the recorded continuation and
emits root + accepted tokens. MAT = emitted tokens / steps.

Traces that carry the model's top-k per output position (``top_ids``/``top_p``, :mod:`aded_ray.bench.rollouts`)
also feed a drafter's ``observe_logits`` after each step, as verification would, for the rows whose
predictions the trace knows: the root and the accepted nodes (real verification also scores the rejected
nodes, so replay recycles fewer predictions than decoding does).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from aded_ray.draft.tree import DraftTree


def accepted_length(tree: DraftTree, target: np.ndarray) -> int:
    """Length of the longest root-to-node path whose tokens equal ``target[:len]``.

    >>> accepted_length(DraftTree([3, 4, 5], [-1, -1, 1]), np.array([4, 5, 9]))
    2
    """
    node, acc = -1, 0
    parents, tokens = tree.parents, tree.tokens
    while acc < target.shape[0]:
        kids = np.flatnonzero((parents == node) & (tokens == target[acc]))
        if kids.shape[0] == 0:
            break
        node = int(kids[0])
        acc += 1
    return acc


@dataclass
class ReplayResult:
    name: str
    traces: int = 0
    steps: int = 0
    emitted: int = 0
    nodes: int = 0
    empty_steps: int = 0
    draft_us: list = field(default_factory=list, repr=False)
    recycle_us: list = field(default_factory=list, repr=False)  # model loop: recycling after each pass
    per_trace: list = field(default_factory=list, repr=False)    # (steps, emitted) of each trace

    @property
    def mat(self) -> float:
        return self.emitted / max(self.steps, 1)

    def summary(self) -> dict:
        us = np.asarray(self.draft_us) if self.draft_us else np.zeros(1)
        return {"name": self.name, "traces": self.traces, "steps": self.steps, "emitted": self.emitted,
                "mat": round(self.mat, 4), "nodes_per_step": round(self.nodes / max(self.steps, 1), 2),
                "empty_draft_rate": round(self.empty_steps / max(self.steps, 1), 4),
                "draft_us_p50": round(float(np.percentile(us, 50)), 1),
                "draft_us_p95": round(float(np.percentile(us, 95)), 1),
                **self._host_summary()}

    def _host_summary(self) -> dict:
        """Model loop only: the recycling after each pass, and the step's drafter host time in all
        (observe + draft + recycle of the same step)."""
        if not self.recycle_us or len(self.recycle_us) != len(self.draft_us):
            return {}
        rec = np.asarray(self.recycle_us, dtype=float)
        host = (rec + np.asarray(self.draft_us))[~np.isnan(rec)]     # steps that recycled (not a request's last)
        if not host.size:
            return {}
        return {"recycle_us_p50": round(float(np.nanpercentile(rec, 50)), 1),
                "host_us_p50": round(float(np.percentile(host, 50)), 1),
                "host_us_p95": round(float(np.percentile(host, 95)), 1)}


def replay(traces: list[dict], drafter, name: str = "drafter", progress=None, pace_ms: float = 0.0,
           sweep_mb: float = 0.0) -> ReplayResult:
    """Replay ``traces`` through ``drafter`` (``observe(seq)`` then ``draft(seq)``, timed together).

    ``pace_ms``: every step lasts at least this long (sleeping for the rest), standing in for the model's
    verification pass, so processes that share state see each other at the pace a real fleet would.
    ``sweep_mb``: before every step, read that many MB of other memory (untimed), standing in for what a
    forward pass does to the caches (SmolLM2's fp32 weights: ~540 MB), so the drafter's times are those of
    the model loop, not of a warm replay."""
    res = ReplayResult(name)
    sweep = np.ones(int(sweep_mb * (1 << 20)) // 8) if sweep_mb > 0 else None
    recycle = getattr(drafter, "observe_logits", None)
    for tr in traces:
        steps0, emitted0 = res.steps, res.emitted
        top_ids = np.asarray(tr["top_ids"], np.int32) if recycle is not None and "top_ids" in tr else None
        top_p = np.asarray(tr["top_p"], np.float32) if top_ids is not None else None
        prompt = list(tr["prompt_ids"])
        out = np.asarray(tr["output_ids"], np.int32)
        seq = np.asarray(prompt + out.tolist(), np.int32)
        p = len(prompt)
        i = 0
        while i < out.shape[0]:
            ctx = seq[: p + i + 1]  # committed tokens + the step's root token out[i]
            if sweep is not None:
                sweep.sum()
            t0 = time.perf_counter()
            if pace_ms > 0 and res.steps:
                rest = step_start + pace_ms / 1000 - t0
                if rest > 0:
                    time.sleep(rest)
                t0 = time.perf_counter()
            step_start = t0
            drafter.observe(ctx)
            tree = drafter.draft(ctx)
            res.draft_us.append((time.perf_counter() - t0) * 1e6)
            acc = accepted_length(tree, out[i + 1:])
            if top_ids is not None and i + 1 < out.shape[0]:
                # rows: the root out[i] and the accepted nodes out[i+1..i+acc]; each predicted the next token
                j = min(i + acc + 2, out.shape[0])
                recycle(seq[p + i - 1:p + j - 2], seq[p + i:p + j - 1], top_ids[i + 1:j], top_p[i + 1:j])
            res.steps += 1
            res.emitted += 1 + acc
            res.nodes += len(tree)
            res.empty_steps += len(tree) == 0
            i += 1 + acc
        res.traces += 1
        res.per_trace.append((res.steps - steps0, res.emitted - emitted0))
        if progress is not None:
            progress.update(1)
    return res


class AuthorsDrafter:
    """The authors' Rust drafter (``draftretriever``): MCTS + adaptive update inside ``Reader.search``."""

    def __init__(self, index_path: str, choices: int = 64):
        import draftretriever

        self.reader = draftretriever.Reader(str(index_path))
        self.choices = choices

    def observe(self, seq) -> None:
        pass  # search() updates the matrix itself

    def draft(self, seq, max_nodes: int | None = None) -> DraftTree:
        if len(seq) < 2:  # the Rust code underflows (aborts the process) on shorter input
            return DraftTree()
        paths = self.reader.search([int(t) for t in seq], choices=self.choices)[0]
        return DraftTree.from_paths([[t for t in p if t >= 0] for p in paths], max_nodes=max_nodes or 64)


def _authors_summary(traces: list[dict], index_path: str, choices: int, name: str, sweep_mb: float) -> dict:
    return replay(traces, AuthorsDrafter(index_path, choices=choices), name, sweep_mb=sweep_mb).summary()


def authors_replay(traces: list[dict], index_path, choices: int = 64, name: str = "authors' draftretriever",
                   sweep_mb: float = 0.0) -> dict:
    """:func:`replay` of the authors' drafter in a child process; returns its summary.

    In the benchmark's own process, the Rust reader (its index loaded, searched and freed) leaves the process
    slower for the drafters timed after it: aded_ray's drafter in the model loop measured 401 µs p50 after it
    against 276 µs without it and 239 µs with it in a child process (MT-Bench dev set, <= 30 nodes, ``fp32-mkl``,
    the 2-core AMD EPYC), a state the service never has.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as ex:
        return ex.submit(_authors_summary, traces, str(index_path), choices, name, sweep_mb).result()


def result_row(r: dict) -> str:
    host = f"{r['host_us_p50']:.0f}" if "host_us_p50" in r else "-"
    return (f"| {r['name']} | {r['mat']:.3f} | {r['nodes_per_step']:.1f} | {r['draft_us_p50']:.0f} | "
            f"{r['draft_us_p95']:.0f} | {host} | {r['empty_draft_rate']:.1%} |")


TABLE_HEAD = ("| drafter | MAT | nodes/step | µs/call p50 | µs/call p95 | µs/step p50 with recycling (model loop) | "
              "empty drafts |\n|---|---|---|---|---|---|---|")
