"""What a verification pass costs: measured per (batch, width), cached per machine, kept current online.

A pass carries ``batch`` running requests, each padded to ``width`` tokens (its root and draft tree). On a GPU
a pass costs about the same for 1 and 128 tokens; on these CPUs a 64-token pass costs ~3x a 1-token one, and a
batched pass of 8 requests x 2 tokens costs more than one request's 16-token pass (8 separate KV prefixes,
per-request masks). So the budget plans with the cost of the pass it will really run: a table over
(batch, width) measured on the replica's own batched KV (:class:`aded_ray.verify.batch.BatchKV`), not a curve
over total tokens measured on single requests.

- :class:`CostCurve`: ms of a pass of ``k`` tokens for one batch size; linear between points, monotone (a
  spike at one point is capped by the larger passes), proportional past the last point.
- :class:`PassCost`: one curve per measured batch size; linear between batch sizes, proportional past the
  largest (more requests than measured cost at least proportionally more: that is how a serial verifier, e.g.
  a tensor-parallel group, behaves, and where only batch 1 is measured that is the model). Fixed pass widths
  (``widths``) round every width up, as the pass does.
- Online: every pass's measured time moves the whole table's level a little (load and context length drift
  for every shape alike) and the nearest point's shape more slowly.

Worked example (tests/test_cost.py): {1: {1: 30, 8: 40}, 4: {1: 40, 8: 100}} -> cost(1, 4) = 34.3,
cost(2, 1) = 33.3 (between batch 1 and 4), cost(8, 8) = 200 (twice batch 4's).
"""
from __future__ import annotations

import hashlib
import json
import platform
import time
from pathlib import Path

import numpy as np


class CostCurve:
    """ms per forward pass of k new tokens, interpolated linearly between measured points."""

    def __init__(self, ms_by_k: dict[int, float]):
        if not ms_by_k or 1 not in {int(k) for k in ms_by_k}:
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

    def scale(self, factor: float) -> None:
        self.ms *= factor

    def nudge(self, k: int, ms: float, rate: float) -> None:
        """Move the grid point nearest to ``k`` towards what a pass of k tokens measured (scaled to the point)."""
        i = int(np.argmin(np.abs(np.log(self.ks) - np.log(max(k, 1)))))
        scaled = ms * self.ms[i] / max(self(k), 1e-9)
        self.ms[i] += rate * (scaled - self.ms[i])
        self._monotone()

    def observe(self, k: int, ms: float, rate: float = 0.05) -> None:
        """Blend a measured pass of k tokens in: the whole curve's level a little (load and context length
        drift for every pass size alike: a start-up measurement taken under load must not stick, also at
        sizes the budget no longer visits), and the nearest point's shape half as fast."""
        if not (np.isfinite(ms) and ms > 0):
            return
        self.scale((ms / max(self(k), 1e-9)) ** rate)
        self.nudge(k, ms, rate / 2)

    def to_dict(self) -> dict[int, float]:
        return {int(k): round(float(m), 3) for k, m in zip(self.ks, self.ms)}


class PassCost:
    """ms of a verification pass of ``batch`` requests x ``width`` tokens: one :class:`CostCurve` over the
    width per measured batch size (batch 1 required)."""

    def __init__(self, table: dict[int, dict[int, float]] | CostCurve, widths=()):
        if isinstance(table, CostCurve):
            table = {1: table.to_dict()}
        if 1 not in {int(b) for b in table}:
            raise ValueError(f"a pass-cost table needs batch 1, got batches {sorted(table)}")
        self.batches = sorted(int(b) for b in table)
        self.curves = {int(b): c if isinstance(c, CostCurve) else CostCurve({int(k): v for k, v in c.items()})
                       for b, c in table.items()}
        self.widths = tuple(sorted(int(w) for w in widths))
        # compiled batched passes (:mod:`aded_ray.verify.compiled_batch`): a pass of T = batch x width tokens
        # costs the pass of its token bucket, so a tree that pushes a pass over a bucket's edge pays the next
        # bucket's whole pass (set by the engine; passes above the largest bucket run eager: no rounding)
        self.token_buckets: tuple[int, ...] = ()

    def padded(self, width: int, batch: int = 1) -> float:
        """The width a pass of ``batch`` requests x ``width`` tokens really costs: the fixed width that holds
        it, or the token bucket that holds ``batch x width`` (spread over the batch)."""
        width = next((w for w in self.widths if w >= width), width)
        bucket = next((b for b in self.token_buckets if b >= batch * width), None)
        return width if bucket is None else bucket / batch

    def __call__(self, batch: int, width: int) -> float:
        batch = max(int(batch), 1)
        width = self.padded(max(float(width), 1.0), batch)
        bs = self.batches
        if batch >= bs[-1]:
            return self.curves[bs[-1]](width) * batch / bs[-1]
        hi = next(b for b in bs if b >= batch)
        if hi == batch:
            return self.curves[hi](width)
        lo = max(b for b in bs if b < batch)
        f = (batch - lo) / (hi - lo)
        return (1 - f) * self.curves[lo](width) + f * self.curves[hi](width)

    def observe(self, batch: int, width: int, ms: float, rate: float = 0.05) -> None:
        """A pass of ``batch`` x ``width`` took ``ms``: every curve's level moves a little towards it, the
        nearest measured batch size's nearest width point (shape) half as fast."""
        if not (np.isfinite(ms) and ms > 0):
            return
        width = self.padded(max(float(width), 1.0), max(int(batch), 1))
        ratio = ms / max(self(batch, width), 1e-9)
        for c in self.curves.values():
            c.scale(ratio ** rate)
        near = min(self.batches, key=lambda b: abs(np.log(b) - np.log(max(batch, 1))))
        self.curves[near].nudge(width, ms * self(near, width) / max(self(batch, width), 1e-9), rate / 2)

    def to_dict(self) -> dict[int, dict[int, float]]:
        return {b: self.curves[b].to_dict() for b in self.batches}


# ---- measurement ----------------------------------------------------------------------------------------
def sync(device) -> None:
    """Wait for ``device``: CUDA calls return before the GPU has finished."""
    import torch

    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _vocab(model) -> int:
    return min(30000, getattr(getattr(model, "config", None), "vocab_size", 30000))


def _chain(k: int, vocab: int, offset: int = 0):
    from aded_ray.draft.tree import DraftTree

    return DraftTree((np.arange(2000, 2000 + k - 1) + offset) % vocab, np.arange(-1, k - 2))


BATCH_KS = (1, 2, 4, 8, 16, 32, 64, 128, 256)   # tokens of a single-request pass (proportional beyond)


def measure_cost_curve(model, ks=BATCH_KS, cache_len: int = 128, reps: int = 3) -> CostCurve:
    """Median ms of a k-token tree pass (a chain) over a ``cache_len``-token prefix, for each k, through one
    single-request verifier. ``model`` is a model or a verifier factory (e.g. a tensor-parallel group's)."""
    import torch

    from aded_ray.verify.modes import verifier_factory

    v = verifier_factory(model)()
    widths = getattr(v, "widths", ())
    ks = [k for k in ks if not widths or k <= max(widths)]
    vocab = _vocab(getattr(v, "model", None))
    ids = [(1000 + 13 * i) % vocab for i in range(cache_len)]
    dev = getattr(v, "device", None)
    ts = {k: [] for k in ks}
    with torch.inference_mode():
        v.prefill(ids)
        v.forward_tree(5, _chain(1, vocab))  # warm-up
        v.commit([])
        for _ in range(reps):  # noqa: B007           # rounds over every k: a burst of load hits all sizes alike
            for k in ks:
                tree = _chain(k, vocab)
                sync(dev)
                t = time.perf_counter()
                v.forward_tree(5, tree)
                sync(dev)
                ts[k].append(time.perf_counter() - t)
                v.commit([])  # drop the step: the prefix stays cache_len long
    return CostCurve({k: round(1000 * float(np.median(x)), 2) for k, x in ts.items()})


def pass_grid(max_batch: int, max_width: int, widths=(), max_tokens: int = 256) -> dict[int, list[int]]:
    """The (batch, width) points measured: batches 1, 2, 4, ... up to ``max_batch``; widths 1, 2, 4, ... up
    to ``max_width`` (or the fixed ``widths``), as long as batch x width <= ``max_tokens`` (at least width 1
    and 2 for every batch: the choice between a plain step and the smallest draft is always measured)."""
    bs = [1 << i for i in range(max(int(max_batch), 1).bit_length()) if 1 << i <= max_batch]
    ws = list(widths) if widths else [1 << i for i in range(max(int(max_width), 1).bit_length())
                                      if 1 << i <= max_width]
    return {b: [w for w in ws if b * w <= max_tokens or (not widths and w <= 2) or w == ws[0]] for b in bs}


def measure_pass_cost(kv_factory, grid: dict[int, list[int]], cache_len: int = 128, reps: int = 3,
                      widths=()) -> PassCost:
    """Median ms of batched passes through a fresh KV of the engine's kind (``kv_factory()``, e.g. a
    :class:`~aded_ray.verify.batch.BatchKV`): ``batch`` requests with different ``cache_len``-ish prefixes,
    each carrying a chain of ``width`` tokens, for every point of ``grid`` ({batch: [widths]}). Rounds over
    all points, so a burst of load hits every shape alike; nothing is committed."""
    import torch

    kv = kv_factory()
    vocab = _vocab(getattr(kv, "model", None))
    dev = getattr(kv, "device", None)
    B = max(grid)
    ts = {(b, w): [] for b, ws in grid.items() for w in ws}
    with torch.inference_mode():
        for s in range(B):
            kv.add_slot()
            n = cache_len + 7 * (s % 5)            # prefixes of different lengths, as in a real batch
            kv.prefill(s, [(1000 + 13 * i + s) % vocab for i in range(n)])
        kv.forward_trees([5], [_chain(2, vocab)])   # warm-up
        for _ in range(reps):  # noqa: B007
            for (b, w) in ts:
                trees = [_chain(w, vocab, r) for r in range(b)]
                sync(dev)
                t = time.perf_counter()
                kv.forward_trees([5] * b, trees)
                sync(dev)
                ts[(b, w)].append(time.perf_counter() - t)
    table: dict[int, dict[int, float]] = {}
    for (b, w), x in ts.items():
        table.setdefault(b, {})[w] = round(1000 * float(np.median(x)), 2)
    return PassCost(table, widths)


def machine_key() -> str:
    """CPU model, instruction-set flags and thread count: cost tables are per machine kind."""
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


def probe_ratio(seen: PassCost, cached: PassCost) -> float:
    """The median over the probe's points of (probed ms / cached ms): how far the machine now is from the
    cached table's level, robust to one noisy point (inf where the cache holds no positive number there)."""
    def ratio(b: int, w: int, ms: float) -> float:
        c = cached(b, w)
        return ms / c if np.isfinite(c) and c > 0 else float("inf")

    return float(np.median([ratio(b, w, ms) for b, ws in seen.to_dict().items() for w, ms in ws.items()]))


def cached_pass_cost(measure, probe, key: str, cache_dir: Path, refresh: bool = False,
                     factor: float = 2.0) -> PassCost:
    """The pass-cost table for ``key`` (model, mode, KV kind, grid) on this machine from ``cache_dir``,
    measured once with ``measure()`` if missing.

    A cached table is checked at start-up with ``probe()`` (a few quick points, a {batch: {width: ms}}
    table): when the median of the probed / cached ratios (:func:`probe_ratio`) is more than ``factor`` away
    from 1 either way (the cache was measured under heavy load, or the machine's state changed) the whole
    table is measured again and the cache rewritten. Anything closer: the cached table's shape at the probe's
    level (every curve scaled by the ratio; the online update, :meth:`PassCost.observe`, keeps the level
    current from there). A wide band, and a median, on purpose: on the 2-core EPYC VM, idle, the same pass
    measured 84 ms and 99 ms, and an 8-token pass 120 ms and 203 ms, a few minutes apart (2026-12-07), and the
    former check (every point within 15%) measured the table again (~45-60 s, most of an engine's start) at
    nearly every start. A cached table with a point that is not a positive number is measured again."""
    f = Path(cache_dir) / f"cost-{machine_key()}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.json"
    if f.is_file() and not refresh:
        try:
            raw = json.loads(f.read_text())
            cached = PassCost({int(b): {int(w): float(v) for w, v in ws.items()} for b, ws in raw["ms"].items()},
                              raw.get("widths", ()))
        except (ValueError, KeyError, TypeError):
            cached = None
        if cached is not None:
            r = probe_ratio(probe(), cached)
            if 1.0 / factor <= r <= factor:
                for c in cached.curves.values():
                    c.scale(r)
                return cached
    cost = measure()
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps({"key": key, "widths": list(cost.widths), "ms": cost.to_dict()}))
    return cost
