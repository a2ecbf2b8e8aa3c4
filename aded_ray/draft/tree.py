"""The one canonical draft tree and the pure views derived from it.

A draft tree is two arrays of length N in breadth-first order: ``tokens[i]`` is a drafted token id and
``parents[i]`` is the index of its parent node, or -1 when its parent is the root (the step's root token,
which is not part of the tree). Breadth-first means ``parents[i] < i`` and depths never decrease.

Worked example (used in the tests)::

    tokens  = [10, 11, 12, 13]      root r
    parents = [-1, -1,  0,  2]      ├── 10 ── 12 ── 13
                                    └── 11
    depths(parents)        -> [1, 1, 2, 3]          position of node i = L + depth[i]  (root at L)
    paths(parents)         -> [[1], [0, 2, 3]]      root-to-leaf node indices, ordered by leaf index
    ancestor_mask(parents) -> row i marks i and its ancestors (root excluded)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np


@dataclass(frozen=True)
class DraftTree:
    """Drafted tokens below the root token.

    Attributes:
        tokens: ``[N] int32`` token id of each draft node, breadth-first.
        parents: ``[N] int32`` parent node index, -1 for children of the root.
        scores: ``[N] float64`` or None: the drafter's estimate that a node is accepted, when it has one
            (higher first; a node never scores above its parent).
    """

    tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    parents: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    scores: np.ndarray | None = None

    def __post_init__(self):
        object.__setattr__(self, "tokens", np.ascontiguousarray(self.tokens, dtype=np.int32))
        object.__setattr__(self, "parents", np.ascontiguousarray(self.parents, dtype=np.int32))
        if self.scores is not None:
            object.__setattr__(self, "scores", np.ascontiguousarray(self.scores, dtype=np.float64))
            if self.scores.shape != self.tokens.shape:
                raise ValueError(f"scores {self.scores.shape} must match tokens {self.tokens.shape}")
        validate(self.tokens, self.parents)

    @classmethod
    def trusted(cls, tokens: np.ndarray, parents: np.ndarray, scores: np.ndarray | None = None) -> "DraftTree":
        """A tree from arrays a drafter's kernel built breadth-first (int32 / float64, contiguous): no copy and
        no validation, for the per-step hot path. Anything else goes through the validating constructor."""
        t = object.__new__(cls)
        object.__setattr__(t, "tokens", tokens)
        object.__setattr__(t, "parents", parents)
        object.__setattr__(t, "scores", scores)
        return t

    def ranks(self) -> np.ndarray:
        """``[N]`` rank of each node in the order the drafter would give up nodes under a smaller budget:
        by score (stable) when scored, else the breadth-first index (truncation keeps a prefix)."""
        n = len(self)
        if self.scores is None:
            return np.arange(n)
        order = np.argsort(-self.scores, kind="stable")
        r = np.empty(n, np.int64)
        r[order] = np.arange(n)
        return r

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @classmethod
    def from_paths(cls, paths: Iterable[Sequence[int]], max_nodes: int | None = None) -> "DraftTree":
        return from_paths(paths, max_nodes)

    def depths(self) -> np.ndarray:
        return depths(self.parents)

    def paths(self) -> list[list[int]]:
        return paths(self.parents)

    def token_paths(self) -> list[list[int]]:
        """Root-to-leaf token sequences (root token excluded)."""
        return [[int(self.tokens[i]) for i in p] for p in self.paths()]


def validate(tokens: np.ndarray, parents: np.ndarray) -> None:
    """Raise ``ValueError`` unless the arrays form a breadth-first tree."""
    if tokens.ndim != 1 or tokens.shape != parents.shape:
        raise ValueError(f"tokens {tokens.shape} and parents {parents.shape} must be 1-D and equal in length")
    idx = np.arange(len(parents))
    if np.any(parents < -1) or np.any(parents >= idx):
        bad = int(np.flatnonzero((parents < -1) | (parents >= idx))[0])
        raise ValueError(f"parents[{bad}] = {int(parents[bad])}: a parent must precede its child (or be -1)")
    d = depths(parents)
    if np.any(np.diff(d) < 0):
        raise ValueError(f"depths {d.tolist()} decrease: the tree is not in breadth-first order")


def depths(parents: np.ndarray) -> np.ndarray:
    """``[N] int32`` depth of each node: 1 for children of the root.

    >>> depths(np.array([-1, -1, 0, 2])).tolist()
    [1, 1, 2, 3]
    """
    d = np.zeros(len(parents), np.int32)
    for i, p in enumerate(parents):
        d[i] = 1 if p < 0 else d[p] + 1
    return d


def pass_inputs(root: int, tree: DraftTree, start: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and positions ``[width]`` of a verification pass over ``root`` and ``tree`` at committed length
    ``start``: row 0 the root, row i + 1 node i at ``start`` + its depth; rows past the tree repeat the root
    (padding up to a fixed width).

    >>> pass_inputs(7, DraftTree(np.array([3, 4]), np.array([-1, 0])), 10, 4)
    (array([7, 3, 4, 7]), array([10, 11, 12, 10]))
    """
    n = len(tree) + 1
    tokens = np.full(width, root, np.int64)
    tokens[1:n] = tree.tokens
    pos = np.full(width, start, np.int64)
    pos[1:n] += tree.depths()
    return tokens, pos


def ancestor_mask(parents: np.ndarray, include_root: bool = False) -> np.ndarray:
    """``[N, N] bool`` with ``mask[i, j]`` true iff j is i or an ancestor of i.

    With ``include_root`` the result is ``[N+1, N+1]`` with the root token at index 0, which every node
    sees; this is the in-tree block of the verification attention mask.

    >>> ancestor_mask(np.array([-1, 0, -1])).astype(int).tolist()
    [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    """
    n = len(parents)
    m = np.zeros((n, n), bool)
    for i in range(n):  # O(N * depth): parents precede children, so row p is complete before row i
        p = parents[i]
        if p >= 0:
            m[i] = m[p]
        m[i, i] = True
    if not include_root:
        return m
    full = np.zeros((n + 1, n + 1), bool)
    full[:, 0] = True
    full[1:, 1:] = m
    return full


def paths(parents: np.ndarray) -> list[list[int]]:
    """Root-to-leaf node index paths, one per leaf, ordered by leaf index.

    >>> paths(np.array([-1, -1, 0, 2]))
    [[1], [0, 2, 3]]
    """
    n = len(parents)
    is_parent = np.zeros(n, bool)
    is_parent[parents[parents >= 0]] = True
    out = []
    for leaf in np.flatnonzero(~is_parent):
        path, q = [], int(leaf)
        while q >= 0:
            path.append(q)
            q = int(parents[q])
        out.append(path[::-1])
    return out


def from_paths(token_paths: Iterable[Sequence[int]], max_nodes: int | None = None) -> DraftTree:
    """The prefix trie of token paths, breadth-first, truncated to ``max_nodes`` nodes.

    Siblings keep the order in which their prefixes first appear; nodes are sorted by depth and then by
    their sibling-index path, so truncation drops the deepest, latest nodes and keeps a valid tree.

    >>> t = from_paths([[10, 12, 13], [11], [10, 14]])
    >>> t.tokens.tolist(), t.parents.tolist()
    ([10, 11, 12, 14, 13], [-1, -1, 0, 0, 2])
    """
    children: dict[tuple, dict[int, tuple]] = {(): {}}
    for path in token_paths:
        prefix: tuple = ()
        for tok in path:
            tok = int(tok)
            kids = children[prefix]
            if tok not in kids:
                kids[tok] = prefix + (tok,)
                children[kids[tok]] = {}
            prefix = kids[tok]
    # breadth-first walk: children in first-appearance order gives (depth, sibling-index path) order
    tokens, parents, frontier = [], [], [((), -1)]
    while frontier:
        nxt = []
        for prefix, idx in frontier:
            for tok, child in children[prefix].items():
                if max_nodes is not None and len(tokens) >= max_nodes:
                    return DraftTree(np.array(tokens), np.array(parents))
                tokens.append(tok)
                parents.append(idx)
                nxt.append((child, len(tokens) - 1))
        frontier = nxt
    return DraftTree(np.array(tokens, np.int32), np.array(parents, np.int32))
