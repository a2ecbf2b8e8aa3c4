"""Acceptance: which drafted nodes the target model agrees with, and the bonus token.

Row 0 of ``logits`` belongs to the root, row i + 1 to tree node i; each row is the target's prediction for
the token *after* that node.

Greedy (lossless: identical to greedy decoding)::

    cur = root; repeat: t = argmax(logits[cur]); if a child of cur has token t: cur = that child, accept it
                                                 else: bonus = t, stop

Sampling (exact: the emitted tokens follow the target distribution alone). The target distribution is
sampled at the root row; if a child carries the sampled token, the walk descends into it and samples its
row, and so on; the first sample without a matching child is the bonus. Every emitted token is a plain
sample from the target given the tokens before it; the tree only saves forward passes. (ADED's best-of-rows
rule is biased and is not used.)

Worked example (tests/test_accept.py): tree tokens [5, 6, 7] with parents [-1, -1, 1]; argmax rows
[6, 9, 7, 2] -> the root's argmax 6 is node 1, node 1's argmax 7 is node 2, node 2's argmax 2 has no child:
accepted nodes [1, 2], bonus 2.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from aded_ray.draft.tree import DraftTree


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self):
        if not (self.temperature >= 0.0 and np.isfinite(self.temperature)):
            raise ValueError(f"temperature {self.temperature} must be a finite number >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p {self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k {self.top_k} must be >= 0 (0 = off)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _children(tree: DraftTree) -> dict[int, dict[int, int]]:
    """``{row: {token: child row}}`` with rows 0 = root, i + 1 = node i (first child wins on duplicates)."""
    kids: dict[int, dict[int, int]] = {}
    for i, (tok, par) in enumerate(zip(tree.tokens.tolist(), tree.parents.tolist())):
        kids.setdefault(par + 1, {}).setdefault(tok, i + 1)
    return kids


def greedy_accept(tree: DraftTree, argmax_rows: np.ndarray) -> tuple[list[int], int]:
    """Accepted node indices (into the tree, in path order) and the bonus token, from per-row argmaxes."""
    kids = _children(tree)
    row, path = 0, []
    while True:
        t = int(argmax_rows[row])
        nxt = kids.get(row, {}).get(t)
        if nxt is None:
            return path, t
        path.append(nxt - 1)
        row = nxt


def target_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The target distribution of one row after temperature, top-k and top-p (float64 for exact sums)."""
    x = logits.double() / p.temperature
    if p.top_k and p.top_k < x.shape[-1]:
        kth = torch.topk(x, p.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, -1)
    if p.top_p < 1.0:
        sp, si = torch.sort(probs, descending=True)
        keep = torch.cumsum(sp, -1) - sp < p.top_p   # smallest prefix reaching top_p, at least one token
        mask = torch.zeros_like(probs, dtype=torch.bool)
        mask[si[keep]] = True
        probs = torch.where(mask, probs, torch.zeros_like(probs))
        probs = probs / probs.sum()
    return probs


def sample_token(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
    return int(torch.multinomial(target_probs(logits, p), 1, generator=gen))


def sample_accept(tree: DraftTree, logits: torch.Tensor, p: SamplingParams,
                  gen: torch.Generator | None) -> tuple[list[int], int]:
    """Exact speculative sampling over a tree: walk while the target's own sample is a drafted child."""
    kids = _children(tree)
    row, path = 0, []
    while True:
        t = sample_token(logits[row], p, gen)
        nxt = kids.get(row, {}).get(t)
        if nxt is None:
            return path, t
        path.append(nxt - 1)
        row = nxt


def accept(tree: DraftTree, logits: torch.Tensor, p: SamplingParams,
           gen: torch.Generator | None = None) -> tuple[list[int], int]:
    if p.greedy:
        return greedy_accept(tree, logits.argmax(-1).cpu().numpy())
    return sample_accept(tree, logits, p, gen)
