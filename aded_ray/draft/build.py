"""Counting tri-grams of tokenized documents into a :class:`TrigramMatrix` (numpy only).

Each document is counted on its own, so no tri-gram crosses a document boundary; documents shorter than
3 tokens contribute nothing. Codes ``(a*V + b)*V + c`` are int64 (V <= 2**21 keeps them in range).
"""
from __future__ import annotations

import numpy as np

from aded_ray.draft.matrix import TrigramMatrix


class TrigramCounter:
    """Accumulates tri-gram counts with bounded memory: codes are reduced every ``chunk`` tri-grams."""

    def __init__(self, vocab_size: int, chunk: int = 16_000_000):
        if not 0 < vocab_size <= 1 << 21:
            raise ValueError(f"vocab_size {vocab_size} must be in 1..{1 << 21}")
        self.V = np.int64(vocab_size)
        self.chunk = chunk
        self._pending: list[np.ndarray] = []
        self._n_pending = 0
        self.codes = np.zeros(0, np.int64)
        self.counts = np.zeros(0, np.int64)
        self.documents = 0
        self.tokens = 0

    def add(self, ids, times: int = 1) -> None:
        """Count the tri-grams of one document ``times`` times."""
        x = np.asarray(ids, dtype=np.int64)
        if x.shape[0] < 3:
            return
        if x.min() < 0 or x.max() >= self.V:
            raise ValueError(f"token id out of range 0..{int(self.V) - 1}: {int(x.min())}..{int(x.max())}")
        self.documents += 1
        self.tokens += int(x.shape[0])
        codes = (x[:-2] * self.V + x[1:-1]) * self.V + x[2:]
        self._pending.append(np.tile(codes, times) if times > 1 else codes)
        self._n_pending += (x.shape[0] - 2) * times
        if self._n_pending >= self.chunk:
            self._reduce()

    def _reduce(self) -> None:
        if not self._pending:
            return
        codes, counts = np.unique(np.concatenate(self._pending), return_counts=True)
        self._pending, self._n_pending = [], 0
        if self.codes.shape[0]:
            allc = np.concatenate([self.codes, codes])
            uniq, inv = np.unique(allc, return_inverse=True)
            counts = np.bincount(inv, weights=np.concatenate([self.counts, counts]), minlength=len(uniq))
            codes = uniq
        self.codes, self.counts = codes, counts.astype(np.int64)

    def matrix(self, top_k: int = 12, meta: dict | None = None) -> TrigramMatrix:
        self._reduce()
        meta = {**(meta or {}), "documents": self.documents, "tokens": self.tokens,
                "trigrams": int(self.counts.sum()), "distinct_trigrams": int(self.codes.shape[0])}
        return TrigramMatrix.from_counts(self.codes, self.counts, vocab_size=int(self.V), top_k=top_k, meta=meta)


def matrix_from_token_docs(docs, vocab_size: int, top_k: int = 12, meta: dict | None = None) -> TrigramMatrix:
    """Convenience: a matrix from an iterable of token-id sequences."""
    c = TrigramCounter(vocab_size)
    for d in docs:
        c.add(d)
    return c.matrix(top_k, meta)
