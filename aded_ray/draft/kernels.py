"""numba kernels over the tri-gram matrix: base CSR lookup, the delta overlay, the adaptive update.

The matrix is passed around as two tuples of arrays so that every kernel is a plain function:

``base = (first, keys, offsets, succ, weight, index)``
    ``keys[k] = a * V + b`` sorted; contexts with first token ``a`` are ``keys[first[a]:first[a+1]]``;
    successors of context ``k`` are ``succ[offsets[k]:offsets[k+1]]`` with float32 ``weight``.
    ``index`` (built when a matrix is made, never stored; :func:`build_index`): an open-addressing table, one
    uint64 per slot ``(key + 1) << 32 | offsets[k] << 8 | count``, so a context's successor range costs one
    cache line instead of a binary search (~8 probes, most of them cache misses once a forward pass has
    evicted the matrix). Empty (size 0) where the packing does not fit (V > 65,535, 2**24 successors, or
    more than 255 per context): the binary search then runs.

``ov = (slot_key, slot_head, e_tok, e_cnt, e_next, meta)``
    an open-addressing table from context key to a linked list of ``(successor, count)`` entries.
    ``meta = [bits, n_slots_used, n_entries_used]``. A count is a number of adaptive bumps: integers,
    so deltas from many processes merge exactly in any order.

``prm = [V, increment, cap]`` (float64): a weight is read as ``min(base + count * increment, cap)``.
"""
from __future__ import annotations

import numpy as np
from numba import njit

MAX_SUCC = 64  # merged successors returned per context (lowest weights dropped beyond this)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@njit(cache=True, inline="always")
def _slot_of(key, bits):
    return np.int64((np.uint64(key) * _GOLDEN) >> np.uint64(64 - bits))


@njit(cache=True, inline="always")
def ov_find(ov, key):
    """Slot of context ``key`` in the overlay, or -1."""
    slot_key, slot_head, e_tok, e_cnt, e_next, meta = ov
    bits = meta[0]
    mask = (np.int64(1) << bits) - 1
    s = _slot_of(key, bits)
    while slot_key[s] != -1:
        if slot_key[s] == key:
            return s
        s = (s + 1) & mask
    return -1


@njit(cache=True, inline="always")
def ov_bump(ov, key, tok, n):
    """Add ``n`` bumps to (context ``key``, successor ``tok``). The caller guarantees free capacity."""
    slot_key, slot_head, e_tok, e_cnt, e_next, meta = ov
    bits = meta[0]
    mask = (np.int64(1) << bits) - 1
    s = _slot_of(key, bits)
    while slot_key[s] != -1 and slot_key[s] != key:
        s = (s + 1) & mask
    if slot_key[s] == -1:
        slot_key[s] = key
        slot_head[s] = -1
        meta[1] += 1
    e = slot_head[s]
    while e != -1:
        if e_tok[e] == tok:
            e_cnt[e] += n
            return
        e = e_next[e]
    e = meta[2]
    meta[2] += 1
    e_tok[e] = tok
    e_cnt[e] = n
    e_next[e] = slot_head[s]
    slot_head[s] = e


@njit(cache=True)
def ov_rehash(old, new):
    """Insert every entry of overlay ``old`` into the empty, larger overlay ``new``."""
    slot_key, slot_head, e_tok, e_cnt, e_next, meta = old
    for s in range(slot_key.shape[0]):
        if slot_key[s] != -1:
            e = slot_head[s]
            while e != -1:
                ov_bump(new, slot_key[s], e_tok[e], e_cnt[e])
                e = e_next[e]


_U32, _U8, _LO_MASK, _N_MASK = np.uint64(32), np.uint64(8), np.uint64(0xFFFFFF), np.uint64(0xFF)


def build_index(keys: np.ndarray, offsets: np.ndarray, vocab_size: int) -> np.ndarray:
    """The context index of a base (see the module docstring): uint64 slots, a power of two >= 1.5x the
    contexts; empty when the packing does not fit or there is no context."""
    n = keys.shape[0]
    if n == 0 or vocab_size * vocab_size + 1 >= 2**32 or offsets[-1] >= 2**24 or np.diff(offsets).max() > 255:
        return np.zeros(0, np.uint64)
    size = 1 << int(np.ceil(np.log2(1.5 * n)))
    out = np.zeros(size, np.uint64)
    _fill_index(keys, offsets, out)
    return out


@njit(cache=True, inline="always")
def _index_slot(key, mask):
    return np.int64((np.uint64(key) * _GOLDEN) >> np.uint64(40)) & mask


@njit(cache=True)
def _fill_index(keys, offsets, out):
    mask = out.shape[0] - 1
    for k in range(keys.shape[0]):
        s = _index_slot(keys[k], mask)
        while out[s] != 0:
            s = (s + 1) & mask
        out[s] = (np.uint64(keys[k] + 1) << _U32) | (np.uint64(offsets[k]) << _U8) | np.uint64(offsets[k + 1]
                                                                                              - offsets[k])


@njit(cache=True, inline="always")
def base_range(base, V, a, b):
    """``(lo, hi)`` successor range of context (a, b) in the base arrays; empty when absent."""
    first, keys, offsets, succ, weight, index = base
    if a < 0 or b < 0 or a >= V or b >= V:
        return 0, 0
    key = np.int64(a) * V + b
    if index.shape[0] > 0:
        mask = index.shape[0] - 1
        want = np.uint64(key + 1)
        s = _index_slot(key, mask)
        while index[s] != 0:
            v = index[s]
            if (v >> _U32) == want:
                lo = np.int64((v >> _U8) & _LO_MASK)
                return lo, lo + np.int64(v & _N_MASK)
            s = (s + 1) & mask
        return 0, 0
    lo, hi = first[a], first[a + 1]
    while lo < hi:  # binary search among the contexts starting with a (a few dozen on average)
        mid = (lo + hi) >> 1
        if keys[mid] < key:
            lo = mid + 1
        else:
            hi = mid
    if lo < first[a + 1] and keys[lo] == key:
        return offsets[lo], offsets[lo + 1]
    return 0, 0


@njit(cache=True, inline="always")
def successors(base, ov, prm, a, b, tok_out, w_out):
    """Merged successors of (a, b): base weights plus overlay bumps, capped, sorted.

    Writes up to ``len(tok_out)`` entries sorted by weight (descending), then token id (ascending), so
    the result depends only on the counts, never on insertion order. Returns the count.
    """
    first, keys, offsets, succ, weight, index = base
    V = np.int64(prm[0])
    inc, cap = prm[1], prm[2]
    lo, hi = base_range(base, V, a, b)
    cap_n = tok_out.shape[0]
    n = 0
    for j in range(lo, hi):
        if n >= cap_n:
            break
        tok_out[n] = succ[j]
        w_out[n] = weight[j]
        n += 1
    n_base = n
    if ov[5][1] > 0 and a >= 0 and b >= 0:
        s = ov_find(ov, np.int64(a) * V + b)
        if s != -1:
            e = ov[1][s]
            while e != -1:
                t = ov[2][e]
                found = False
                for i in range(n_base):
                    if tok_out[i] == t:
                        w_out[i] += ov[3][e] * inc
                        found = True
                        break
                if not found:
                    if n < cap_n:
                        tok_out[n] = t
                        w_out[n] = ov[3][e] * inc
                        n += 1
                    else:  # full: replace the weakest entry if this one is stronger
                        wmin, imin = w_out[0], 0
                        for i in range(1, n):
                            if w_out[i] < wmin:
                                wmin, imin = w_out[i], i
                        if ov[3][e] * inc > wmin:
                            tok_out[imin] = t
                            w_out[imin] = ov[3][e] * inc
                e = ov[4][e]
    for i in range(n):
        if w_out[i] > cap:
            w_out[i] = cap
    # insertion sort: (weight desc, token asc); the base part is already in this order
    for i in range(1, n):
        t, w = tok_out[i], w_out[i]
        j = i - 1
        while j >= 0 and (w_out[j] < w or (w_out[j] == w and tok_out[j] > t)):
            tok_out[j + 1] = tok_out[j]
            w_out[j + 1] = w_out[j]
            j -= 1
        tok_out[j + 1] = t
        w_out[j + 1] = w
    return n


@njit(cache=True)
def weight_of(base, ov, prm, a, b, c):
    """Capped weight of the tri-gram (a, b, c); 0 when unknown."""
    first, keys, offsets, succ, weight, index = base
    V = np.int64(prm[0])
    lo, hi = base_range(base, V, a, b)
    w = 0.0
    for j in range(lo, hi):
        if succ[j] == c:
            w = weight[j]
            break
    if ov[5][1] > 0 and a >= 0 and b >= 0:
        s = ov_find(ov, np.int64(a) * V + b)
        if s != -1:
            e = ov[1][s]
            while e != -1:
                if ov[2][e] == c:
                    w += ov[3][e] * prm[1]
                    break
                e = ov[4][e]
    return min(w, prm[2])


@njit(cache=True, inline="always")
def adaptive_update(ov, prm, seq, window):
    """ADED's update: one bump for each tri-gram inside the last ``window`` tokens of ``seq``."""
    V = np.int64(prm[0])
    n = seq.shape[0]
    for i in range(max(0, n - window), n - 2):
        a, b, c = seq[i], seq[i + 1], seq[i + 2]
        if 0 <= a < V and 0 <= b < V and 0 <= c < V:
            ov_bump(ov, np.int64(a) * V + b, c, 1)


@njit(cache=True)
def apply_counts(ov, keys, toks, counts):
    """Merge a batch of deltas ``(context key, successor, count)`` into the overlay."""
    for i in range(keys.shape[0]):
        ov_bump(ov, keys[i], toks[i], counts[i])


@njit(cache=True)
def ov_items(ov, keys_out, toks_out, counts_out):
    """All overlay deltas as flat arrays; returns their number."""
    slot_key, slot_head, e_tok, e_cnt, e_next, meta = ov
    n = 0
    for s in range(slot_key.shape[0]):
        if slot_key[s] != -1:
            e = slot_head[s]
            while e != -1:
                keys_out[n] = slot_key[s]
                toks_out[n] = e_tok[e]
                counts_out[n] = e_cnt[e]
                n += 1
                e = e_next[e]
    return n
