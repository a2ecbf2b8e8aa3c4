"""The model's own predictions, recycled: what the target model ranked highest after a context, the last
time verification ran that context (token-recycling style, but keyed by the last two tokens with a
fallback to the last one).

Verification computes the model's full next-token distribution at the root and at every draft node; only
the argmax of the accepted path is used for output. The rest is free evidence about the model: after
tokens ``(a, b)`` it predicted ``top_ids`` with probabilities ``top_p``. The table keeps the latest top-k
per last token (V rows, always exact) and per token pair (a direct-mapped cache of ``2**slot_bits`` rows,
a collision overwrites). numpy + numba only.

Compact: probabilities are stored as ``uint16`` steps of ``1/65535`` (:func:`quantize`; a probability below
half a step is stored as 0, which ends a row: rows are descending), token ids as ``uint16`` when the vocabulary
fits, and context keys as ``uint32`` when ``V * V`` does (SmolLM2's 49,152 tokens: 20.6 MB per table at the
default sizes instead of 41.3 MB in int64 / int32 / float32). Only drafting reads the table; a rounding of
the drafter's scores can change which tree is drafted, never the output.
"""
from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, inline="always")
def _slot(n_tokens, slot_bits, a, b):
    h = (np.uint64(a) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(b)) * np.uint64(0xBF58476D1CE4E5B9)
    return n_tokens + int(h >> np.uint64(64 - slot_bits))


P_SCALE = 65535.0
P_STEP = 1.0 / P_SCALE


@njit(cache=True, inline="always")
def quantize(p):
    """A probability as ``uint16`` steps of ``1/65535``, clamped to [0, 1] (NaN: 0)."""
    if not p > 0.0:
        return np.uint16(0)
    if p >= 1.0:
        return np.uint16(65535)
    return np.uint16(int(p * P_SCALE + 0.5))


def key_dtype(n_tokens: int):
    """``uint32`` where every pair key ``a * V + b`` and the empty mark fit, else ``int64``."""
    return np.uint32 if n_tokens * n_tokens < np.iinfo(np.uint32).max else np.int64


def empty_key(dtype) -> int:
    """The mark of an unused row: no context's key (``-1``, or the largest ``uint32``)."""
    return int(np.iinfo(np.uint32).max) if np.dtype(dtype) == np.uint32 else -1


@njit(cache=True, inline="always")
def lookup(keys, n_tokens, slot_bits, a, b):
    """``(row, exact)``: the table row for context ``(a, b)`` (exact pair) else for ``b`` alone; -1 if none."""
    if a >= 0 and 0 <= b < n_tokens:
        row = _slot(n_tokens, slot_bits, a, b)
        if keys[row] == a * n_tokens + b:
            return row, True
    if 0 <= b < n_tokens and keys[b] == b:
        return b, False
    return -1, False


@njit(cache=True, inline="always")
def _record_row(keys, ids, probs, n_tokens, slot_bits, a, b, top_ids, top_p, i):
    """Row ``i`` of the model's top-k (``top_ids[i]``, ``top_p[i]``) after tokens ``(a, b)``: into the
    last-token row of ``b`` and, when ``a`` is known, the pair row of ``(a, b)``."""
    if b < 0 or b >= n_tokens:
        return
    k = min(ids.shape[1], top_ids.shape[1])
    for pair in range(2):
        if pair == 0:
            row = np.int64(b)
            keys[row] = b
        else:
            if a < 0 or a >= n_tokens:
                return
            row = _slot(n_tokens, slot_bits, a, b)
            keys[row] = np.int64(a) * n_tokens + b
        for j in range(k):
            ids[row, j] = top_ids[i, j]
            probs[row, j] = quantize(top_p[i, j])
        for j in range(k, ids.shape[1]):
            probs[row, j] = 0


@njit(cache=True)
def record(keys, ids, probs, n_tokens, slot_bits, prev, inputs, top_ids, top_p):
    for i in range(inputs.shape[0]):
        _record_row(keys, ids, probs, n_tokens, slot_bits, np.int64(prev[i]), np.int64(inputs[i]), top_ids, top_p, i)


@njit(cache=True)
def tree_contexts(before_root, root, tokens, parents):
    """``(prev, inputs)`` of a verified tree's rows: row 0 is the root (after ``before_root``), row ``i + 1``
    node ``i`` (after its parent's token, the root's for a child of the root)."""
    n = tokens.shape[0]
    prev = np.empty(n + 1, np.int64)
    inputs = np.empty(n + 1, np.int64)
    prev[0] = before_root
    inputs[0] = root
    for i in range(n):
        p = parents[i]
        prev[i + 1] = root if p < 0 else tokens[p]
        inputs[i + 1] = tokens[i]
    return prev, inputs


@njit(cache=True)
def record_tree(keys, ids, probs, n_tokens, slot_bits, before_root, root, tokens, parents, top_ids, top_p):
    """:func:`record` for the rows of one verified tree (contexts from :func:`tree_contexts`), in one call from
    Python per step. Returns False (nothing recorded) when the shapes do not fit the tree."""
    n = tokens.shape[0]
    if parents.shape[0] != n or top_ids.shape[0] != n + 1 or top_p.shape[0] != n + 1 \
            or top_p.shape[1] != top_ids.shape[1]:
        return False
    for i in range(n):
        if not -1 <= parents[i] < i:
            return False
    prev, inputs = tree_contexts(before_root, root, tokens, parents)
    record(keys, ids, probs, n_tokens, slot_bits, prev, inputs, top_ids, top_p)
    return True


class RecycleTable:
    """Latest top-k next tokens of the model per last token and per last two tokens."""

    def __init__(self, vocab_size: int, k: int = 8, slot_bits: int = 19):
        if not 1 <= k <= 64 or not 8 <= slot_bits <= 26:
            raise ValueError(f"k = {k} must be in 1..64 and slot_bits = {slot_bits} in 8..26")
        self.n_tokens, self.slot_bits = int(vocab_size), int(slot_bits)
        rows = self.n_tokens + (1 << slot_bits)
        kd = key_dtype(self.n_tokens)
        self.empty = empty_key(kd)
        self.keys = np.full(rows, self.empty, kd)
        # written now, not np.zeros: a zeroed array is mapped lazily, and the first recordings would fault
        # its pages in inside the decode loop (measured: 10-30 ms in each of a fresh process's first steps)
        self.ids = np.empty((rows, k), np.uint16 if self.n_tokens <= 65536 else np.int32)
        self.ids.fill(0)
        self.probs = np.empty((rows, k), np.uint16)     # quantize()d
        self.probs.fill(0)
        # Optional sharing hook (duck-typed, e.g. store.model_state.ModelStateSync): ``record_recycle(prev,
        # inputs, top_ids, top_p)`` receives this process's own recordings (validated arrays) after they apply.
        self.journal = None

    def record(self, prev, inputs, top_ids, top_p) -> None:
        """After tokens ``prev[i], inputs[i]`` (``prev[i] = -1``: unknown) the model's top next tokens were
        ``top_ids[i]`` with probabilities ``top_p[i]`` (descending)."""
        inputs = np.atleast_1d(np.asarray(inputs, np.int64))
        prev = np.atleast_1d(np.asarray(prev, np.int64))
        top_ids = np.atleast_2d(np.asarray(top_ids, np.int32))
        top_p = np.atleast_2d(np.asarray(top_p, np.float32))
        if not (prev.shape == inputs.shape and top_ids.shape == top_p.shape and top_ids.shape[0] == inputs.shape[0]):
            raise ValueError(f"shapes differ: prev {prev.shape}, inputs {inputs.shape}, ids {top_ids.shape}, "
                             f"probs {top_p.shape}")
        record(self.keys, self.ids, self.probs, self.n_tokens, self.slot_bits, prev, inputs, top_ids, top_p)
        if self.journal is not None:
            self.journal.record_recycle(prev, inputs, top_ids, top_p)

    def record_tree(self, before_root: int, root: int, tokens: np.ndarray, parents: np.ndarray, top_ids: np.ndarray,
                    top_p: np.ndarray) -> None:
        """:meth:`record` for one verified tree: row 0 of ``top_ids``/``top_p`` is the model's prediction after
        ``before_root, root``, row ``i + 1`` after node ``i`` (``tokens``/``parents``: a breadth-first draft
        tree, :class:`aded_ray.draft.tree.DraftTree`). The decode loop's per-step form: one kernel call and no
        array built (a fleet journal still receives the context arrays)."""
        if self.journal is not None:
            prev, inputs = tree_contexts(int(before_root), int(root), tokens, parents)
            self.record(prev, inputs, top_ids, top_p)
            return
        if not record_tree(self.keys, self.ids, self.probs, self.n_tokens, self.slot_bits, int(before_root),
                           int(root), tokens, parents, top_ids, top_p):
            raise ValueError(f"shapes differ: tree of {tokens.shape[0]} nodes (parents {parents.shape}), ids "
                             f"{top_ids.shape}, probs {top_p.shape} (one row for the root and one per node)")

    def get(self, a: int, b: int) -> tuple[list[int], list[float], bool]:
        """The recorded top-k after ``(a, b)`` (or after ``b``), and whether the pair matched exactly."""
        row, exact = lookup(self.keys, self.n_tokens, self.slot_bits, a, b)
        if row < 0:
            return [], [], False
        keep = self.probs[row] > 0
        return self.ids[row][keep].tolist(), (self.probs[row][keep] * P_STEP).tolist(), exact

    def filled(self) -> int:
        """Rows holding a recording."""
        return int((self.keys != self.empty).sum())

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.ids.nbytes + self.probs.nbytes

    def clear(self) -> None:
        self.keys[:] = self.empty
        self.probs[:] = 0
