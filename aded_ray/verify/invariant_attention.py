"""Row-invariant attention for the CPU: a query row's result is a function of its own keys alone.

Why: CPU SDPA rounds a query row differently by the number of query rows in the call, by the number of
keys, and by where a row's visible keys sit among masked ones (a tree node's ancestors sit after their
siblings' columns in a tree pass, not in plain decoding). The logits of a tree pass and of plain decoding
then agree to ~1e-7-5e-5, not bit for bit, and a sampled token flips when its seeded uniform lands that
close to a boundary of the target CDF (about one request in 12-24 under batching, measured). Greedy
decoding flips on a near-tie the same way.

How: the kernel walks each query row's **visible keys in increasing column order** (the committed prefix,
then its ancestors by depth, then itself: the same sequence, in the same order, that plain decoding's row
for that position sees), and computes everything as a function of that sequence alone:

1. a score per key: ``q . k`` summed over the head dimension in order, ``((q0 k0 + q1 k1) + q2 k2) + ...``,
   times the scale; computed for all of a request's columns at once, one column per vector lane, over the
   keys transposed once per call and key/value head (so no sum ever crosses lanes);
2. ``m`` = the largest score (exact whatever the order);
3. ``e_a = exp(s_a - m)`` by a polynomial of additions and multiplications (:func:`_exp_rows`); ``Z`` = their
   sum in eight lanes by key index (``a mod 8``) combined in a fixed tree (:func:`_sum8`);
4. the output: ``sum_a e_a v_a`` accumulated over keys in order (four per pass, added one after the other),
   each of the head dimension's entries on its own, then divided by ``Z``.

No step depends on the call's shape, the other rows, masked columns or where in a buffer a key lives, so
a row's bits are the same in a prefill, a plain step, a tree pass or a batch of requests, as long as its
keys' bits are (the linears are row-invariant in the packed modes, :mod:`aded_ray.verify.modes`, so the
KV entries written by a tree pass equal plain decoding's). No ``fastmath``: the compiler may not
re-associate. Loops over a row's keys may vectorise, but their split into vector body and remainder
depends on the key count alone, which plain decoding and a tree pass share for the same position (the score
loop runs over all columns up to the row's last, so a column's lane differs between passes: its sum is
per lane, so the bits do not).

Threads: the rows of a pass are spread over numba's threads when torch has more than one, else computed on
the calling thread (:func:`attend_rows_serial`: no thread pool started); both call the same loop bodies.

Grouped query heads: query head ``h`` reads key/value head ``h // (H / Hkv)``.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit, prange

ATTENTIONS = ("sdpa", "invariant")


LN2_HI, LN2_LO, LOG2E = 0.693359375, -2.12194440e-4, 1.44269504


@njit(cache=True, inline="always")
def _exp_rows(s, n, m, bits):
    """``s[a] = exp(s[a] - m)`` for ``a < n`` (``m >= s[a]``): Cody-Waite reduction by ln 2, a degree-7
    polynomial, the power of two built in ``bits`` (an int32 scratch) and read as float32. Additions and
    multiplications only, so vectorised and scalar iterations compute the same bits."""
    pw = bits.view(np.float32)
    for a in range(n):
        x = max(s[a] - m, np.float32(-87.0))
        k = np.floor(x * np.float32(LOG2E) + np.float32(0.5))
        r = (x - k * np.float32(LN2_HI)) - k * np.float32(LN2_LO)
        p = np.float32(1.0 / 5040.0)
        p = p * r + np.float32(1.0 / 720.0)
        p = p * r + np.float32(1.0 / 120.0)
        p = p * r + np.float32(1.0 / 24.0)
        p = p * r + np.float32(1.0 / 6.0)
        p = p * r + np.float32(0.5)
        p = p * r + np.float32(1.0)
        p = p * r + np.float32(1.0)
        s[a] = p
        bits[a] = (np.int32(k) + np.int32(127)) << np.int32(23)
    for a in range(n):
        s[a] = s[a] * pw[a]


@njit(cache=True, inline="always")
def _sum8(s, n):
    """``sum(s[:n])`` in eight lanes by index (``a mod 8``), combined in a fixed tree."""
    z0 = z1 = z2 = z3 = z4 = z5 = z6 = z7 = np.float32(0.0)
    n8 = n - n % 8
    for a in range(0, n8, 8):
        z0 += s[a]
        z1 += s[a + 1]
        z2 += s[a + 2]
        z3 += s[a + 3]
        z4 += s[a + 4]
        z5 += s[a + 5]
        z6 += s[a + 6]
        z7 += s[a + 7]
    for a in range(n8, n):
        j = a - n8
        if j == 0:
            z0 += s[a]
        elif j == 1:
            z1 += s[a]
        elif j == 2:
            z2 += s[a]
        elif j == 3:
            z3 += s[a]
        elif j == 4:
            z4 += s[a]
        elif j == 5:
            z5 += s[a]
        else:
            z6 += s[a]
    return ((z0 + z1) + (z2 + z3)) + ((z4 + z5) + (z6 + z7))


@njit(cache=True)
def _transpose(src, dst, n):
    """``dst[d, c] = src[c, d]`` for ``c < n``."""
    for d in range(src.shape[1]):
        row = dst[d]
        for c in range(n):
            row[c] = src[c, d]


@njit(cache=True)
def _row_group(q, kt, vs, ok, hi, sc, out):
    """One query row's ``G`` heads of one key/value group: ``q`` [G, D], ``kt`` [D, >= hi] (keys transposed),
    ``vs`` [cap, D], ``ok`` [>= hi] (visible columns); writes ``out`` [G, D]."""
    G, D = q.shape
    idx = np.empty(hi, np.int64)
    n = 0
    for c in range(hi):
        if ok[c]:
            idx[n] = c
            n += 1
    full = np.empty(hi, np.float32)
    s = np.empty((G, n), np.float32)
    bits = np.empty(n, np.int32)
    z = np.empty(G, np.float32)
    for hh in range(G):
        qv = q[hh]
        # every column's score: q . k summed over d in order, one column per lane
        for c in range(hi):
            full[c] = np.float32(0.0)
        for d in range(0, D, 4):               # four terms per pass over the columns, added in order
            q0, q1, q2, q3 = qv[d], qv[d + 1], qv[d + 2], qv[d + 3]
            k0, k1, k2, k3 = kt[d], kt[d + 1], kt[d + 2], kt[d + 3]
            for c in range(hi):
                full[c] = (((full[c] + q0 * k0[c]) + q1 * k1[c]) + q2 * k2[c]) + q3 * k3[c]
        sh = s[hh]
        m = np.float32(-np.inf)
        for a in range(n):
            v = full[idx[a]] * sc
            sh[a] = v
            m = max(m, v)
        _exp_rows(sh, n, m, bits)
        z[hh] = _sum8(sh, n)
    acc = np.zeros((G, D), np.float32)
    n4 = n - n % 4
    for a in range(0, n4, 4):                  # four keys per pass over the head dimension, in order
        v0, v1, v2, v3 = vs[idx[a]], vs[idx[a + 1]], vs[idx[a + 2]], vs[idx[a + 3]]
        for hh in range(G):
            w0, w1, w2, w3 = s[hh, a], s[hh, a + 1], s[hh, a + 2], s[hh, a + 3]
            ah = acc[hh]
            for d in range(D):
                ah[d] = (((ah[d] + w0 * v0[d]) + w1 * v1[d]) + w2 * v2[d]) + w3 * v3[d]
    for a in range(n4, n):
        vrow = vs[idx[a]]
        for hh in range(G):
            w = s[hh, a]
            ah = acc[hh]
            for d in range(D):
                ah[d] = ah[d] + w * vrow[d]
    for hh in range(G):
        for d in range(D):
            out[hh, d] = acc[hh, d] / z[hh]


@njit(cache=True)
def _scratch(req_hi, B, Hkv, D):
    C = 0
    for r in range(B):
        C = max(C, req_hi[r])
    return np.empty((B, Hkv, D, C), np.float32)      # keys transposed: the score loop runs over columns


@njit(cache=True)
def _transpose_group(rg, K, KT, first, req_hi):
    """Key/value head ``rg % Hkv`` of request ``rg // Hkv``: its keys transposed into ``KT``."""
    Hkv = K.shape[1]
    r, g = rg // Hkv, rg % Hkv
    _transpose(K[first + r, g], KT[r, g], req_hi[r])


@njit(cache=True)
def _attend_group(tg, q, KT, V, first, allow, row_r, row_i, row_hi, sc, out):
    """Row ``tg // Hkv``'s query heads of key/value head ``tg % Hkv``."""
    Hkv = V.shape[1]
    G = q.shape[1] // Hkv
    t, g = tg // Hkv, tg % Hkv
    r = row_r[t]
    _row_group(q[t, g * G:(g + 1) * G], KT[r, g], V[first + r, g], allow[r, row_i[t]], row_hi[t], sc,
               out[t, g * G:(g + 1) * G])


@njit(parallel=True, cache=True)
def attend_rows(q, K, V, first, allow, row_r, row_i, row_hi, req_hi, scale, out):
    """``q`` [T, H, D] float32 (row t of request ``row_r[t]``, its ``row_i[t]``-th query), ``K``/``V``
    [slots, Hkv, cap, D] (request r in slot ``first + r``), ``allow`` [B, W, C] (bool: may row i of request
    r see column c), ``row_hi[t]`` / ``req_hi[r]``: one past the last column row t / any row of request r
    sees; ``out`` [T, H, D]. The loops' bodies are functions of their own, shared with the one-thread
    :func:`attend_rows_serial`: the same arithmetic whatever the threads."""
    KT = _scratch(req_hi, allow.shape[0], K.shape[1], q.shape[2])
    for rg in prange(KT.shape[0] * KT.shape[1]):
        _transpose_group(rg, K, KT, first, req_hi)
    for tg in prange(q.shape[0] * K.shape[1]):
        _attend_group(tg, q, KT, V, first, allow, row_r, row_i, row_hi, np.float32(scale), out)


@njit(cache=True)
def attend_rows_serial(q, K, V, first, allow, row_r, row_i, row_hi, req_hi, scale, out):
    """:func:`attend_rows` on the calling thread alone: no thread pool is started (an idle OpenMP pool's
    workers spin: a replica given one thread would burn a second core). A function of its own, not
    ``njit(attend_rows.py_func)``: two dispatchers of one Python function share numba's cache file, and one
    would load the other's (parallel) code."""
    KT = _scratch(req_hi, allow.shape[0], K.shape[1], q.shape[2])
    for rg in range(KT.shape[0] * KT.shape[1]):
        _transpose_group(rg, K, KT, first, req_hi)
    for tg in range(q.shape[0] * K.shape[1]):
        _attend_group(tg, q, KT, V, first, allow, row_r, row_i, row_hi, np.float32(scale), out)


class Rows:
    """Which keys each query row of a pass sees, prepared once per pass for every layer's call:
    ``allow`` [B, W, C] (bool), row t = request ``row_r[t]``'s query ``row_i[t]``; requests in slots
    ``first ..``. Every row must see at least one column."""

    def __init__(self, allow: np.ndarray, row_r: np.ndarray, row_i: np.ndarray, first: int = 0):
        self.allow = np.ascontiguousarray(allow, dtype=np.bool_)
        self.row_r = np.ascontiguousarray(row_r, dtype=np.int64)
        self.row_i = np.ascontiguousarray(row_i, dtype=np.int64)
        self.first = int(first)
        seen = self.allow[self.row_r, self.row_i]                       # [T, C]
        if not seen.any(axis=1).all():
            raise ValueError("every query row of an attention pass must see at least one key")
        C = self.allow.shape[2]
        self.row_hi = (C - np.argmax(seen[:, ::-1], axis=1)).astype(np.int64)
        self.req_hi = np.zeros(self.allow.shape[0], np.int64)
        np.maximum.at(self.req_hi, self.row_r, self.row_hi)

    @classmethod
    def padded(cls, allow: np.ndarray, first: int = 0) -> "Rows":
        """Every row of every request: ``B * W`` rows, request-major."""
        B, W = allow.shape[:2]
        return cls(allow, np.repeat(np.arange(B), W), np.tile(np.arange(W), B), first)

    @classmethod
    def packed(cls, allow: np.ndarray, counts: np.ndarray, first: int = 0) -> "Rows":
        """Request r's first ``counts[r]`` rows, packed in request order."""
        counts = np.asarray(counts, np.int64)
        return cls(allow, np.repeat(np.arange(len(counts)), counts),
                   np.concatenate([np.arange(c) for c in counts]), first)


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().numpy()


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rows: Rows, scale: float) -> torch.Tensor:
    """Packed queries ``[T, H, D]`` over the contiguous KV buffers ``key``/``value`` ``[slots, Hkv, cap, D]``
    (``rows``: which columns each row sees). Returns ``[T, H, D]`` float32 (CPU, float32 only)."""
    if query.dtype != torch.float32 or key.dtype != torch.float32 or query.device.type != "cpu":
        raise ValueError(f"invariant attention runs float32 on the CPU, got {query.dtype} on {query.device}")
    if not (key.is_contiguous() and value.is_contiguous()):
        raise ValueError("invariant attention reads whole contiguous KV buffers, got a strided view")
    if query.shape[0] != len(rows.row_r) or rows.allow.shape[2] > key.shape[2]:
        raise ValueError(f"{query.shape[0]} query rows and {key.shape[2]} key slots do not fit a pass of "
                         f"{len(rows.row_r)} rows over {rows.allow.shape[2]} columns")
    q = query.contiguous()
    out = torch.empty_like(q)
    kernel = attend_rows if torch.get_num_threads() > 1 else attend_rows_serial
    kernel(_np(q), _np(key), _np(value), rows.first, rows.allow, rows.row_r, rows.row_i, rows.row_hi,
                rows.req_hi, float(scale), _np(out))
    return out
