"""The decode step, end to end. Read this file to know what one speculative step does.

    logits = prefill(prompt)                        # KV = prompt
    root   = pick(logits); emit root                # argmax, or a sample of the target distribution
    loop (step_batch: every running request at once, one forward pass):
        drafter.observe(committed)                  # 1. adaptive update (verified tokens only)
        k    = budget.allot(requests)               # 2. draft budget per request from the cost model (0 = plain)
        tree = drafter.draft(committed, k)          # 3. draft tree below root, per request  [CPU, µs]
                                                    #    (1 + 3 in one call: drafter.observe_draft)
        logits = kv.forward_trees(roots, trees)     # 4. one forward over every root + tree   [model, ms]
        choices = reduce(logits)                    # 5. on the device: the target's token per row
        path, bonus = walk(tree, choices)           #    longest agreeing path; the bonus token
        kv.commit([root] + path)                    # 6. KV keeps root + accepted nodes only
        drafter.observe_tree_logits(tree, top-k)    #    the model's predictions at every node, recycled
        emit path + [bonus]; root = bonus           #    (stop at EOS / max_new_tokens)

:func:`generate_ids` runs one request through one verifier with the same step (a batch of one).
The drafter, the verifier and the budget are the protocols of :mod:`aded_ray.interfaces`.

Devices: the verifier's logits stay on the model's device. Each step reduces them there (the target's choice
per row, and the top-k the drafter recycles) and copies only those few numbers to the host, once
(:func:`aded_ray.verify.accept.reduce_batch`; float32 logits on a CPU: one numba kernel,
:mod:`aded_ray.verify.host_topk`, ~3-4x faster there than torch's reductions); sampling draws with per-position counter-based uniforms, so a
seeded request needs no generator on any device and samples the same tokens with or without speculation.
"""
from __future__ import annotations

import secrets
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Iterator

import numpy as np

from aded_ray.draft.recycle import tree_contexts
from aded_ray.draft.tree import DraftTree
from aded_ray.interfaces import Budget, Drafter, Verifier
from aded_ray.verify.accept import RowChoices, SamplingParams, reduce_batch, reduce_rows, row_depths, walk


RECYCLE_K = 8


def recycle_predictions(drafter, committed: list[int], tree: DraftTree, rows: RowChoices) -> None:
    """Hand the model's top-k next tokens at the root (``committed[-1]``) and at every node (row i is the
    root for i = 0, node i - 1 after) to the drafter, keyed by each position's last two tokens: in one call
    with the tree (``observe_tree_logits``) when the drafter has it, else as context arrays
    (``observe_logits``). On the critical path of every step, after the forward pass has flushed the caches:
    the tree form builds no array (model loop, AMD EPYC: 36-42 µs p50 against 151-180 µs for the array form;
    README)."""
    root = committed[-1]
    before_root = committed[-2] if len(committed) > 1 else -1
    fast = getattr(drafter, "observe_tree_logits", None)
    if fast is not None:
        fast(before_root, root, tree.tokens, tree.parents, rows.top_ids, rows.top_p)
        return
    prev, toks = tree_contexts(before_root, root, tree.tokens, tree.parents)
    drafter.observe_logits(prev, toks, rows.top_ids, rows.top_p)


@dataclass
class GenerationStats:
    """Per-request statistics (vLLM's meanings: drafts = steps that drafted, acceptance per draft token)."""

    prompt_tokens: int = 0
    steps: int = 0
    emitted: int = 0
    drafts: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    finish_reason: str | None = None
    ended_on_root: bool = False     # the last token was a root (first token or a bonus), never verified below

    @property
    def mat(self) -> float:
        """Mean tokens committed per verification step (root + accepted)."""
        return self.emitted / max(self.steps, 1)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / max(self.draft_tokens, 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(mat=round(self.mat, 4), acceptance_rate=round(self.acceptance_rate, 4))
        return d


class NoDraft:
    """Plain decoding through the same loop: every step verifies the root alone."""

    def observe(self, seq) -> None:
        pass

    def draft(self, seq, max_nodes: int | None = None) -> DraftTree:
        return DraftTree()


class FixedBudget:
    def __init__(self, k: int = 64):
        self.k = k

    def choose(self, batch: int = 1, reqs=None) -> int:
        return self.k

    def allot(self, reqs: list, caps: list[int]) -> list[int]:
        b = self.choose(len(caps), reqs)
        return [min(b, int(c)) for c in caps]

    def observe(self, budget: int, n_nodes: int, path: list[int], req=None) -> None:
        pass

    def observe_cost(self, batch: int, width: int, ms: float) -> None:
        pass


def generate_ids(verifier: Verifier, drafter: Drafter, prompt_ids, *, max_new_tokens: int,
                 sampling: SamplingParams = SamplingParams(), eos_ids=(), budget: Budget | None = None,
                 stats: GenerationStats | None = None) -> Iterator[list[int]]:
    """One request through one verifier: yield lists of newly committed token ids until EOS or
    ``max_new_tokens`` (the first root after the prefill, then each step's accepted nodes and bonus).

    The same step as the scheduler's (:func:`step_batch` with a batch of one). EOS tokens are yielded (the
    caller decides whether to show them); ``stats.finish_reason`` is ``"stop"`` after EOS and ``"length"``
    after ``max_new_tokens``. Closing the generator stops decoding at once. An unseeded sampling request
    draws its seed here (fresh per request).
    """
    from aded_ray.verify.batch import SerialKV

    stats = stats if stats is not None else GenerationStats()
    budget = budget if budget is not None else FixedBudget()
    if not sampling.greedy and sampling.seed is None:
        sampling = replace(sampling, seed=secrets.randbits(63))
    top_k = RECYCLE_K if hasattr(drafter, "observe_logits") else 0
    st = RequestState(list(prompt_ids), max_new_tokens, sampling, frozenset(int(e) for e in eos_ids), drafter,
                      1 << 20, stats)
    stats.prompt_tokens = len(st.prompt_ids)
    kv = SerialKV(lambda: verifier)
    kv.add_slot()
    t0 = time.perf_counter()
    rows = reduce_rows(kv.prefill(0, st.prompt_ids), sampling, positions=[0], top_k=top_k)
    stats.prefill_s = time.perf_counter() - t0
    yield st.start(rows)
    try:
        while st.finish is None:
            yield step_batch(kv, [st], budget, top_k)[0]
    finally:
        catch_up(st)                 # the drafter learns from the deferred (plain) steps too


# ---- the same step for many requests at once (the scheduler's; aded_ray/scheduler.py) -----------------
@dataclass
class RequestState:
    """One running request inside the batched loop."""

    prompt_ids: list
    max_new_tokens: int
    sampling: SamplingParams
    eos: frozenset
    drafter: Drafter                  # its own session of the process drafter (or a plain NoDraft)
    max_nodes: int                    # its cap on tree size (0: never speculate)
    stats: GenerationStats
    committed: list = None
    unobserved: list = field(default_factory=list)   # committed lengths at plain steps, not yet observed
    root: int = -1
    accept: object = None             # the budget's record of this request's acceptance
    produced: int = 0
    finish: str | None = None

    def start(self, rows: RowChoices) -> list[int]:
        """The prompt is in the cache and ``rows`` decided its first token: commit (and emit) it as the
        first root. Each step then emits the accepted nodes and the bonus, the next root, at once."""
        self.committed = [int(t) for t in self.prompt_ids]
        if hasattr(self.drafter, "observe_logits"):
            recycle_predictions(self.drafter, self.committed, DraftTree(), rows)
        self.root = int(rows.tokens[0])
        return self._emit([self.root])

    def _emit(self, tokens: list[int]) -> list[int]:
        """Commit ``tokens`` (accepted nodes, then the next root) up to EOS or the limit; the emitted ones."""
        out = []
        for i, t in enumerate(tokens):
            self.committed.append(t)
            self.produced += 1
            self.stats.emitted += 1
            out.append(t)
            if t in self.eos or self.produced >= self.max_new_tokens:
                self.finish = "stop" if t in self.eos else "length"
                self.stats.finish_reason = self.finish
                self.stats.ended_on_root = i == len(tokens) - 1
                break
        return out


def catch_up(st: RequestState) -> np.ndarray:
    """Replay the request's deferred observations (one per plain step, the committed prefix at that step)
    on its drafter, in order; returns the committed tokens as an array."""
    seq = np.asarray(st.committed, np.int32)
    for n in st.unobserved:
        st.drafter.observe(seq[:n])
    st.unobserved.clear()
    return seq


def step_batch(kv, states: list[RequestState], budget: Budget, top_k: int = RECYCLE_K,
               prefill=None) -> list[list[int]]:
    """One speculative step for every running request (slot r = ``states[r]``), one forward pass in all:
    draft per request (budget chosen for the batch size, capped per request), verify all trees together,
    accept per request, compact each request's KV, recycle. Returns the tokens each request emitted.

    ``prefill`` (a :class:`aded_ray.verify.batch.PrefillChunk`): a newcomer's next prompt tokens ride in the
    same pass (slot ``len(states)``); such a step teaches the budget nothing about pass costs or step rates.

    When the budget chooses a plain step (0 nodes) nothing runs on the drafter's side: no draft, no top-k
    of the logits, no recycling, and its observation of the step is deferred (:func:`catch_up`: replayed in
    order before the request's next draft or when it ends), so such a step costs what a plain engine's step
    costs while the drafter learns exactly what it would have learnt step by step."""
    t0 = time.perf_counter()
    make = getattr(budget, "request_state", None)
    for st in states:
        if st.accept is None and make is not None and st.max_nodes > 0:
            st.accept = make()
    reqs = [st.accept for st in states]
    if getattr(kv, "layout", "ragged") == "ragged" and hasattr(budget, "allot"):
        ks = budget.allot(reqs, [st.max_nodes for st in states])     # per request: a pass pads nothing
    else:
        b = budget.choose(len(states), reqs)                          # one budget: every request padded to it
        ks = [min(b, st.max_nodes) for st in states]
    drafting = any(ks)
    trees = []
    host = 0.0                               # drafter-side host time of the drafting requests (s)
    owed = 0.0                               # replaying deferred observations: owed by earlier plain steps
    for st, k in zip(states, ks):
        if k > 0:
            h0 = time.perf_counter()
            seq = catch_up(st)
            h1 = time.perf_counter()
            owed += h1 - h0
            h0 = h1
            both = getattr(st.drafter, "observe_draft", None)      # one call (StepDrafter) when it has it
            if both is not None:
                trees.append(both(seq, k))
            else:
                st.drafter.observe(seq)
                trees.append(st.drafter.draft(seq, k))
            host += time.perf_counter() - h0
        else:
            if st.max_nodes > 0:             # observed later, in the same order (catch_up)
                st.unobserved.append(len(st.committed))
            trees.append(DraftTree())
    t1 = time.perf_counter()
    roots = [st.root for st in states]
    logits = kv.forward_trees(roots, trees) if prefill is None else kv.forward_trees(roots, trees, prefill=prefill)
    counts = [len(t) + 1 for t in trees]
    rows = reduce_batch(logits, [st.sampling for st in states],
                        [st.produced + row_depths(t) for st, t in zip(states, trees)], counts,
                        top_k=top_k if drafting else 0, top_k_for=[k > 0 for k in ks])   # only what is recycled
    width = logits.shape[0] / len(states)    # tokens per request, on average (the ragged layout pads nothing)
    del logits
    walks = [walk(t, r.tokens) for t, r in zip(trees, rows)]
    kv.commit([[0] + [i + 1 for i in path] for path, _ in walks])
    t2 = time.perf_counter()
    if prefill is None:
        budget.observe_cost(len(states), width, 1000 * (t2 - t1))
    out = []
    for st, k, tree, r, (path, bonus) in zip(states, ks, trees, rows, walks):
        if k > 0 and top_k and hasattr(st.drafter, "observe_logits"):
            h0 = time.perf_counter()
            recycle_predictions(st.drafter, st.committed, tree, r)
            host += time.perf_counter() - h0
        s = st.stats
        s.steps += 1
        s.draft_s += (t1 - t0) / len(states)
        s.verify_s += t2 - t1
        if len(tree):
            s.drafts += 1
            s.draft_tokens += len(tree)
            s.accepted_tokens += len(path)
        if k > 0:                           # an empty draft teaches the budget too (nothing accepted)
            ranks = tree.ranks()
            budget.observe(k, len(tree), [int(ranks[i]) for i in path], st.accept)
        out.append(st._emit([int(tree.tokens[i]) for i in path] + [bonus]))   # the bonus: the next root
        st.root = bonus
    t3 = time.perf_counter()
    if drafting and hasattr(budget, "observe_draft"):      # host time of drafting + recycling, per drafting request
        budget.observe_draft(1000 * host / sum(k > 0 for k in ks))
    if hasattr(budget, "observe_step"):                    # what the whole step delivered (less what it owed)
        ms = 1000 * (t3 - t0 - owed) if prefill is None else float("nan")      # nan: not a step's rate
        budget.observe_step(len(states), drafting, sum(len(o) for o in out), ms)
    return out
