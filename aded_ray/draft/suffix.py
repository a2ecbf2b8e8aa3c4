"""Longest-suffix matching over a token sequence (the request itself, or a history of past requests).

A :class:`TokenIndex` keeps, for every position j, the previous position holding the same token
(``prev[j]``) and, per token, its last position (``last[tok]``). Matching a context C against it walks the
occurrences of C's last token from the most recent backwards, measures how many tokens before each occurrence
agree with C (the match length, up to ``max_len``), and returns the tokens that followed the occurrences with
the longest match, with their counts.

Worked example (tests/test_best.py): sequence ``[1, 2, 3, 9, 1, 2, 4, 7, 1, 2]`` matched with context
``[.., 1, 2]`` -> the suffix ``1 2`` occurs twice before (followed by 3 and by 4), length 2 -> {4: 1, 3: 1}.
"""
from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def index_extend(seq, start, end, prev, last):
    """Index ``seq[start:end]`` (positions are appended in order)."""
    for j in range(start, end):
        t = seq[j]
        prev[j] = last[t]
        last[t] = j


@njit(cache=True)
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
                q = m  # token m back from the context end
                if q < n_tail:
                    c = ctx_tail[n_tail - 1 - q]
                else:
                    idx = n - 1 - (q - n_tail)
                    if idx < 0:
                        break
                    c = seq[idx]
                if seq[j - m] != c:
                    break
                m += 1
            nxt = seq[j + 1]
            if m > best:
                best = m
                k = 0
            if m == best:
                found = False
                for i in range(k):
                    if out_tok[i] == nxt:
                        out_cnt[i] += 1
                        found = True
                        break
                if not found and k < out_tok.shape[0]:
                    out_tok[k] = nxt
                    out_cnt[k] = 1
                    k += 1
        j = prev[j]
    return k, best


class TokenIndex:
    """A growing token sequence with its occurrence index (numpy arrays, doubled on demand)."""

    def __init__(self, vocab_size: int, capacity: int = 4096):
        self.vocab_size = vocab_size
        self.seq = np.zeros(capacity, np.int32)
        self.prev = np.full(capacity, -1, np.int32)
        self.last = np.full(vocab_size, -1, np.int32)
        self.n = 0

    def clear(self) -> None:
        if self.n:
            self.last[self.seq[: self.n]] = -1
        self.n = 0

    def extend(self, tokens) -> None:
        tokens = np.asarray(tokens, np.int32)
        tokens = tokens[(tokens >= 0) & (tokens < self.vocab_size)]
        need = self.n + tokens.shape[0]
        if need > self.seq.shape[0]:
            cap = max(need, 2 * self.seq.shape[0])
            self.seq = np.concatenate([self.seq, np.zeros(cap - self.seq.shape[0], np.int32)])
            self.prev = np.concatenate([self.prev, np.full(cap - self.prev.shape[0], -1, np.int32)])
        self.seq[self.n:need] = tokens
        index_extend(self.seq, self.n, need, self.prev, self.last)
        self.n = need

    def matches(self, tail=(), max_len: int = 16, max_occ: int = 64, k: int = 8):
        """``(tokens, counts, match_length)`` for the context ``sequence + tail``."""
        tail = np.asarray(tail, np.int32)
        tok, cnt = np.zeros(k, np.int32), np.zeros(k, np.int32)
        n, m = match(self.seq, self.n, self.prev, self.last, tail, tail.shape[0], max_len, max_occ, tok, cnt)
        return tok[:n], cnt[:n], m
