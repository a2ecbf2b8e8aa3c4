"""Longest-suffix matching over a token sequence (the request itself, or a history of past requests).

A :class:`TokenIndex` keeps, for every position j, the previous position holding the same token
(``prev[j]``) and, per token, its last position (``last[tok]``); and likewise per tri-gram ending at j
(``prev3[j]``, ``head3[hash]``: a hashed chain, so an entry must be checked against the tokens). Matching a
context C against it walks the occurrences of C's last tri-gram (then, failing that, of its last token) from
the most recent backwards, measures how many tokens before each occurrence
agree with C (the match length, up to ``max_len``), and returns the tokens that followed the occurrences with
the longest match, with their counts.

Worked example (tests/test_best.py): sequence ``[1, 2, 3, 9, 1, 2, 4, 7, 1, 2]`` matched with context
``[.., 1, 2]`` -> the suffix ``1 2`` occurs twice before (followed by 3 and by 4), length 2 -> {4: 1, 3: 1}.
"""
from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, inline="always")
def index_extend(seq, start, end, prev, last):
    """Index ``seq[start:end]`` (positions are appended in order)."""
    for j in range(start, end):
        t = seq[j]
        prev[j] = last[t]
        last[t] = j


@njit(cache=True, inline="always")
def _h3(a, b, c, mask):
    h = (np.uint64(a) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(b)) * np.uint64(0xBF58476D1CE4E5B9) + np.uint64(c)
    return np.int64((h * np.uint64(0x94D049BB133111EB)) >> np.uint64(40)) & mask


@njit(cache=True, inline="always")
def index_extend3(seq, start, end, prev3, head3):
    """Chain the tri-grams ending at positions ``start..end-1``."""
    mask = head3.shape[0] - 1
    for j in range(start, end):
        if j < 2:
            prev3[j] = -1
            continue
        h = _h3(seq[j - 2], seq[j - 1], seq[j], mask)
        prev3[j] = head3[h]
        head3[h] = j


@njit(cache=True)
def clear3(seq, n, head3):
    mask = head3.shape[0] - 1
    for j in range(2, n):
        head3[_h3(seq[j - 2], seq[j - 1], seq[j], mask)] = -1


@njit(cache=True, inline="always")
def _ctx_tok(seq, n, ctx_tail, n_tail, q):
    """The token ``q`` back from the end of the context ``seq[:n] + ctx_tail[:n_tail]`` (-1 before its start)."""
    if q < n_tail:
        return ctx_tail[n_tail - 1 - q]
    idx = n - 1 - (q - n_tail)
    return seq[idx] if idx >= 0 else -1


@njit(cache=True, inline="always")
def _tally(m, nxt, best, k, out_tok, out_cnt):
    """Count continuation ``nxt`` of a match of length ``m``: a longer match than ``best`` restarts the
    tally; an equal one adds to it (distinct tokens, at most ``out_tok``'s size). Returns (best, k)."""
    if m > best:
        best = m
        k = 0
    if m == best:
        for i in range(k):
            if out_tok[i] == nxt:
                out_cnt[i] += 1
                return best, k
        if k < out_tok.shape[0]:
            out_tok[k] = nxt
            out_cnt[k] = 1
            k += 1
    return best, k


@njit(cache=True, inline="always")
def match3(seq, n, prev, last, prev3, head3, ctx_tail, n_tail, max_len, max_occ, out_tok, out_cnt):
    """:func:`match`, looking first at the occurrences of the context's last tri-gram (a short chain, and
    older long matches are found too); only when none continues does it walk the last token's occurrences
    (at most ``max_occ // 4``, the most recent: those give matches of length 1-2)."""
    c0 = _ctx_tok(seq, n, ctx_tail, n_tail, 2)
    c1 = _ctx_tok(seq, n, ctx_tail, n_tail, 1)
    c2 = _ctx_tok(seq, n, ctx_tail, n_tail, 0)
    if c0 >= 0 and c1 >= 0 and c2 >= 0 and n >= 3:
        j = head3[_h3(c0, c1, c2, head3.shape[0] - 1)]
        best = 0
        k = 0
        seen = 0
        while j >= 0 and seen < max_occ:
            if j + 1 < n and not (n_tail == 0 and j == n - 1) and seq[j] == c2 and seq[j - 1] == c1 \
                    and seq[j - 2] == c0:
                seen += 1
                m = 3
                while m < max_len and j - m >= 0:
                    c = _ctx_tok(seq, n, ctx_tail, n_tail, m)
                    if c < 0 or seq[j - m] != c:
                        break
                    m += 1
                best, k = _tally(m, seq[j + 1], best, k, out_tok, out_cnt)
            j = prev3[j]
        if best >= 3:
            return k, best
    return match(seq, n, prev, last, ctx_tail, n_tail, max_len, max(1, max_occ // 4), out_tok, out_cnt)


@njit(cache=True, inline="always")
def match(seq, n, prev, last, ctx_tail, n_tail, max_len, max_occ, out_tok, out_cnt):
    """Continuations of the context ``seq[:n] + ctx_tail[:n_tail]`` at its longest earlier match.

    Occurrences are searched in ``seq[:n - 1]`` (a continuation must exist). Returns ``(k, m)``: the number
    of distinct continuation tokens written to ``out_tok``/``out_cnt`` and the match length m (0 = none).
    """
    if n_tail > 0:
        t = ctx_tail[n_tail - 1]
    elif n > 0:
        t = seq[n - 1]
    else:
        return 0, 0
    if t < 0 or t >= last.shape[0]:
        return 0, 0
    j = last[t]
    best = 0
    k = 0
    seen = 0
    while j >= 0 and seen < max_occ:
        if j + 1 < n and not (n_tail == 0 and j == n - 1):
            seen += 1
            m = 1
            while m < max_len and j - m >= 0:
                c = _ctx_tok(seq, n, ctx_tail, n_tail, m)
                if c < 0 or seq[j - m] != c:
                    break
                m += 1
            best, k = _tally(m, seq[j + 1], best, k, out_tok, out_cnt)
        j = prev[j]
    return k, best


class TokenIndex:
    """A growing token sequence with its occurrence index (numpy arrays, doubled on demand)."""

    def __init__(self, vocab_size: int, capacity: int = 4096, hash_bits: int = 14):
        self.vocab_size = vocab_size
        self.seq = np.zeros(capacity, np.int32)
        self.prev = np.full(capacity, -1, np.int32)
        self.prev3 = np.full(capacity, -1, np.int32)
        self.last = np.full(vocab_size, -1, np.int32)
        self.head3 = np.full(1 << hash_bits, -1, np.int32)
        self.n = 0

    @property
    def arrays(self) -> tuple:
        """What the kernels take: ``(seq, n, prev, last, prev3, head3)``."""
        return self.seq, self.n, self.prev, self.last, self.prev3, self.head3

    def clear(self) -> None:
        if self.n:
            self.last[self.seq[: self.n]] = -1
            clear3(self.seq, self.n, self.head3)
        self.n = 0

    def extend(self, tokens) -> None:
        tokens = np.asarray(tokens, np.int32)
        tokens = tokens[(tokens >= 0) & (tokens < self.vocab_size)]
        need = self.n + tokens.shape[0]
        if need > self.seq.shape[0]:
            cap = max(need, 2 * self.seq.shape[0])
            self.seq = np.concatenate([self.seq, np.zeros(cap - self.seq.shape[0], np.int32)])
            self.prev = np.concatenate([self.prev, np.full(cap - self.prev.shape[0], -1, np.int32)])
            self.prev3 = np.concatenate([self.prev3, np.full(cap - self.prev3.shape[0], -1, np.int32)])
        self.seq[self.n:need] = tokens
        index_extend(self.seq, self.n, need, self.prev, self.last)
        index_extend3(self.seq, self.n, need, self.prev3, self.head3)
        self.n = need

    def matches(self, tail=(), max_len: int = 16, max_occ: int = 64, k: int = 8):
        """``(tokens, counts, match_length)`` for the context ``sequence + tail``."""
        tail = np.asarray(tail, np.int32)
        tok, cnt = np.zeros(k, np.int32), np.zeros(k, np.int32)
        n, m = match3(self.seq, self.n, self.prev, self.last, self.prev3, self.head3, tail, tail.shape[0], max_len,
                      max_occ, tok, cnt)
        return tok[:n], cnt[:n], m
