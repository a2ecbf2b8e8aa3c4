"""The drafter's per-step kernels outside tree growth: one call per observation, breadth-first re-ordering.

After a verification pass the model has evicted the drafter's code and data from the caches, and every
Python-level call into numpy or numba then costs tens of microseconds (measured: ~27 µs for an empty numba
call after a 120 MB sweep, ~1 µs warm). So the common observation (the request continues, no fleet journal on
the matrix) runs as one kernel: the prefix check, ADED's adaptive update, judging the last draft with one
AdaGrad step, and indexing the new tokens. Anything unusual returns a status and takes the general path.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from aded_ray.draft import combine as C
from aded_ray.draft import kernels as K
from aded_ray.draft.suffix import index_extend, index_extend3

OK, RESTART, SLOW = 0, 1, 2


@njit(cache=True, inline="always")
def _to_bfs_into(n, depth, tok, par, score, feat, order, new_of, t2, p2, s2, f2):
    """Re-order the first ``n`` insertion-ordered nodes breadth-first in place (stable within a depth),
    remapping parents: what :func:`aded_ray.draft.best._bfs` does, inside the kernel. Scratch given:
    ``order``/``new_of`` (n ints) and room for a copy of the nodes (``t2``, ``p2``, ``s2``, ``f2``: n rows)."""
    for i in range(n):
        t2[i] = tok[i]
        p2[i] = par[i]
        s2[i] = score[i]
        for f in range(feat.shape[1]):
            f2[i, f] = feat[i, f]
    k = 0
    d = 1
    while k < n:
        for i in range(n):
            if depth[i] == d:
                order[k] = i
                new_of[i] = k
                k += 1
        d += 1
    for j in range(n):
        i = order[j]
        tok[j] = t2[i]
        par[j] = -1 if p2[i] < 0 else new_of[p2[i]]
        score[j] = s2[i]
        for f in range(feat.shape[1]):
            feat[j, f] = f2[i, f]


@njit(cache=True, inline="always")
def _continues(rseq, rn, seq):
    """Whether ``seq`` starts with the indexed request ``rseq[:rn]``."""
    if rn > seq.shape[0]:
        return False
    for i in range(rn - 1, -1, -1):          # the end differs first when it differs at all
        if rseq[i] != seq[i]:
            return False
    return True


@njit(cache=True)
def observe_kernel(rseq, rn, rprev, rlast, rprev3, rhead3, seq, ov, prm, window, update, tokens, parents, feats,
                   n_ctx, learn, w, g2, lr, sc, wl):
    """One observation of ``seq`` by a request indexed as ``rseq[:rn]``. Returns ``(status, new_n, judged)``:
    ``RESTART`` when ``seq`` does not continue the request, ``SLOW`` when the overlay or the index needs
    room or a token is out of the vocabulary (nothing changed in either case), else ``OK`` after the
    adaptive update (when ``update``), judging the last draft (when ``learn``) and indexing."""
    n = seq.shape[0]
    if not _continues(rseq, rn, seq):
        return RESTART, rn, 0
    V = np.int64(prm[0])
    if n > rseq.shape[0]:
        return SLOW, rn, 0
    for i in range(rn, n):
        if seq[i] < 0 or seq[i] >= V:
            return SLOW, rn, 0
    meta = ov[5]
    if update:
        add = max(0, min(n, window) - 2)
        if (meta[1] + add) * 2 > (np.int64(1) << meta[0]) or meta[2] + add > ov[2].shape[0]:
            return SLOW, rn, 0
        K.adaptive_update(ov, prm, seq, window)
    judged = 0
    if learn and n > n_ctx and rn == n_ctx:
        judged = C.judge_learn(tokens, parents, feats, seq[n_ctx:], w, g2, lr, sc, wl)
    for i in range(rn, n):
        rseq[i] = seq[i]
    index_extend(rseq, rn, n, rprev, rlast)
    index_extend3(rseq, rn, n, rprev3, rhead3)
    return OK, n, judged
