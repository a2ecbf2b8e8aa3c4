"""Acceptance: which drafted nodes the target model agrees with, and the bonus token.

Row 0 of ``logits`` belongs to the root, row i + 1 to tree node i; each row is the target's prediction for
the token *after* that node. Acceptance is two parts:

1. :func:`reduce_rows` decides, **on the logits' device**, the target's own choice for every row (its argmax
   when greedy, a sample of its distribution when sampling) and, when asked, each row's top-k tokens and
   probabilities (the drafter recycles them). Only these few numbers per row cross to the host, in one copy;
   the ``[rows, vocab]`` logits never leave the device.
2. :func:`walk` follows the tree from the root while the target's choice at the current row is a drafted
   child; the first choice without a matching child is the bonus token::

       cur = root; repeat: t = choice[cur]; if a child of cur has token t: cur = that child, accept it
                                            else: bonus = t, stop

Greedy is therefore identical to greedy decoding. Sampling is exact: every emitted token is the target's own
sample given the tokens before it, and the tree only saves forward passes (ADED's best-of-rows rule is biased
and is not used). The sample that decides the token at output position ``j`` uses the uniform number
``u(seed, j)`` of a counter-based generator (:func:`uniforms`) by inverse-CDF, so a seeded request draws the
same tokens whatever the trees, the batch or the device: seeded sampling with speculation reproduces seeded
plain decoding token for token (up to the logits' own rounding, as for greedy).

Worked example (tests/test_accept.py): tree tokens [5, 6, 7] with parents [-1, -1, 1]; row choices
[6, 9, 7, 2] -> the root's choice 6 is node 1, node 1's choice 7 is node 2, node 2's choice 2 has no child:
accepted nodes [1, 2], bonus 2.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass

import numpy as np
import torch

from aded_ray.draft.tree import DraftTree
from aded_ray.errors import InvalidParameter

MIN_TEMPERATURE = 1e-4   # below this, logits / T overflow float64 ranges for real models: use 0 (greedy)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self):
        t = self.temperature
        if not (np.isfinite(t) and (t == 0.0 or MIN_TEMPERATURE <= t <= 100.0)):
            raise InvalidParameter("temperature", f"temperature {t} must be 0 (greedy) or a finite number in "
                                                  f"[{MIN_TEMPERATURE}, 100]")
        if not (np.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise InvalidParameter("top_p", f"top_p {self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise InvalidParameter("top_k", f"top_k {self.top_k} must be >= 0 (0 = off)")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InvalidParameter("seed", f"seed {self.seed} must be in [0, 2**63)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


# ---- counter-based uniforms: u(seed, position), vectorised, identical on every machine ----------------
_M1, _M2, _GOLD = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def uniforms(seed: int, positions) -> np.ndarray:
    """``[len(positions)]`` float64 uniforms in [0, 1): splitmix64 of ``seed`` and each output position."""
    with np.errstate(over="ignore"):
        x = np.asarray(positions, np.uint64) * _GOLD + np.uint64(seed & (2**64 - 1)) * _M2 + _GOLD
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def target_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The target distribution of each row (``[V]`` or ``[n, V]``) after temperature, top-k and top-p, in
    float64 on the logits' device."""
    x = logits.double() / p.temperature
    if p.top_k and p.top_k < x.shape[-1]:
        kth = torch.topk(x, p.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, -1)
    if p.top_p < 1.0:
        sp, si = torch.sort(probs, dim=-1, descending=True)
        keep = torch.cumsum(sp, -1) - sp < p.top_p      # the smallest prefix reaching top_p, >= one token
        mask = torch.zeros_like(keep).scatter_(-1, si, keep)
        probs = torch.where(mask, probs, torch.zeros_like(probs))
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample_rows(logits: torch.Tensor, p: SamplingParams, u: np.ndarray) -> torch.Tensor:
    """Inverse-CDF sample of each row of ``[n, V]`` logits with the uniform ``u[i]`` (on the device)."""
    cdf = torch.cumsum(target_probs(logits, p), -1)
    uu = torch.as_tensor(u, dtype=torch.float64).to(cdf.device)[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, uu, right=True)[:, 0].clamp_max(cdf.shape[-1] - 1)


@dataclass
class RowChoices:
    """What one verification pass decided, on the host: per row the target's token, and optionally its
    top-k tokens and probabilities (softmax of the raw logits)."""

    tokens: np.ndarray                  # [n] int64
    top_ids: np.ndarray | None = None   # [n, k] int64
    top_p: np.ndarray | None = None     # [n, k] float32


def row_depths(tree: DraftTree) -> np.ndarray:
    """``[N + 1]`` depth of each row: 0 for the root, the node's depth after."""
    return np.r_[0, tree.depths()].astype(np.int64)


def reduce_rows(logits: torch.Tensor, p: SamplingParams, *, positions=None, top_k: int = 0) -> RowChoices:
    """Decide every row of ``[n, V]`` logits on their device; one small copy to the host.

    ``positions[i]`` is the output position the row's token would take (needed when sampling: it picks the
    row's uniform). ``top_k`` > 0 also returns each row's top-k tokens and probabilities.
    """
    if logits.dim() == 1:
        logits = logits[None]
    n = logits.shape[0]
    if p.greedy:
        choice = logits.argmax(-1)
    else:
        if positions is None or len(positions) != n:
            raise ValueError(f"sampling needs one output position per row ({n} rows)")
        seed = p.seed if p.seed is not None else secrets.randbits(63)   # unseeded: fresh randomness
        choice = sample_rows(logits, p, uniforms(seed, positions))
    parts = [choice[:, None].double()]
    if top_k:
        lg = logits.float()
        top, ids = lg.topk(top_k, dim=-1)
        parts += [ids.double(), torch.exp(top - torch.logsumexp(lg, -1, keepdim=True)).double()]
    host = torch.cat(parts, 1).cpu().numpy()      # the one device -> host copy of the step: n x (1 + 2k)
    out = RowChoices(host[:, 0].astype(np.int64))
    if top_k:
        out.top_ids = host[:, 1:1 + top_k].astype(np.int64)
        out.top_p = host[:, 1 + top_k:].astype(np.float32)
    return out


def reduce_batch(logits: torch.Tensor, samplings: list[SamplingParams], positions: list, counts: list[int],
                 top_k: int = 0, top_k_for: list[bool] | None = None) -> list[RowChoices]:
    """:func:`reduce_rows` for a pass's packed rows ``[T, V]``: request r has ``counts[r]`` rows (from
    ``sum(counts[:r])``) whose output positions are ``positions[r]``. All reductions on the device, one copy to
    the host for the whole batch. ``top_k_for``: the requests whose rows get their top-k (by default all);
    the others' ``top_ids`` / ``top_p`` stay None (a top-k and a softmax over the vocabulary cost ~0.1 ms a
    row on CPUs, wasted on a request that does not recycle them)."""
    offsets = np.r_[0, np.cumsum(counts)].astype(int)
    if logits.shape[0] != offsets[-1]:
        raise ValueError(f"{logits.shape[0]} logit rows for requests of {list(counts)} rows")
    wanted = [bool(top_k)] * len(counts) if top_k_for is None else [bool(top_k) and bool(w) for w in top_k_for]
    if any(wanted) and type(logits) is torch.Tensor and logits.device.type == "cpu" \
            and logits.dtype == torch.float32 and logits.dim() == 2:      # a plain host tensor (no subclass)
        out = _reduce_batch_host(logits, samplings, positions, offsets, top_k, wanted)
        if out is not None:
            return out
    choice = logits.argmax(-1)
    for r, p in enumerate(samplings):
        if not p.greedy:
            a, b = offsets[r], offsets[r + 1]
            choice[a:b] = sample_rows(logits[a:b], p, uniforms(p.seed, positions[r]))
    sel = [r for r in range(len(counts)) if wanted[r]]
    parts = [choice.double()]
    if sel:
        lg = logits.float()
        if len(sel) < len(counts):
            rows = np.concatenate([np.arange(offsets[r], offsets[r + 1]) for r in sel])
            lg = lg[torch.from_numpy(rows).to(lg.device)]
        top, ids = lg.topk(top_k, dim=-1)
        parts += [ids.double().flatten(), torch.exp(top - torch.logsumexp(lg, -1, keepdim=True)).double().flatten()]
    host = torch.cat(parts).cpu().numpy()               # one copy to the host
    T = int(offsets[-1])
    out = [RowChoices(host[offsets[r]: offsets[r + 1]].astype(np.int64)) for r in range(len(counts))]
    if sel:
        m = sum(counts[r] for r in sel)                 # rows with a top-k
        ids_h = host[T:T + m * top_k].reshape(m, top_k)
        p_h = host[T + m * top_k:].reshape(m, top_k)
        at = 0
        for r in sel:
            n = counts[r]
            out[r].top_ids = ids_h[at:at + n].astype(np.int64)
            out[r].top_p = p_h[at:at + n].astype(np.float32)
            at += n
    return out


def _reduce_batch_host(logits: torch.Tensor, samplings, positions, offsets, top_k: int, wanted) -> list | None:
    """:func:`reduce_batch` for float32 logits on the CPU: argmax, top-k and probabilities in one kernel
    (:mod:`aded_ray.verify.host_topk`; 31 x 49,152 logits: 1.8 ms against torch's 6.7 ms on the 2-core EPYC). The greedy choice is
    the first maximum, as ``torch.argmax``; sampled rows are drawn by :func:`sample_rows` as on any device.
    None when a logit is not finite (the caller's torch path then decides, NaN semantics included)."""
    from aded_ray.verify.host_topk import top_rows

    x = logits.detach().contiguous().numpy()
    want = np.zeros(x.shape[0], np.bool_)
    for r, w in enumerate(wanted):
        if w:
            want[offsets[r]: offsets[r + 1]] = True
    ok, first, ids, probs = top_rows(x, want, int(top_k))
    if not ok:
        return None
    out = []
    for r, p in enumerate(samplings):
        a, b = offsets[r], offsets[r + 1]
        if p.greedy:
            tokens = first[a:b].copy()
        else:
            tokens = sample_rows(logits[a:b], p, uniforms(p.seed, positions[r])).cpu().numpy().astype(np.int64)
        rc = RowChoices(tokens)
        if wanted[r]:
            rc.top_ids, rc.top_p = ids[a:b], probs[a:b]
        out.append(rc)
    return out


def _children(tree: DraftTree) -> dict[int, dict[int, int]]:
    """``{row: {token: child row}}`` with rows 0 = root, i + 1 = node i (first child wins on duplicates)."""
    kids: dict[int, dict[int, int]] = {}
    for i, (tok, par) in enumerate(zip(tree.tokens.tolist(), tree.parents.tolist())):
        kids.setdefault(par + 1, {}).setdefault(tok, i + 1)
    return kids


def walk(tree: DraftTree, choices) -> tuple[list[int], int]:
    """Accepted node indices (into the tree, in path order) and the bonus token, from per-row choices."""
    kids = _children(tree)
    row, path = 0, []
    while True:
        t = int(choices[row])
        nxt = kids.get(row, {}).get(t)
        if nxt is None:
            return path, t
        path.append(nxt - 1)
        row = nxt


greedy_accept = walk   # greedy acceptance is the walk over per-row argmaxes


def accept(tree: DraftTree, logits: torch.Tensor, p: SamplingParams, position: int = 0) -> tuple[list[int], int]:
    """Accept over one pass whose root row decides output position ``position``."""
    rows = reduce_rows(logits, p, positions=position + row_depths(tree))
    return walk(tree, rows.tokens)
