"""Cost model and draft budget: how many draft nodes pay on this machine, step by step.

Speculation pays when the expected tokens per step divided by the cost of verifying the tree beats one token
per plain step. The cost of a k-token pass is a measured curve (ms per forward of k new tokens, cached per
machine, model and mode). The expected accepted length of a tree truncated to its first b nodes is learnt
online from what was actually accepted: the tree is breadth-first and truncation keeps its first b nodes, so
a step that verified B nodes and accepted the path [i1 < i2 < ...] tells what every budget b <= B would have
accepted (the path entries below b).

Worked example (tests/test_budget.py): cost {1: 34, 8: 40, 64: 133} ms, 0.3 ms to draft; accepted length
0.3, 0.6, 0.8, 0.9 at budgets 1, 3, 5, 7 and 1.0 above -> committed tokens per ms: plain 1/34 = 0.029,
b=7 (8 tokens with the root) 1.9/40.3 = 0.047, b=11 2.0/46.9 = 0.043, b=63 2.0/133.3 = 0.015 -> choose 7.
"""
from __future__ import annotations

import hashlib
import json
import platform
import time
from pathlib import Path

import numpy as np

GRID = (0, 1, 3, 5, 7, 11, 15, 23, 31, 47, 63)   # draft nodes; a pass verifies nodes + 1 (the root)


class CostCurve:
    """ms per forward pass of k new tokens, interpolated linearly between measured points."""

    def __init__(self, ms_by_k: dict[int, float]):
        if not ms_by_k or 1 not in ms_by_k:
            raise ValueError(f"a cost curve needs at least k=1, got {ms_by_k}")
        self.ks = np.array(sorted(int(k) for k in ms_by_k), float)
        self.ms = np.array([float(ms_by_k[k]) for k in sorted(ms_by_k, key=int)], float)
        self._monotone()

    def _monotone(self) -> None:
        """A bigger pass never costs less: each point is capped by every larger pass's cost (a noise spike
        at one point is cut down, instead of being carried up to every larger point)."""
        self.ms = np.minimum.accumulate(self.ms[::-1])[::-1].copy()

    def __call__(self, k: int) -> float:
        """ms of a pass of ``k`` tokens: interpolated; past the last measured point, proportional to k (a
        pass never gets cheaper per token than the largest one measured)."""
        if k > self.ks[-1]:
            return float(self.ms[-1] * k / self.ks[-1])
        return float(np.interp(k, self.ks, self.ms))

    def observe(self, k: int, ms: float, rate: float = 0.05) -> None:
        """Blend a measured pass of k tokens into the nearest point of the curve, and move the whole curve's
        level a little towards it (load and context length drift for every pass size alike: a start-up
        measurement taken under load must not stick, also at sizes the budget no longer visits)."""
        if not (np.isfinite(ms) and ms > 0):
            return
        ratio = ms / max(self(k), 1e-9)
        i = int(np.argmin(np.abs(np.log(self.ks) - np.log(max(k, 1)))))
        self.ms *= ratio ** rate                         # the level: every size alike
        scaled = ms * self.ms[i] / max(self(k), 1e-9)   # the shape, slowly: the observation at the grid point
        self.ms[i] += rate / 2 * (scaled - self.ms[i])
        self._monotone()

    def to_dict(self) -> dict[int, float]:
        return {int(k): float(m) for k, m in zip(self.ks, self.ms)}


class AdaptiveBudget:
    """Chooses the draft budget that maximises expected tokens per millisecond; 0 means a plain step.

    Acceptance estimates are exponential moving averages per grid budget, shared by every request of the
    process. Budgets above the largest verified so far are explored now and then (every ``explore_every``
    steps one grid step up), so the estimate follows the drafter as the matrix adapts.
    """

    def __init__(self, cost: CostCurve, *, max_nodes: int = 63, draft_ms: float = 0.3, decay: float = 0.02,
                 explore_every: int = 16, prior: float | None = None, margin: float = 0.05):
        self.cost = cost
        self.grid = [b for b in GRID if b <= max_nodes] or [0]
        self.draft_ms = draft_ms
        self.decay = decay
        self.explore_every = explore_every
        self.margin = margin
        # optimistic prior: small trees accept ~0.5 tokens, larger ones a little more, until measured
        self.acc = {b: (0.0 if b == 0 else (prior if prior is not None else 0.4 + 0.1 * np.log2(b + 1)))
                    for b in self.grid}
        self.seen = {b: 0 for b in self.grid}
        self.steps = 0
        self.last = self.best()

    def accepted(self, b: int) -> float:
        """Expected accepted nodes at budget ``b``: never below a smaller budget's (a tree truncated to fewer
        nodes is a part of the larger one), so a stale or noisy estimate cannot pin the budget small."""
        return max(self.acc[g] for g in self.grid if g <= b)

    def expected_rate(self, b: int, batch: int = 1, accepted: float | None = None) -> float:
        """Expected committed tokens per ms at budget ``b`` for a pass carrying ``batch`` requests (each
        with its root and b nodes: ``batch * (b + 1)`` tokens; drafting runs one request after another)."""
        acc = self.accepted(b) if accepted is None else accepted
        return batch * (1.0 + acc) / (self.cost(batch * (b + 1)) + (batch * self.draft_ms if b else 0.0))

    def best(self, batch: int = 1) -> int:
        """The budget with the highest expected rate; a draft must beat plain decoding by ``margin`` (the
        estimates are noisy, and a wrong draft costs every request of the batch)."""
        b = max(self.grid, key=lambda g: self.expected_rate(g, batch))
        if b and 0 in self.grid and self.expected_rate(b, batch) < (1 + self.margin) * self.expected_rate(0, batch):
            return 0
        return b

    def choose(self, batch: int = 1) -> int:
        """The budget for the next step of ``batch`` running requests: trees shrink as the batch grows, and
        0 (plain decoding) wins wherever no draft pays."""
        self.steps += 1
        b = self.best(batch)
        if self.explore_every and self.steps % self.explore_every == 0:
            i = self.grid.index(b)
            # one grid step up, unless even a full acceptance at that budget could not pay for its pass
            # (under a large batch exploring would only slow everyone down)
            if i + 1 < len(self.grid):
                up = self.grid[i + 1]
                if self.expected_rate(up, batch, accepted=up) >= self.expected_rate(b, batch):
                    b = up
        self.last = b
        return b

    def observe_draft(self, ms_per_request: float, rate: float = 0.05) -> None:
        """Drafting time of one request's tree, measured (it grows with the drafter's state)."""
        if np.isfinite(ms_per_request) and ms_per_request >= 0:
            self.draft_ms += rate * (ms_per_request - self.draft_ms)

    def observe(self, budget: int, n_nodes: int, path: list[int]) -> None:
        """Record a verified step drafted with ``budget``: accepted node indices ``path`` (increasing).

        For every grid budget b <= ``budget`` the same tree truncated to b nodes would have accepted the
        path entries below b. When the drafter returned fewer nodes than it was allowed (it ran out of
        candidates), a larger budget would have drafted the same tree: every larger b learns the same count.
        """
        p = np.asarray(path, np.int64)
        for b in self.grid:
            if b == 0 or (b > budget and n_nodes >= budget):
                continue                 # (a drafter with nothing to propose teaches every b: 0 accepted)
            got = int(np.sum(p < b))
            self.acc[b] += self.decay * (got - self.acc[b]) if self.seen[b] else (got - self.acc[b])
            self.seen[b] += 1

    def observe_cost(self, n_tokens: int, ms: float) -> None:
        self.cost.observe(n_tokens, ms)

    def snapshot(self) -> dict:
        return {"best": self.best(), "acc": {b: round(a, 3) for b, a in self.acc.items()},
                "cost_ms": self.cost.to_dict()}


def machine_key() -> str:
    """CPU model, instruction-set flags and thread count: cost curves are per machine kind."""
    import torch

    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "model name")):
                flags += line
    except OSError:
        flags = platform.processor()
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
    raw = f"{flags}|{dev}|threads={torch.get_num_threads()}|torch={torch.__version__}"
    return hashlib.sha256(raw.encode()).hexdigest()[:12]


def sync(verifier) -> None:
    """Wait for the verifier's device: CUDA calls return before the GPU has finished."""
    import torch

    dev = getattr(verifier, "device", None)
    if dev is not None and torch.device(dev).type == "cuda":
        torch.cuda.synchronize(dev)


BATCH_KS = (1, 2, 4, 8, 16, 32, 64, 128, 256)   # total tokens of a batched pass (proportional beyond)


def measure_cost_curve(model, ks=BATCH_KS, cache_len: int = 128, reps: int = 3) -> CostCurve:
    """Median ms of a k-token tree pass (a chain) over a ``cache_len``-token prefix, for each k.

    ``model`` is a model or a verifier factory (e.g. a tensor-parallel group's)."""
    import torch

    from aded_ray.draft.tree import DraftTree
    from aded_ray.verify.modes import verifier_factory

    v = verifier_factory(model)()
    widths = getattr(v, "widths", ())
    ks = [k for k in ks if not widths or k <= max(widths)]
    vocab = min(30000, getattr(getattr(getattr(v, "model", None), "config", None), "vocab_size", 30000))
    ids = [(1000 + 13 * i) % vocab for i in range(cache_len)]
    ts = {k: [] for k in ks}
    with torch.inference_mode():
        v.prefill(ids)
        v.forward_tree(5, DraftTree())  # warm-up
        v.commit([])
        for _ in range(reps):  # noqa: B007           # rounds over every k: a burst of load hits all sizes alike
            for k in ks:
                tree = DraftTree(np.arange(2000, 2000 + k - 1) % vocab, np.arange(-1, k - 2))
                sync(v)
                t = time.perf_counter()
                v.forward_tree(5, tree)
                sync(v)
                ts[k].append(time.perf_counter() - t)
                v.commit([])  # drop the step: the prefix stays cache_len long
    out = {k: round(1000 * float(np.median(x)), 2) for k, x in ts.items()}
    return CostCurve(out)


def cached_cost_curve(model, model_id: str, mode: str, cache_dir: Path, refresh: bool = False,
                      tolerance: float = 0.15) -> CostCurve:
    """The cost curve for (machine, model, mode) from ``cache_dir``, measured once (~5 s) if missing.

    A cached curve is checked at start-up with two quick passes (k=1 and k=8, ~0.5 s); when either is off by
    more than ``tolerance`` (the cache was measured under load, or the machine changed) the whole curve is
    measured again and the cache rewritten.
    """
    f = Path(cache_dir) / f"cost-{machine_key()}-{hashlib.sha256(model_id.encode()).hexdigest()[:8]}-{mode}.json"
    if f.is_file() and not refresh:
        cached = CostCurve({int(k): v for k, v in json.loads(f.read_text())["ms"].items()})
        probe = measure_cost_curve(model, ks=(1, 8), reps=5).to_dict()
        if all(abs(probe[k] - cached(k)) <= tolerance * cached(k) for k in probe):
            return cached
    curve = measure_cost_curve(model)
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps({"model": model_id, "mode": mode, "ms": curve.to_dict()}))
    return curve
