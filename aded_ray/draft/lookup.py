"""Prompt lookup (the classic baseline): match the request's last n tokens earlier in the request.

For n = ``max_ngram`` down to ``min_ngram``, find the earliest earlier occurrence of ``seq[-n:]`` that has a
continuation, and propose the next ``num_tokens`` tokens as one chain. No match -> an empty draft.

>>> PromptLookupDrafter().draft([5, 6, 7, 8, 5, 6]).tokens.tolist()
[7, 8, 5, 6]
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from aded_ray.draft.tree import DraftTree


def lookup_chain(seq: np.ndarray, max_ngram: int = 3, min_ngram: int = 1, num_tokens: int = 10) -> np.ndarray:
    n_seq = seq.shape[0]
    for n in range(max_ngram, min_ngram - 1, -1):
        if n_seq <= n:
            continue
        windows = sliding_window_view(seq[:-1], n)  # windows starting before the last n tokens' own start
        hits = np.flatnonzero((windows[: n_seq - n] == seq[-n:]).all(axis=1))
        hits = hits[hits + n < n_seq]
        if hits.shape[0]:
            start = int(hits[0]) + n
            return seq[start:start + num_tokens]
    return seq[:0]


class PromptLookupDrafter:
    """Stateless chain drafter over the request's own tokens (committed + root)."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, num_tokens: int = 10):
        if not 1 <= min_ngram <= max_ngram or num_tokens < 1:
            raise ValueError(f"bad prompt-lookup sizes: ngram {min_ngram}..{max_ngram}, num_tokens {num_tokens}")
        self.max_ngram, self.min_ngram, self.num_tokens = max_ngram, min_ngram, num_tokens

    def observe(self, seq) -> None:
        pass

    def draft(self, seq, max_nodes: int | None = None) -> DraftTree:
        n = self.num_tokens if max_nodes is None else min(self.num_tokens, max_nodes)
        chain = lookup_chain(np.asarray(seq, np.int32), self.max_ngram, self.min_ngram, n)
        return DraftTree(chain, np.arange(-1, len(chain) - 1, dtype=np.int32))
