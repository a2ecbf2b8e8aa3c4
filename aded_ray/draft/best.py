"""aded_ray's own drafter: a probability-ranked draft tree from three sources, beyond ADED.

Sources of next-token candidates for a context C (the request's committed tokens + root + the tree path):

- **request**: the longest earlier match of C's suffix inside the request itself (prompt and output so far,
  the whole request, not a 16-token window), and the tokens that followed it;
- **history**: the same over the recent past requests of this process (what the model said before);
- **matrix**: ADED's tri-gram matrix (corpus + adaptive deltas) at C's last two tokens.

Each source gives a probability that a token is the model's next one: the request and history sources
``count / total * conf[m]``, where ``conf[m]`` is the measured accuracy of a match of length m (a table:
one matching token predicts the next ~30% of the time in the request, a 16-token match ~97%); the matrix
``matrix_conf * weight / (total weight + matrix_smooth)``: the weight share is well calibrated, and the
smoothing keeps a context known from a single adaptive bump from claiming certainty. They are combined as independent evidence:
``p = 1 - prod(1 - p_source)``. A node's score is the product of p along its path: the probability that
verification accepts it. The tree is grown best-first by score, so a budget of B nodes holds the B nodes
with the highest acceptance probability, which maximises the expected accepted length for that budget
(depth and breadth follow the evidence instead of fixed shapes). Miss on every source -> empty draft.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from aded_ray.draft import kernels as K
from aded_ray.draft.suffix import TokenIndex, match
from aded_ray.draft.tree import DraftTree

# Accuracy of the top continuation by match length m (index m, the last entry for every longer match),
# measured on the first half of the MT-Bench and HumanEval traces of SmolLM2 (README, "Beyond ADED").
REQUEST_CONF = (0.0, 0.30, 0.52, 0.66, 0.70, 0.82, 0.83, 0.85, 0.87, 0.87, 0.87, 0.88, 0.89, 0.89, 0.89, 0.90, 0.97)
HISTORY_CONF = (0.0, 0.22, 0.35, 0.45, 0.55, 0.60, 0.65, 0.70, 0.70, 0.70, 0.80, 0.82, 0.85, 0.85, 0.85, 0.85, 0.85)

DEFAULTS = dict(
    request_conf=REQUEST_CONF,     # request suffix source: p = conf[m] * count / total
    history_conf=HISTORY_CONF,     # history source, likewise
    matrix_conf=1.0,               # tri-gram matrix source: p = matrix_conf * weight / (total weight + smooth)
    matrix_smooth=0.15,            # keeps a context seen once (one 0.04 bump) from claiming certainty
    branch=8,                      # candidates kept per node
    max_depth=32,
    min_p=0.0,                     # children below this probability are not proposed
    max_len=16, max_occ=256,       # suffix matching: longest match considered, occurrences scanned
)


@njit(cache=True)
def _add_candidate(toks, ps, n, tok, p):
    for i in range(n):
        if toks[i] == tok:
            ps[i] = 1.0 - (1.0 - ps[i]) * (1.0 - p)
            return n
    if n < toks.shape[0]:
        toks[n] = tok
        ps[n] = p
        n += 1
    return n


@njit(cache=True)
def _add_matches(toks, ps, n, mt, mc, k, conf):
    """Add k matched continuations with p = conf * count / total."""
    total = 0.0
    for i in range(k):
        total += mc[i]
    for i in range(k):
        n = _add_candidate(toks, ps, n, mt[i], conf * mc[i] / total)
    return n


@njit(cache=True)
def _candidates(rseq, rn, rprev, rlast, hseq, hn, hprev, hlast, base, ov, prm, tail, n_tail, off_path,
                prm_f, prm_i, rconf, hconf, toks, ps, mt, mc, tbuf, wbuf):
    """Candidates for the context ``rseq[:rn] + path``, where ``tail[:n_tail]`` is the end of that context
    and the path starts at ``tail[off_path]``."""
    mconf, msmooth = prm_f[0], prm_f[2]
    max_len, max_occ = prm_i[0], prm_i[1]
    n = 0
    path = tail[off_path:n_tail]
    k, m = match(rseq, rn, rprev, rlast, path, path.shape[0], max_len, max_occ, mt, mc)
    n = _add_matches(toks, ps, n, mt, mc, k, rconf[min(m, rconf.shape[0] - 1)])
    if hn > 1:
        # the context is not part of the history: match the context's tail (request end + path)
        k, m = match(hseq, hn, hprev, hlast, tail, n_tail, max_len, max_occ, mt, mc)
        n = _add_matches(toks, ps, n, mt, mc, k, hconf[min(m, hconf.shape[0] - 1)])
    # tri-gram matrix on the last two context tokens
    a = tail[n_tail - 2] if n_tail >= 2 else -1
    b = tail[n_tail - 1] if n_tail >= 1 else -1
    kk = K.successors(base, ov, prm, a, b, tbuf, wbuf)
    if kk > 0:
        total = 0.0
        for i in range(kk):
            total += wbuf[i]
        for i in range(kk):
            n = _add_candidate(toks, ps, n, tbuf[i], mconf * wbuf[i] / (total + msmooth))
    return n


@njit(cache=True)
def best_first_tree(rseq, rn, rprev, rlast, hseq, hn, hprev, hlast, base, ov, prm, prm_f, prm_i, rconf, hconf,
                    max_nodes, out_tok, out_par, out_score):
    """Grow the tree best-first; returns the number of nodes (in insertion order, parents before children)."""
    max_len, branch, max_depth = prm_i[0], prm_i[2], prm_i[3]
    min_p = prm_f[1]
    ctx = max_len + 2                        # request tokens kept in front of the path for matching
    tail = np.empty(ctx + max_depth + 1, np.int32)
    cap_f = max_nodes * branch + branch + 1
    f_tok = np.empty(cap_f, np.int32)
    f_par = np.empty(cap_f, np.int32)
    f_sc = np.empty(cap_f, np.float64)
    nf = 0
    depth = np.empty(max_nodes + 1, np.int32)
    toks = np.empty(64, np.int32)
    ps = np.empty(64, np.float64)
    mt = np.empty(16, np.int32)
    mc = np.empty(16, np.int32)
    tbuf = np.empty(K.MAX_SUCC, np.int32)
    wbuf = np.empty(K.MAX_SUCC, np.float64)
    n_nodes = 0
    node = -1                                 # expand the root first
    while True:
        # context of ``node``: the last ``ctx`` request tokens + the path to node
        d = 0 if node < 0 else depth[node]
        q = node
        for i in range(d - 1, -1, -1):
            tail[ctx + i] = out_tok[q]
            q = out_par[q]
        start = max(0, rn - ctx)
        off = ctx - (rn - start)
        for i in range(start, rn):
            tail[off + i - start] = rseq[i]
        tl = tail[off:ctx + d]
        if d < max_depth:
            n = _candidates(rseq, rn, rprev, rlast, hseq, hn, hprev, hlast, base, ov, prm,
                            tl, tl.shape[0], ctx - off, prm_f, prm_i, rconf, hconf, toks, ps, mt, mc, tbuf, wbuf)
            parent_sc = 1.0 if node < 0 else out_score[node]
            # keep the best ``branch`` candidates
            for _ in range(min(branch, n)):
                bi = -1
                bp = min_p
                for i in range(n):
                    if ps[i] >= bp:
                        bp = ps[i]
                        bi = i
                if bi < 0:
                    break
                if nf < cap_f:
                    f_tok[nf] = toks[bi]
                    f_par[nf] = node
                    f_sc[nf] = parent_sc * ps[bi]
                    nf += 1
                ps[bi] = -1.0
        if n_nodes >= max_nodes or nf == 0:
            break
        bi = 0
        for i in range(1, nf):
            if f_sc[i] > f_sc[bi]:
                bi = i
        out_tok[n_nodes] = f_tok[bi]
        out_par[n_nodes] = f_par[bi]
        out_score[n_nodes] = f_sc[bi]
        depth[n_nodes] = 1 if f_par[bi] < 0 else depth[f_par[bi]] + 1
        node = n_nodes
        n_nodes += 1
        nf -= 1
        f_tok[bi], f_par[bi], f_sc[bi] = f_tok[nf], f_par[nf], f_sc[nf]
    return n_nodes


class BestDrafter:
    """Request + history suffix matching and the adaptive tri-gram matrix, grown best-first by acceptance
    probability. ``observe(seq)`` runs ADED's adaptive update and indexes the request; ``draft(seq, b)``
    returns at most b nodes (the b most probable) with their scores."""

    def __init__(self, matrix, *, history_tokens: int = 262_144, window: int = 16, **params):
        unknown = set(params) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"unknown drafter parameters {sorted(unknown)}; known: {sorted(DEFAULTS)}")
        p = {**DEFAULTS, **params}
        for name in ("branch", "max_depth", "max_len", "max_occ"):
            if int(p[name]) < 1:
                raise ValueError(f"{name} = {p[name]} must be >= 1")
        self.params = p
        self.matrix = matrix
        self.window = window
        self.history_tokens = history_tokens
        self.prm_f = np.array([p["matrix_conf"], p["min_p"], p["matrix_smooth"]], np.float64)
        self.rconf = np.asarray(p["request_conf"], np.float64)
        self.hconf = np.asarray(p["history_conf"], np.float64)
        if self.rconf.ndim != 1 or self.hconf.ndim != 1 or not (0 <= self.rconf).all() or not (self.rconf <= 1).all():
            raise ValueError(f"request_conf/history_conf must be tables of probabilities, got {p['request_conf']}")
        self.prm_i = np.array([p["max_len"], p["max_occ"], p["branch"], p["max_depth"]], np.int64)
        self.request = TokenIndex(matrix.vocab_size)
        self.history = TokenIndex(matrix.vocab_size)
        # Optional sharing hook (duck-typed, e.g. SharedStore): ``record_request(tokens)`` receives this
        # process's finished requests, ``drain_history(drafter)`` hands over the other processes' ones.
        self.journal = None

    def observe(self, seq) -> None:
        seq = np.asarray(seq, np.int32)
        if self.journal is not None:
            self.journal.drain_history(self)
        self.matrix.update(seq, self.window)
        r = self.request
        if r.n <= seq.shape[0] and np.array_equal(r.seq[: r.n], seq[: r.n]):
            r.extend(seq[r.n:])          # the same request, grown
        else:                             # a new request: the finished one joins the history
            self.remember(r.seq[: r.n])
            r.clear()
            r.extend(seq)

    def reset(self) -> None:
        """Forget the current request and the history (the matrix deltas are the matrix's business)."""
        self.request.clear()
        self.history.clear()

    def remember(self, tokens, share: bool = True) -> None:
        """Add a finished request's tokens to the history (cleared when it outgrows its budget); with
        ``share`` it is also handed to the journal (the fleet's shared history)."""
        if len(tokens) == 0:
            return
        if share and self.journal is not None:
            self.journal.record_request(tokens)
        if self.history.n + len(tokens) > self.history_tokens:
            self.history.clear()
        self.history.extend(tokens)

    def draft(self, seq, max_nodes: int | None = None) -> DraftTree:
        b = 64 if max_nodes is None else int(max_nodes)
        if b <= 0:
            return DraftTree()
        r = self.request
        if r.n != len(seq):
            self.observe(seq)  # draft() without observe(): index the request now
        if r.n == 0:
            return DraftTree()
        out_tok = np.empty(b, np.int32)
        out_par = np.empty(b, np.int32)
        out_sc = np.empty(b, np.float64)
        m, h = self.matrix, self.history
        n = best_first_tree(r.seq, r.n, r.prev, r.last, h.seq, h.n, h.prev, h.last, m.base, m.ov, m.prm,
                            self.prm_f, self.prm_i, self.rconf, self.hconf, b, out_tok, out_par, out_sc)
        return _bfs(out_tok[:n], out_par[:n], out_sc[:n])


def _bfs(tok, par, score) -> DraftTree:
    """Re-order insertion-ordered nodes breadth-first (stable), remapping parents; scores travel along."""
    n = tok.shape[0]
    depth = np.zeros(n, np.int32)
    for i in range(n):
        depth[i] = 1 if par[i] < 0 else depth[par[i]] + 1
    order = np.lexsort((np.arange(n), depth))
    new_of = np.empty(n, np.int32)
    new_of[order] = np.arange(n, dtype=np.int32)
    parents = np.where(par[order] < 0, -1, new_of[np.maximum(par[order], 0)]).astype(np.int32)
    return DraftTree(tok[order], parents, score[order])
