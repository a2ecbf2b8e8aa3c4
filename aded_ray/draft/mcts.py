"""ADED's Monte-Carlo tree search drafter over the tri-gram matrix (aded-algorithm.md §4).

One call, for the step whose root token is ``r`` after committed token ``a0``:

1. ``iterations`` PUCT iterations from the root context (a0, r): selection by
   ``U = W/n + P * sqrt(N) / (1 + n) * (c1 + ln((N + c2 + 1) / c2))`` (unvisited children first, in
   creation order), full expansion of the reached leaf (every successor becomes a child, prior = its
   weight), a rollout to ``depth`` tokens sampled in proportion to the weights, reward
   ``1 + sum of tri-gram weights`` along the state, backup to the root.
2. Every node's sentence ``[r] + tokens root->node``, sorted by visits (stable, depth-first order),
   top ``top_sentences`` kept, each extended by its context's heaviest successor.
3. Paths de-duplicated, cut to ``choices`` distinct-token budget (longest-count paths dropped first),
   turned into a prefix trie of at most ``max_nodes`` nodes.

Worked example (tests/test_mcts.py): with only ``(1, 2) -> {3: 1.0}`` and ``(2, 3) -> {4: 1.0}``
in the matrix, ``draft(context=[1, 2])`` gives the single path ``[3, 4]`` (3 from the search, 4 from the
greedy extension).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from aded_ray.draft import kernels as K
from aded_ray.draft.tree import DraftTree, from_paths

REWARDS = ("shipped", "intended")


@njit(cache=True, inline="always")
def _rand(state):
    """xorshift64* step on ``state[0]``; a float in [0, 1)."""
    x = state[0]
    x ^= x >> np.uint64(12)
    x ^= x << np.uint64(25)
    x ^= x >> np.uint64(27)
    state[0] = x
    return np.float64((x * np.uint64(2685821657736338717)) >> np.uint64(11)) / 9007199254740992.0


@njit(cache=True)
def mcts_search(base, ov, prm, a0, r, iterations, depth, c1, c2, top_sentences, reward_intended,
                shuffle, seed, paths_out, visits_out):
    """Run the search and write the kept sentences (without the root) into ``paths_out``.

    ``paths_out`` is ``[top_sentences, depth + 1] int32`` filled with -1 padding; returns the number of
    rows written. ``visits_out[i]`` receives the visit count of row i's node (for tests and statistics).
    Node bookkeeping is returned for invariant tests by :func:`mcts_tree`.
    """
    tok, ctxa, parent, fchild, nchild, visits, W, P, dep = mcts_tree(
        base, ov, prm, a0, r, iterations, depth, c1, c2, reward_intended, shuffle, seed)
    n_nodes = tok.shape[0]
    # depth-first order (stable tie order for the visit sort)
    order = np.empty(n_nodes, np.int64)
    stack = np.empty(n_nodes, np.int64)
    sp, k = 0, 0
    stack[0] = 0
    sp = 1
    while sp > 0:
        sp -= 1
        v = stack[sp]
        order[k] = v
        k += 1
        for c in range(nchild[v] - 1, -1, -1):
            stack[sp] = fchild[v] + c
            sp += 1
    keyv = np.empty(n_nodes, np.int64)
    for i in range(n_nodes):
        keyv[i] = -visits[order[i]]
    ranked = order[np.argsort(keyv, kind="mergesort")]
    tok_buf = np.empty(K.MAX_SUCC, np.int32)
    w_buf = np.empty(K.MAX_SUCC, np.float64)
    rows = 0
    for i in range(min(top_sentences, n_nodes)):
        v = ranked[i]
        d = dep[v]
        if d == 0:
            continue  # the root's sentence [r] is dropped
        q = v
        for j in range(d - 1, -1, -1):
            paths_out[rows, j] = tok[q]
            q = parent[q]
        for j in range(d, paths_out.shape[1]):
            paths_out[rows, j] = -1
        # greedy extension: the heaviest successor of the node's own context
        if d < paths_out.shape[1]:
            n = K.successors(base, ov, prm, ctxa[v], tok[v], tok_buf, w_buf)
            if n > 0:
                paths_out[rows, d] = tok_buf[0]
        visits_out[rows] = visits[v]
        rows += 1
    return rows


@njit(cache=True)
def mcts_tree(base, ov, prm, a0, r, iterations, depth, c1, c2, reward_intended, shuffle, seed):
    """The search itself; returns the node arrays ``(tok, ctxa, parent, fchild, nchild, visits, W, P, dep)``.

    Node v holds the context pair ``(ctxa[v], tok[v])``; children of a node are contiguous
    (``fchild[v] .. fchild[v] + nchild[v] - 1``) because expansion creates them all at once.
    """
    cap = 1 + iterations * K.MAX_SUCC
    tok = np.empty(cap, np.int32)
    ctxa = np.empty(cap, np.int32)
    parent = np.empty(cap, np.int32)
    fchild = np.empty(cap, np.int32)
    nchild = np.zeros(cap, np.int32)
    visits = np.zeros(cap, np.int64)
    W = np.zeros(cap, np.float64)
    P = np.zeros(cap, np.float64)
    dep = np.zeros(cap, np.int32)
    tok[0], ctxa[0], parent[0], fchild[0], P[0], dep[0] = r, a0, -1, -1, 0.0, 0
    n_nodes = 1
    rng = np.array([np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(0x632BE59BD9B4E019)], np.uint64)
    if rng[0] == 0:
        rng[0] = np.uint64(1)
    tok_buf = np.empty(K.MAX_SUCC, np.int32)
    w_buf = np.empty(K.MAX_SUCC, np.float64)
    perm = np.empty(K.MAX_SUCC, np.int64)
    sa = np.empty(depth + 1, np.int32)
    sb = np.empty(depth + 1, np.int32)
    L_max = depth + 1
    for _ in range(iterations):
        node = 0
        sa[0], sb[0] = a0, r
        L = 1
        done = False
        # selection
        while nchild[node] > 0 and not done:
            N = visits[node]
            best, best_u = -1, -np.inf
            for c in range(nchild[node]):
                ch = fchild[node] + c
                if visits[ch] == 0:
                    u = np.inf
                else:
                    u = W[ch] / visits[ch] + P[ch] * math.sqrt(N) / (1 + visits[ch]) * (
                        c1 + math.log((N + c2 + 1.0) / c2))
                if u > best_u:
                    best, best_u = ch, u
            node = best
            sa[L], sb[L] = ctxa[node], tok[node]
            L += 1
            if L == L_max:
                done = True
        # expansion (full): every successor of the leaf's context becomes a child
        if not done:
            n = K.successors(base, ov, prm, ctxa[node], tok[node], tok_buf, w_buf)
            if n > 0:
                for i in range(n):
                    perm[i] = i
                if shuffle:  # emulate the random creation order of the authors' hash map
                    for i in range(n - 1, 0, -1):
                        j = int(_rand(rng) * (i + 1))
                        perm[i], perm[j] = perm[j], perm[i]
                fchild[node] = n_nodes
                nchild[node] = n
                for i in range(n):
                    ch = n_nodes + i
                    tok[ch] = tok_buf[perm[i]]
                    ctxa[ch] = tok[node]
                    parent[ch] = node
                    fchild[ch] = -1
                    P[ch] = w_buf[perm[i]]
                    dep[ch] = dep[node] + 1
                n_nodes += n
                node = n_nodes - 1  # the last created child
                sa[L], sb[L] = ctxa[node], tok[node]
                L += 1
        # rollout (not added to the tree): sample successors in proportion to their weights
        while L < L_max:
            n = K.successors(base, ov, prm, sa[L - 1], sb[L - 1], tok_buf, w_buf)
            if n == 0:
                break
            total = 0.0
            for i in range(n):
                total += w_buf[i]
            x = _rand(rng) * total
            pick = n - 1
            for i in range(n):
                x -= w_buf[i]
                if x < 0:
                    pick = i
                    break
            sa[L], sb[L] = sb[L - 1], tok_buf[pick]
            L += 1
        # reward: 1 + tri-gram weights along the state (the shipped code reads M[(a, b)][b] instead)
        R = 1.0
        for i in range(L - 1):
            c = sb[i + 1] if reward_intended else sb[i]
            R += K.weight_of(base, ov, prm, sa[i], sb[i], c)
        v = node
        while v >= 0:
            visits[v] += 1
            W[v] += R
            v = parent[v]
    return (tok[:n_nodes], ctxa[:n_nodes], parent[:n_nodes], fchild[:n_nodes], nchild[:n_nodes],
            visits[:n_nodes], W[:n_nodes], P[:n_nodes], dep[:n_nodes])


def cut_to_budget(paths: list[list[int]], choices: int) -> list[list[int]]:
    """REST's cut: while the summed distinct-token counts exceed ``choices``, drop the path with the
    largest count (ties: the later path first)."""
    counts = [len(set(p)) for p in paths]
    total = sum(counts)
    if total <= choices:
        return paths
    order = sorted(range(len(paths)), key=lambda i: (-counts[i], -i))
    dropped = set()
    for i in order:
        if total <= choices:
            break
        dropped.add(i)
        total -= counts[i]
    return [p for i, p in enumerate(paths) if i not in dropped]


class MCTSDrafter:
    """ADED's drafter with the authors' settings as defaults; every budget is a parameter.

    ``draft(seq)`` takes the committed tokens plus the step's root token and returns a :class:`DraftTree`.
    ``observe(seq)`` runs the adaptive update (call it once per step, before ``draft``).
    """

    def __init__(self, matrix, *, iterations: int = 150, depth: int = 3, c1: float = 32.0, c2: float = 8.0,
                 top_sentences: int = 24, choices: int = 64, max_nodes: int = 64, reward: str = "shipped",
                 shuffle_children: bool = True, window: int = 16, seed: int = 0):
        if reward not in REWARDS:
            raise ValueError(f"reward {reward!r} is not one of {REWARDS}")
        for name, v in (("iterations", iterations), ("depth", depth), ("top_sentences", top_sentences),
                        ("choices", choices), ("max_nodes", max_nodes), ("window", window)):
            if v < 0 or (name == "depth" and v < 1):
                raise ValueError(f"{name} = {v} is out of range")
        self.matrix = matrix
        self.iterations, self.depth, self.c1, self.c2 = iterations, depth, float(c1), float(c2)
        self.top_sentences, self.choices, self.max_nodes = top_sentences, choices, max_nodes
        self.reward, self.shuffle_children, self.window, self.seed = reward, shuffle_children, window, seed
        self._calls = 0

    def observe(self, seq) -> None:
        self.matrix.update(seq, self.window)

    def draft(self, seq, max_nodes: int | None = None, seed: int | None = None) -> DraftTree:
        """Draft at most ``max_nodes`` (default: the drafter's) nodes below root ``seq[-1]``.

        The same matrix state, ``seq`` and ``seed`` give the same tree; without ``seed`` a per-call seed is
        derived from the drafter's seed and its call count.
        """
        max_nodes = self.max_nodes if max_nodes is None else max_nodes
        if len(seq) < 1 or max_nodes <= 0 or self.iterations == 0:
            return DraftTree()
        if seed is None:
            seed = self.seed * 1_000_003 + self._calls
            self._calls += 1
        a0 = int(seq[-2]) if len(seq) >= 2 else -1
        rows, _ = self.search(a0, int(seq[-1]), seed)
        return self.tree_from_rows(rows, max_nodes)

    def search(self, a0: int, r: int, seed: int) -> tuple[list[list[int]], np.ndarray]:
        m = self.matrix
        out = np.full((max(self.top_sentences, 1), self.depth + 1), -1, np.int32)
        vis = np.zeros(max(self.top_sentences, 1), np.int64)
        n = mcts_search(m.base, m.ov, m.prm, a0, r, self.iterations, self.depth, self.c1, self.c2,
                        self.top_sentences, self.reward == "intended", self.shuffle_children, seed, out, vis)
        return [[int(t) for t in row if t >= 0] for row in out[:n]], vis[:n]

    def tree_from_rows(self, rows: list[list[int]], max_nodes: int) -> DraftTree:
        unique = list(dict.fromkeys(tuple(p) for p in rows if p))
        kept = cut_to_budget([list(p) for p in unique], self.choices)
        return from_paths(kept, max_nodes)
