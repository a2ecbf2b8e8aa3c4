"""Cost model and draft budget: how many draft nodes pay on this machine, step by step.

Speculation pays when the expected tokens per step divided by the cost of verifying the trees beats one token
per request per plain step. The cost of a pass is measured per (batch size, width) on the engine's own KV
(:class:`aded_ray.verify.cost.PassCost`, cached per machine, model and mode, and kept current online). The
expected accepted length of a tree truncated to its first b nodes is learnt
online from what was actually accepted: the tree is breadth-first and truncation keeps its first b nodes, so
a step that verified B nodes and accepted the path [i1 < i2 < ...] tells what every budget b <= B would have
accepted (the path entries below b).

Worked example (tests/test_budget.py): cost {1: 34, 8: 40, 64: 133} ms, 0.3 ms to draft; accepted length
0.3, 0.6, 0.8, 0.9 at budgets 1, 3, 5, 7 and 1.0 above -> committed tokens per ms: plain 1/34 = 0.029,
b=7 (8 tokens with the root) 1.9/40.3 = 0.047, b=11 2.0/46.9 = 0.043, b=63 2.0/133.3 = 0.015 -> choose 7.
"""
from __future__ import annotations

import heapq

import numpy as np

from aded_ray.verify.cost import CostCurve, PassCost

GRID = (0, 1, 3, 5, 7, 11, 15, 23, 31, 47, 63)   # draft nodes; a pass verifies nodes + 1 (the root)


class RequestAcceptance:
    """One request's own record: accepted nodes summed per grid budget, and how many steps taught each."""

    def __init__(self, grid):
        self.grid = tuple(grid)
        self.sum = np.zeros(len(self.grid))
        self.n = np.zeros(len(self.grid))


class AdaptiveBudget:
    """Chooses the draft budget that maximises expected tokens per millisecond; 0 means a plain step.

    Acceptance estimates are exponential moving averages per grid budget, shared by every request of the
    process, and each request's own mean, shrunk towards the shared estimate with the weight of ``shrink``
    steps (a code request accepts far more than a chat one: after a few steps its own record decides, while
    one lucky step cannot). Budgets above the largest verified so far are explored now and then (every
    ``explore_every`` steps one grid step up), so the estimate follows the drafter as the matrix adapts.
    """

    def __init__(self, cost: PassCost | CostCurve, *, max_nodes: int = 63, draft_ms: float = 0.3, decay: float = 0.02,
                 explore_every: int = 16, prior: float | None = None, margin: float = 0.05, shrink: float = 4.0,
                 check_every: int = 16, realized_decay: float = 0.05, max_probe_every: int = 64,
                 probe_weight: float = 0.25, prior_weight: float = 4.0, min_evidence: int = 12,
                 uniform_policy: bool = True, policy_block: int = 8, policy_every: int = 64,
                 policy_probe: int = 8, policy_decay: float = 0.05):
        self.cost = cost if isinstance(cost, PassCost) else PassCost(cost)
        self.grid = [b for b in GRID if b <= max_nodes] or [0]
        self.draft_ms = draft_ms
        self.decay = decay
        self.explore_every = explore_every
        self.margin = margin
        self.shrink = shrink
        # optimistic prior: small trees accept ~0.5 tokens, larger ones a little more, until measured
        self.acc = {b: (0.0 if b == 0 else (prior if prior is not None else 0.4 + 0.1 * np.log2(b + 1)))
                    for b in self.grid}
        self.seen = {b: 0 for b in self.grid}
        self.prior_weight = prior_weight              # the prior counts as this many observations
        self.steps = 0
        # the realized-rate check: committed tokens per ms of whole steps, plain and drafting, per batch-size
        # bucket (the bit length of the size: continuous batching moves the size by one all the time)
        self.check_every, self.realized_decay = check_every, realized_decay
        self.realized: dict[int, dict[str, list]] = {}
        # where drafting does not pay: per bucket, the step of the next probe and the interval it doubles
        self.max_probe_every = max(max_probe_every, check_every)
        self._probes: dict[int, tuple[int, int]] = {}
        self.probe_weight = probe_weight
        self.min_evidence = min_evidence              # drafting steps at a batch size before a veto there
        self._probing = False                         # the step being chosen is a probe
        # the policy check (allot, B >= 2): the model's allotment against one node for every request, by what
        # whole steps under each delivered per ms, per batch-size bucket
        self.uniform_policy = uniform_policy and len(self.grid) > 1 and self.grid[1] == 1
        self.policy_block, self.policy_every, self.policy_probe = policy_block, policy_every, policy_probe
        self.policy_decay = policy_decay
        self.policy_realized: dict[int, dict[str, list]] = {}
        self._policy_sched: dict[int, dict] = {}
        self._step_policy: tuple[int, str] | None = None
        self.last = self.best()

    def request_state(self) -> RequestAcceptance:
        return RequestAcceptance(self.grid)

    def _own(self, req):
        return req if req is not None and req.grid == tuple(self.grid) else None

    def accepted(self, b: int, req: RequestAcceptance | None = None) -> float:
        """Expected accepted nodes at budget ``b`` (for request ``req``: its own mean shrunk towards the
        shared estimate): never below a smaller budget's (a tree truncated to fewer nodes is a part of the
        larger one), so a stale or noisy estimate cannot pin the budget small."""
        req = self._own(req)
        best = 0.0
        for i, g in enumerate(self.grid):
            if g > b:
                break
            a = self.acc[g] if req is None else (req.sum[i] + self.shrink * self.acc[g]) / (req.n[i] + self.shrink)
            best = max(best, a)
        return best

    def expected_rate(self, b: int, batch: int = 1, accepted: float | None = None, reqs=None) -> float:
        """Expected committed tokens per ms at budget ``b`` for a pass carrying ``batch`` requests (with
        their acceptance records ``reqs``, one per request, when known), each padded to its root and b nodes (drafting, and
        recycling the model's predictions, run one request after another on the host; a plain step does
        neither)."""
        if accepted is not None:
            tokens = batch * (1.0 + accepted)
        elif reqs:       # one record per request; None: a request that does not speculate (its root only)
            tokens = sum(1.0 + (0.0 if r is None else self.accepted(b, r)) for r in reqs)
        else:
            tokens = batch * (1.0 + self.accepted(b))
        return tokens / (self.cost(batch, b + 1) + (batch * self.draft_ms if b else 0.0))

    def best(self, batch: int = 1, reqs=None) -> int:
        """The budget with the highest expected rate; a draft must beat plain decoding by ``margin`` (the
        estimates are noisy, and a wrong draft costs every request of the batch)."""
        rate = {g: self.expected_rate(g, batch, reqs=reqs) for g in self.grid}
        b = max(self.grid, key=rate.get)
        if b and 0 in self.grid and rate[b] < (1 + self.margin) * rate[0]:
            return 0
        return b

    def choose(self, batch: int = 1, reqs=None) -> int:
        """The budget for the next step of ``batch`` running requests (with their acceptance records
        ``reqs``): trees shrink as the batch grows, and 0 (plain decoding) wins wherever no draft pays.

        The model's choice is checked against what whole steps really delivered at this batch size (sizes
        in powers of two: 1, 2-3, 4-7, ...; :meth:`observe_step`), the plain side measured first: when drafting steps committed fewer tokens per ms than plain steps, the step
        is plain, whatever the estimates say (probes still draft now and then, so the check can change its
        mind: after ``check_every`` steps, then at doubling intervals up to ``max_probe_every``); while
        drafting wins, every ``check_every``-th step is plain, to keep the plain side of the comparison
        current."""
        self.steps += 1
        b = self.best(batch, reqs)
        if self.explore_every and self.steps % self.explore_every == 0:
            i = self.grid.index(b)
            # one grid step up, unless even a full acceptance at that budget could not pay for its pass
            # (under a large batch exploring would only slow everyone down)
            if i + 1 < len(self.grid):
                up = self.grid[i + 1]
                if self.expected_rate(up, batch, accepted=up) >= self.expected_rate(b, batch, reqs=reqs):
                    b = up
        if b > 0 and not self._gate(batch):
            b = 0
        self.last = b
        return b

    def _curves(self, reqs: list) -> list[list[float]]:
        """:meth:`accepted` at every grid budget for every request at once (rows of plain floats)."""
        shared = np.array([self.acc[g] for g in self.grid])
        own = np.array([[r.sum, r.n] if self._own(r) is not None else [np.zeros_like(shared)] * 2 for r in reqs])
        sums, ns = own[:, 0], own[:, 1]
        has = np.array([self._own(r) is not None for r in reqs])[:, None]
        a = np.where(has, (sums + self.shrink * shared) / (ns + self.shrink), shared)
        return np.maximum.accumulate(np.maximum(a, 0.0), axis=1).tolist()

    def _gate(self, batch: int) -> bool:
        """The realized-rate check for a step that would draft: may it (see :meth:`choose`)?

        Drafting is vetoed at a batch size once its steps (at least ``min_evidence`` of them, so the first
        cold steps of a fresh process cannot decide alone) delivered fewer tokens per ms than plain steps;
        a vetoed size drafts again once probes show drafting ahead of plain by ``margin`` (hysteresis: at
        parity the check does not flap)."""
        if not (self.check_every and self.realized):         # (only for a caller that reports its steps)
            return True
        plain, draft = (self.realized_rate(batch, arm) for arm in ("plain", "draft"))
        if plain is None:
            return False                              # measure the plain side first (it costs nothing)
        bucket = batch.bit_length()
        vetoed = bucket in self._probes
        evidence = self.realized[bucket]["draft"][2]
        if draft is not None and evidence >= self.min_evidence and \
                draft < (1 + (self.margin if vetoed else 0.0)) * plain:
            # drafting did not pay at this batch size: plain, but for probes, so the check can change its
            # mind; each probe that confirms it waits twice as long for the next (check_every, 2x, ... up to
            # max_probe_every steps): a probe is a step that is known to cost more than it delivers
            nxt, every = self._probes.setdefault(bucket, (self.steps + self.check_every, self.check_every))
            if self.steps < nxt:
                return False
            every = min(2 * every, self.max_probe_every)
            self._probes[bucket] = (self.steps + every, every)
            self._probing = True
            return True
        self._probes.pop(bucket, None)                # drafting pays: probes start over from check_every
        probe = (self.steps + self.check_every // 2) % self.check_every == 0   # off the exploration steps
        return not (draft is not None and probe)      # keep the plain side current

    def realized_rate(self, batch: int, arm: str) -> float | None:
        """Committed tokens per ms of the recent ``arm`` ("plain" or "draft") steps at this batch size: the
        ratio of their (exponentially decayed) sums, so a long step weighs what it cost (a mean of per-step
        rates would let many quick steps outvote a few slow ones)."""
        a = self.realized.get(batch.bit_length(), {}).get(arm)
        return a[0] / a[1] if a and a[1] > 0 else None

    def allot(self, reqs: list, caps: list[int]) -> list[int]:
        """Draft nodes for each request of the next step (``reqs``: acceptance records, ``caps``: nodes each
        may have at most), for a pass that pads nothing: the model's allotment (:meth:`allot_model`), or,
        where whole steps showed it delivers more (:meth:`policy`, two or more requests), one node for every
        request that may speculate."""
        B = len(reqs)
        policy = self.policy(B) if self._policy_checked(B) else "model"
        self._step_policy = (B, policy)
        if policy == "model":
            return self.allot_model(reqs, caps)
        ks = [1 if int(c) > 0 else 0 for c in caps]
        self.last = max(ks)
        return ks

    def _policy_checked(self, batch: int) -> bool:
        """Whether steps of ``batch`` requests choose between the two policies (:meth:`policy`) at all."""
        return self.uniform_policy and batch >= 2

    def policy(self, batch: int) -> str:
        """Which policy the next step of ``batch`` requests follows: ``"model"`` or ``"one"`` (one node for
        every request).

        Per batch-size bucket (as :meth:`realized_rate`): blocks of ``policy_block`` steps alternate
        between the two until each has ``min_evidence`` measured steps; then the one whose steps delivered
        more tokens per ms (decayed sums, ``policy_decay`` per step) runs, in blocks of ``policy_every``
        steps, each followed by ``policy_probe`` steps of the other, which keep its record current; the
        incumbent changes when the other is ahead by ``margin``. Blocks, not single steps: a policy's first
        step after the other's is not its typical step (requests left plain by the model catch up their
        drafters). Measured at 16 running requests on the 2-core Xeon (closed loop, 18 rounds): one node
        for everyone 1.10x plain decoding on the same engine (median), the model's allotment 1.03x; at 1-4
        requests the model's trees gain far more."""
        if not self.policy_realized:
            return "model"                               # (only for a caller that reports its steps)
        bucket = batch.bit_length()
        st = self._policy_sched.setdefault(bucket, {"cur": "model", "left": self.policy_block, "inc": "model"})
        if st["left"] > 0:
            st["left"] -= 1
            return st["cur"]
        rec = self.policy_realized.get(bucket, {})
        n = {p: rec[p][2] if p in rec else 0 for p in ("model", "one")}
        if min(n.values()) < self.min_evidence:            # measuring both: alternate blocks
            st["cur"] = "one" if st["cur"] == "model" else "model"
            st["left"] = self.policy_block
        else:
            rate = {p: rec[p][0] / rec[p][1] for p in ("model", "one")}
            other = "one" if st["inc"] == "model" else "model"
            if rate[other] > (1 + self.margin) * rate[st["inc"]]:
                st["inc"] = other
            if st["cur"] == st["inc"]:                     # the incumbent's block ended: probe the other
                st["cur"] = "one" if st["inc"] == "model" else "model"
                st["left"] = self.policy_probe
            else:
                st["cur"], st["left"] = st["inc"], self.policy_every
        st["left"] -= 1
        return st["cur"]

    def allot_model(self, reqs: list, caps: list[int]) -> list[int]:
        """Draft nodes for each request of the next step, for a pass that pads nothing (ragged: it costs
        what its total tokens cost): request r (acceptance record ``reqs[r]``, at most ``caps[r]`` nodes)
        gets nodes while the whole step's expected tokens per ms grow, the most promising requests first.

        Greedy over grid steps: each request's next step is the one with the most expected accepted tokens
        per added node; the best of all requests' next steps is taken when it raises the step's rate (the
        pass cost at the new total, and the host time of one more drafting request), else that request
        stops. A code request can thus draft a long chain while the chat requests beside it decode plainly.
        Exploration and the realized-rate check work as in :meth:`choose` (on the batch: any draft or none).
        """
        self.steps += 1
        B = len(reqs)
        grid = self.grid
        caps = [max(0, int(c)) for c in caps]
        ks = [0] * B
        if B == 0 or len(grid) < 2:
            return ks
        acc = self._curves(reqs)
        at = [0] * B                        # grid index per request
        total, tokens, drafting = float(B), float(B), 0

        def step_cost(t: float, d: int) -> float:
            return self.cost(B, t / B) + d * self.draft_ms

        rate = tokens / step_cost(total, 0)
        plain_rate = rate
        heap: list = []

        def push(r: int) -> None:
            i, best = at[r], None
            for j in range(i + 1, len(grid)):
                if grid[j] > caps[r]:
                    break
                eff = (acc[r][j] - acc[r][i]) / (grid[j] - grid[i])
                if best is None or eff > best[0]:
                    best = (eff, j)
            if best is not None and best[0] > 0:
                heapq.heappush(heap, (-best[0], r, best[1]))

        for r in range(B):
            if caps[r] > 0:
                push(r)
        while heap:
            _, r, j = heapq.heappop(heap)
            i = at[r]
            t2, d2 = total + grid[j] - grid[i], drafting + (i == 0)
            tok2 = tokens + acc[r][j] - acc[r][i]
            rate2 = tok2 / step_cost(t2, d2)
            if rate2 <= rate:
                continue                    # this request's next nodes do not pay: it stays where it is
            at[r], total, drafting, tokens, rate = j, t2, d2, tok2, rate2
            push(r)
        if rate < (1 + self.margin) * plain_rate:
            at = [0] * B                    # the estimates are noisy; a draft must clearly pay
        if self.explore_every and self.steps % self.explore_every == 0:
            # one grid step up for every request that may speculate, a plain one included: its estimate
            # is learnt only from its drafts, so a request that accepted nothing in its first cold steps
            # would otherwise stay plain to its end (the realized-rate check still vetoes where it does not pay)
            at = [i + 1 if i + 1 < len(grid) and grid[i + 1] <= caps[r] else i for r, i in enumerate(at)]
        ks = [grid[i] for i in at]
        if any(ks) and not self._gate(B):
            ks = [0] * B
        self.last = max(ks)
        return ks

    def observe_step(self, batch: int, drafted: bool, tokens: int, ms: float) -> None:
        """A whole step (drafting, the pass, acceptance, recycling) of ``batch`` requests committed
        ``tokens`` in ``ms``: decayed sums of tokens and ms per arm (plain or drafting) and batch size.

        A probe (a drafting step while drafting did not pay, :meth:`choose`) weighs ``probe_weight`` (as
        much as the last few steps together, where an ordinary step weighs ``realized_decay``): probes are
        rare, and a workload that changed must be noticed within a few of them."""
        probing, self._probing = self._probing, False
        policy, self._step_policy = self._step_policy, None
        if not (np.isfinite(ms) and ms > 0):
            return
        if policy is not None and policy[0] == batch and self._policy_checked(batch):
            rec = self.policy_realized.setdefault(batch.bit_length(), {}).setdefault(policy[1], [0.0] * 3)
            rec[0] = (1.0 - self.policy_decay) * rec[0] + tokens
            rec[1] = (1.0 - self.policy_decay) * rec[1] + ms
            rec[2] += 1
            if policy[1] != "model":
                return                            # the realized-rate check judges the model's steps only
        arm = self.realized.setdefault(batch.bit_length(), {"plain": [0.0] * 3, "draft": [0.0] * 3})[
            "draft" if drafted else "plain"]
        keep = 1.0 - (self.probe_weight if probing and drafted else self.realized_decay)
        arm[0] = keep * arm[0] + tokens
        arm[1] = keep * arm[1] + ms
        arm[2] += 1                               # how many steps it has seen (the check's evidence)

    def observe_draft(self, ms_per_request: float, rate: float = 0.05) -> None:
        """Host time a drafting step adds per request (observe, draft, recycle), measured (it grows with
        the drafter's state)."""
        if np.isfinite(ms_per_request) and ms_per_request >= 0:
            self.draft_ms += rate * (ms_per_request - self.draft_ms)

    def observe(self, budget: int, n_nodes: int, path: list[int], req: RequestAcceptance | None = None) -> None:
        """Record a verified step drafted with ``budget``: accepted node indices ``path`` (increasing), in
        the shared estimates and in the request's own record ``req``.

        For every grid budget b <= ``budget`` the same tree truncated to b nodes would have accepted the
        path entries below b. When the drafter returned fewer nodes than it was allowed (it ran out of
        candidates), a larger budget would have drafted the same tree: every larger b learns the same count.
        """
        p = np.asarray(path, np.int64)
        req = self._own(req)
        for i, b in enumerate(self.grid):
            if b == 0 or (b > budget and n_nodes >= budget):
                continue                 # (a drafter with nothing to propose teaches every b: 0 accepted)
            got = int(np.sum(p < b))
            # the mean of the prior (worth prior_weight observations) and the observations, until it
            # becomes an exponential average: one cold first step does not erase the prior
            w = max(self.decay, 1.0 / (self.seen[b] + 1 + self.prior_weight))
            self.acc[b] += w * (got - self.acc[b])
            self.seen[b] += 1
            if req is not None:
                req.sum[i] += got
                req.n[i] += 1

    def observe_cost(self, batch: int, width: int, ms: float) -> None:
        self.cost.observe(batch, width, ms)

    def snapshot(self) -> dict:
        return {"best": self.best(), "acc": {b: round(a, 3) for b, a in self.acc.items()},
                "cost_ms": self.cost.to_dict()}
