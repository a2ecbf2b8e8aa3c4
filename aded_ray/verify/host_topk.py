"""Each row's argmax, top-k and top-k probabilities for logits on the CPU, in one kernel.

On a GPU the decode loop reduces a pass's ``[rows, vocab]`` logits there with torch. On a CPU the
same torch calls are the costliest host work of a speculative step: for SmolLM2's 31 rows x 49,152 tokens,
argmax + top-k + a log-sum-exp took **8.6 ms p50** per step in the model loop (the 2-core AMD EPYC, 2 torch
threads: ~5% of a 156 ms step, paid only because the drafter recycles the top-k), against 2.6 ms p50 here
(1.8 ms against torch's 6.7 ms measured alone, warm).

Per row, after a count of its non-finite logits (an integer reduction), three passes:

1. block maxima (blocks of ``BLOCK`` tokens; a loop numba's ``fastmath`` lets LLVM vectorise);
2. the top-k, scanning only the blocks whose maximum reaches the k-th largest block maximum (every block
   maximum is a logit, so the k-th largest of them bounds the k-th largest logit from below). Insertion keeps
   the earlier index first among equal values, so the top-1 is the **first** maximum: ``torch.argmax``'s
   choice, bit for bit (the greedy output depends on nothing else);
3. the softmax normaliser ``sum(exp(x - max))`` with an exponential of multiplications and additions only (below); the top-k
   probabilities are ``exp(top - max) / sum`` in float64.

The exponential: ``exp(d) = exp(d / 64) ** 64`` for ``d <= 0``, ``exp`` on ``[-1.36, 0]`` by its degree-8
Taylor polynomial, six squarings; relative error below 1e-3 for ``d`` down to -87 (terms that small barely
count in the sum); on the normaliser of random rows ~1e-6 (measured; tested to 1e-5). The probabilities only rank and weigh
draft candidates (stored in 1/65535 steps, :mod:`aded_ray.draft.recycle`): they never decide an output token.

A row holding NaN or an infinity makes the kernel report failure and the caller takes torch's path (its
NaN semantics included).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

BLOCK = 128


@njit(fastmath=True, cache=True, inline="always")
def _exp_le0(d):
    y = max(d, np.float32(-87.0)) * np.float32(1.0 / 64.0)
    p = np.float32(1.0 / 40320.0)
    p = p * y + np.float32(1.0 / 5040.0)
    p = p * y + np.float32(1.0 / 720.0)
    p = p * y + np.float32(1.0 / 120.0)
    p = p * y + np.float32(1.0 / 24.0)
    p = p * y + np.float32(1.0 / 6.0)
    p = p * y + np.float32(0.5)
    p = p * y + np.float32(1.0)
    p = p * y + np.float32(1.0)
    for _ in range(6):
        p = p * p
    return p


@njit(fastmath=True, cache=True)
def sum_exp(row, m):
    """``sum(exp(row - m))`` for ``m >= max(row)`` (float32 terms, float64 result)."""
    s = np.float32(0.0)
    for j in range(row.shape[0]):
        s += _exp_le0(row[j] - m)
    return np.float64(s)


@njit(fastmath=True, cache=True)
def _block_max(row, bm, B):
    V = row.shape[0]
    for b in range(bm.shape[0]):
        end = min(V, b * B + B)
        m = row[b * B]
        for j in range(b * B + 1, end):
            if row[j] > m:
                m = row[j]
        bm[b] = m


@njit(cache=True)
def _non_finite(row):
    """How many logits of ``row`` are NaN or infinite (an integer reduction, exact without fastmath)."""
    bad = 0
    for j in range(row.shape[0]):
        bad += not (row[j] - row[j] == 0.0)
    return bad


@njit(cache=True)
def top_rows(x, want, k):
    """For each row of ``x`` (``[n, V]`` float32, C-contiguous): ``first[r]`` the index of its first maximum
    and, where ``want[r]``, ``ids[r]`` its top-k indices (descending, earlier index first among equals) and
    ``probs[r]`` their softmax probabilities. Returns ``(ok, first, ids, probs)``; ``ok`` is False when a row
    holds a non-finite logit (nothing else is then meaningful)."""
    n, V = x.shape
    nb = (V + BLOCK - 1) // BLOCK
    bm = np.empty(nb, np.float32)
    first = np.empty(n, np.int64)
    ids = np.zeros((n, k), np.int64)
    probs = np.zeros((n, k), np.float32)
    tv = np.empty(k, np.float32)
    ti = np.empty(k, np.int64)
    if V == 0 or k < 1 or k > V:
        return False, first, ids, probs
    for r in range(n):
        row = x[r]
        if _non_finite(row):
            return False, first, ids, probs
        _block_max(row, bm, BLOCK)
        kk = k if want[r] else 1
        for q in range(kk):
            tv[q] = -np.inf
        for b in range(nb):                        # the kk-th largest block maximum: a lower bound
            if bm[b] > tv[kk - 1]:
                q = kk - 1
                while q > 0 and tv[q - 1] < bm[b]:
                    tv[q] = tv[q - 1]
                    q -= 1
                tv[q] = bm[b]
        thr = tv[kk - 1]
        for q in range(kk):
            tv[q] = -np.inf
            ti[q] = -1
        for b in range(nb):
            if bm[b] < thr:
                continue
            for j in range(b * BLOCK, min(V, b * BLOCK + BLOCK)):
                v = row[j]
                if v > tv[kk - 1]:
                    q = kk - 1
                    while q > 0 and tv[q - 1] < v:
                        tv[q] = tv[q - 1]
                        ti[q] = ti[q - 1]
                        q -= 1
                    tv[q] = v
                    ti[q] = j
        first[r] = ti[0]
        if want[r]:
            m = tv[0]
            s = sum_exp(row, m)
            for q in range(k):
                ids[r, q] = ti[q]
                probs[r, q] = math.exp(np.float64(tv[q]) - np.float64(m)) / s
    return True, first, ids, probs
