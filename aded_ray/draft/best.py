"""aded_ray's own drafter: a probability-ranked draft tree from several sources, beyond ADED.

Sources of next-token candidates for a context C (the request's committed tokens + root + the tree path):

- **request**: the longest earlier match of C's suffix inside the request itself (prompt and output so far,
  the whole request, not a 16-token window), and the tokens that followed it;
- **history**: the same over the recent past requests of this process (and of the fleet, via the store);
- **matrix**: ADED's tri-gram matrix (corpus + adaptive deltas) at C's last two tokens;
- **recycle**: the model's own top-k after C's last two tokens (else its last token), recorded from the
  logits of earlier verification passes (:mod:`aded_ray.draft.recycle`).

Each source gives a probability that a token is the model's next one: request and history
``conf[m] * count / total`` (``conf[m]``: measured accuracy of a match of length m), the matrix
``matrix_conf * weight / (total weight + matrix_smooth)``, recycle ``conf * model probability``. A
logistic model over that evidence (:mod:`aded_ray.draft.combine`), learned online from what verification
accepts, turns it into one acceptance probability per candidate; it starts as the noisy-OR
``1 - prod(1 - p_s)``. A node's score is the product along its path: the probability that verification
accepts it. The tree is grown best-first by score, so a budget of B nodes holds the B nodes with the highest
acceptance probability, which maximises the expected accepted length for that budget (depth and breadth
follow the evidence instead of fixed shapes). Miss on every source -> empty draft.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from aded_ray.draft import combine as C
from aded_ray.draft import kernels as K
from aded_ray.draft import recycle as R
from aded_ray.draft import step as S
from aded_ray.draft.step import _to_bfs_into, observe_kernel
from aded_ray.draft.suffix import TokenIndex, match3
from aded_ray.draft.tree import DraftTree

# Accuracy of the top continuation by match length m (index m, the last entry for every longer match),
# measured on a dev set disjoint from the evaluation sets: SmolLM2's greedy answers to 383 ShareGPT first
# user turns (`aded record-traces --prompts sharegpt`), made monotone (pool-adjacent-violators). They are
# priors: the online combiner re-weighs every source from what verification accepts.
REQUEST_CONF = (0.0, 0.22, 0.55, 0.59, 0.73, 0.76, 0.76, 0.77, 0.87, 0.88, 0.88, 0.9, 0.9, 0.9, 0.91, 0.91, 0.98)
HISTORY_CONF = (0.0, 0.14, 0.27, 0.36, 0.45, 0.47, 0.52, 0.52, 0.55, 0.7, 0.71, 0.71, 0.71, 0.78, 0.78, 0.78, 0.99)

DEFAULTS = dict(
    request_conf=REQUEST_CONF,     # request suffix source: p = conf[m] * count / total
    history_conf=HISTORY_CONF,     # history source, likewise
    matrix_conf=1.0,               # tri-gram matrix source: p = matrix_conf * weight / (total weight + smooth)
    matrix_smooth=0.15,            # keeps a context seen once (one 0.04 bump) from claiming certainty
    recycle_conf=(1.0, 0.4),       # recycle source: p = conf * model probability (pair matched, last token only)
    recycle_k=8,                   # model predictions kept per context
    branch=8,                      # candidates kept per node
    max_depth=32,
    min_p=0.0,                     # children below this probability are not proposed
    max_len=16, max_occ=256,       # suffix matching: longest match considered, occurrences scanned
    weights=None,                  # initial weights of the combiner (None: the noisy-OR prior)
    learn_rate=0.05,               # combiner learning rate (0: never learn)
)

S_REQ, S_HIST, S_MAT, S_PAIR, S_LAST = range(C.N_SRC)
MAX_CAND = 64
_NO_TOK = np.zeros(0, np.int32)
_NO_FEAT = np.zeros((0, C.N_FEAT), np.float64)


@njit(cache=True, inline="always")
def _add(toks, cp, n, tok, s, p):
    """Add evidence ``p`` from source ``s`` for ``tok``; returns the new candidate count."""
    for i in range(n):
        if toks[i] == tok:
            cp[i, s] = 1.0 - (1.0 - cp[i, s]) * (1.0 - p)
            return n
    if n < toks.shape[0]:
        toks[n] = tok
        for j in range(C.N_SRC):
            cp[n, j] = 0.0
        cp[n, s] = p
        n += 1
    return n


@njit(cache=True, inline="always")
def _copy_row(src, i, dst, j):
    """``dst[j] = src[i]`` without the two row views (and their reference counting) numba would make."""
    for f in range(src.shape[1]):
        dst[j, f] = src[i, f]


@njit(cache=True, inline="always")
def _add_matches(toks, cp, n, mt, mc, k, conf, s):
    """Add k matched continuations with p = conf * count / total."""
    total = 0.0
    for i in range(k):
        total += mc[i]
    for i in range(k):
        n = _add(toks, cp, n, mt[i], s, conf * mc[i] / total)
    return n


@njit(cache=True, inline="always")
def _candidates(rix, hix, mat, rec, tail, n_tail, off_path, prm_f, prm_i, rconf, hconf, toks, cp, mlen, bufs):
    """Candidates for the context ``request + path``, where ``tail[:n_tail]`` is the end of that context
    and the path starts at ``tail[off_path]``. Writes tokens, per-source probabilities and the two match
    lengths (``mlen``); returns the candidate count."""
    rseq, rn, rprev, rlast, rprev3, rhead3 = rix
    hseq, hn, hprev, hlast, hprev3, hhead3 = hix
    base, ov, prm = mat
    rkeys, rids, rprobs, n_tok, slot_bits = rec
    mt, mc, tbuf, wbuf = bufs
    max_len, max_occ = prm_i[0], prm_i[1]
    n = 0
    path = tail[off_path:n_tail]
    k, m = match3(rseq, rn, rprev, rlast, rprev3, rhead3, path, path.shape[0], max_len, max_occ, mt, mc)
    n = _add_matches(toks, cp, n, mt, mc, k, rconf[min(m, rconf.shape[0] - 1)], S_REQ)
    mlen[0] = m
    mlen[1] = 0
    if hn > 1:
        # the context is not part of the history: match the context's tail (request end + path)
        k, m = match3(hseq, hn, hprev, hlast, hprev3, hhead3, tail, n_tail, max_len, max_occ, mt, mc)
        n = _add_matches(toks, cp, n, mt, mc, k, hconf[min(m, hconf.shape[0] - 1)], S_HIST)
        mlen[1] = m
    a = tail[n_tail - 2] if n_tail >= 2 else -1
    b = tail[n_tail - 1] if n_tail >= 1 else -1
    kk = K.successors(base, ov, prm, a, b, tbuf, wbuf)
    if kk > 0:
        total = 0.0
        for i in range(kk):
            total += wbuf[i]
        for i in range(kk):
            n = _add(toks, cp, n, tbuf[i], S_MAT, prm_f[0] * wbuf[i] / (total + prm_f[2]))
    row, exact = R.lookup(rkeys, n_tok, slot_bits, a, b)
    if row >= 0:
        s, conf = (S_PAIR, prm_f[3]) if exact else (S_LAST, prm_f[4])
        for j in range(rids.shape[1]):
            if rprobs[row, j] == 0:
                break
            n = _add(toks, cp, n, rids[row, j], s, conf * (rprobs[row, j] * R.P_STEP))
    return n


@njit(cache=True)
def scratch_sizes(max_nodes, prm_i):
    """Lengths of :func:`best_first_tree`'s scratch arrays ``(int32, float64, rows of the 2-D float64)`` for up
    to ``max_nodes`` nodes with the drafter's ``prm_i`` (the kernel lays them out in this order)."""
    max_len, branch, max_depth = prm_i[0], prm_i[2], prm_i[3]
    cap_f = max_nodes * branch + branch + 1
    n_i = (max_len + 2 + max_depth + 1) + 2 * cap_f + (max_nodes + 1) + MAX_CAND + 32 + K.MAX_SUCC + 2 + 4 * max_nodes
    n_f = C.N_SRC + cap_f + MAX_CAND + K.MAX_SUCC + max_nodes
    return n_i, n_f, cap_f + 2 * MAX_CAND + max_nodes


@njit(cache=True)
def best_first_tree(rix, hix, mat, rec, prm_f, prm_i, rconf, hconf, w, sc, wl, max_nodes, out_tok, out_par,
                    out_score, out_feat, si, sf, sg):
    """Grow the tree best-first; returns the number of nodes, breadth-first. ``out_feat[i]`` holds node i's
    combiner features (for learning once verification has judged it); ``sc``/``wl``: the sources' verdict
    counts in this request and in the workload (:func:`aded_ray.draft.combine.reliability`).
    ``si``/``sf``/``sg``: scratch (int32, float64, float64 rows of ``N_FEAT``) of at least
    :func:`scratch_sizes`, reused from step to step (fresh arrays are made when they are too small): no
    allocation per call, each of which costs a microsecond or more once a forward pass has evicted the
    allocator."""
    max_len, branch, max_depth = prm_i[0], prm_i[2], prm_i[3]
    ctx = max_len + 2                        # request tokens kept in front of the path for matching
    cap_f = max_nodes * branch + branch + 1
    n_i, n_f, n_g = scratch_sizes(max_nodes, prm_i)
    if si.shape[0] < n_i or sf.shape[0] < n_f or sg.shape[0] < n_g or sg.shape[1] != C.N_FEAT:
        si = np.empty(n_i, np.int32)
        sf = np.empty(n_f, np.float64)
        sg = np.empty((n_g, C.N_FEAT), np.float64)
    o = ctx + max_depth + 1
    tail = si[:o]
    f_tok = si[o:o + cap_f]
    o += cap_f
    f_par = si[o:o + cap_f]
    o += cap_f
    depth = si[o:o + max_nodes + 1]
    o += max_nodes + 1
    toks = si[o:o + MAX_CAND]
    o += MAX_CAND
    mt = si[o:o + 16]
    mc = si[o + 16:o + 32]
    o += 32
    tbuf = si[o:o + K.MAX_SUCC]
    o += K.MAX_SUCC
    mlen = si[o:o + 2]
    o += 2
    b_order = si[o:o + max_nodes]
    b_new = si[o + max_nodes:o + 2 * max_nodes]
    b_tok = si[o + 2 * max_nodes:o + 3 * max_nodes]
    b_par = si[o + 3 * max_nodes:o + 4 * max_nodes]
    rel = sf[:C.N_SRC]
    o = C.N_SRC
    f_sc = sf[o:o + cap_f]
    o += cap_f
    ps = sf[o:o + MAX_CAND]
    o += MAX_CAND
    wbuf = sf[o:o + K.MAX_SUCC]
    o += K.MAX_SUCC
    b_sc = sf[o:o + max_nodes]
    f_feat = sg[:cap_f]
    feat = sg[cap_f:cap_f + MAX_CAND]
    cp = sg[cap_f + MAX_CAND:cap_f + 2 * MAX_CAND]        # N_FEAT columns, the first N_SRC used
    b_feat = sg[cap_f + 2 * MAX_CAND:cap_f + 2 * MAX_CAND + max_nodes]
    mlen[0] = 0
    mlen[1] = 0
    bufs = (mt, mc, tbuf, wbuf)
    C.reliability(sc, wl, rel)
    rseq, rn = rix[0], rix[1]
    min_p = prm_f[1]
    nf = 0
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
            n = _candidates(rix, hix, mat, rec, tl, tl.shape[0], ctx - off, prm_f, prm_i, rconf, hconf, toks, cp,
                            mlen, bufs)
            for i in range(n):
                prior = 1.0
                for s in range(C.N_SRC):
                    prior *= 1.0 - cp[i, s]
                C.features_at(cp, i, 1.0 - prior, d + 1, mlen[0] if cp[i, S_REQ] > 0 else 0,
                              mlen[1] if cp[i, S_HIST] > 0 else 0, rel, feat, i)
                ps[i] = C.predict_at(w, feat, i)
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
                    _copy_row(feat, bi, f_feat, nf)
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
        _copy_row(f_feat, bi, out_feat, n_nodes)
        depth[n_nodes] = 1 if f_par[bi] < 0 else depth[f_par[bi]] + 1
        node = n_nodes
        n_nodes += 1
        nf -= 1
        f_tok[bi], f_par[bi], f_sc[bi] = f_tok[nf], f_par[nf], f_sc[nf]
        _copy_row(f_feat, nf, f_feat, bi)
    _to_bfs_into(n_nodes, depth, out_tok, out_par, out_score, out_feat, b_order, b_new, b_tok, b_par, b_sc, b_feat)
    return n_nodes


@njit(cache=True)
def observe_draft_kernel(rix, seq, ov, prm, window, tokens, parents, feats, n_ctx, learn, w, g2, lr, sc, wl, hix,
                         mat, rec, prm_f, prm_i, rconf, hconf, max_nodes, out_tok, out_par, out_score, out_feat,
                         si, sf, sg):
    """:func:`aded_ray.draft.step.observe_kernel` (with the adaptive update) then :func:`best_first_tree` for
    the request as observed: a step's whole drafting in one call. Returns ``(status, new_n, judged, nodes)``;
    a status other than ``OK`` changed nothing and drafted nothing. The last draft (``tokens``, ``parents``,
    ``feats``) is judged before the new one is written, so they may be views of the ``out_*`` buffers."""
    rseq, rn, rprev, rlast, rprev3, rhead3 = rix
    status, n, judged = observe_kernel(rseq, rn, rprev, rlast, rprev3, rhead3, seq, ov, prm, window, True, tokens,
                                       parents, feats, n_ctx, learn, w, g2, lr, sc, wl)
    if status != S.OK or n == 0 or max_nodes <= 0:
        return status, n, judged, 0
    nodes = best_first_tree((rseq, n, rprev, rlast, rprev3, rhead3), hix, mat, rec, prm_f, prm_i, rconf, hconf, w,
                            sc, wl, max_nodes, out_tok, out_par, out_score, out_feat, si, sf, sg)
    return status, n, judged, nodes


class _StepBuffers:
    """A state's reused arrays for up to ``cap`` nodes: :meth:`BestDrafter.observe_draft`'s outputs and the
    tree kernel's scratch (no allocation per step)."""

    __slots__ = ("cap", "tok", "par", "score", "feat", "si", "sf", "sg")

    def __init__(self, cap: int, prm_i):
        self.cap = cap
        self.tok = np.empty(cap, np.int32)
        self.par = np.empty(cap, np.int32)
        self.score = np.empty(cap, np.float64)
        self.feat = np.empty((cap, C.N_FEAT), np.float64)
        n_i, n_f, n_g = scratch_sizes(np.int64(cap), prm_i)
        self.si = np.empty(n_i, np.int32)
        self.sf = np.empty(n_f, np.float64)
        self.sg = np.empty((n_g, C.N_FEAT), np.float64)


class BestDrafter:
    """Request + history suffix matching, the adaptive tri-gram matrix and the model's recycled predictions,
    combined by an online-learned logistic model and grown best-first by acceptance probability.

    ``observe(seq)`` runs ADED's adaptive update, learns from the last draft's verdict and indexes the
    request; ``observe_logits(prev, inputs, top_ids, top_p)`` records the model's predictions from a
    verification pass; ``draft(seq, b)`` returns at most b nodes (the b most probable) with their scores."""

    def __init__(self, matrix, *, history_tokens: int = 262_144, window: int = 16, **params):
        unknown = set(params) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"unknown drafter parameters {sorted(unknown)}; known: {sorted(DEFAULTS)}")
        p = {**DEFAULTS, **params}
        for name in ("branch", "max_depth", "max_len", "max_occ", "recycle_k"):
            if int(p[name]) < 1:
                raise ValueError(f"{name} = {p[name]} must be >= 1")
        self.params = p
        self.matrix = matrix
        self.window = window
        self.history_tokens = history_tokens
        rc = tuple(p["recycle_conf"])
        if len(rc) != 2 or not all(0 <= c <= 1 for c in rc):
            raise ValueError(f"recycle_conf must be two probabilities, got {p['recycle_conf']}")
        self.prm_f = np.array([p["matrix_conf"], p["min_p"], p["matrix_smooth"], rc[0], rc[1]], np.float64)
        self.rconf = np.asarray(p["request_conf"], np.float64)
        self.hconf = np.asarray(p["history_conf"], np.float64)
        for t in (self.rconf, self.hconf):
            if t.ndim != 1 or not (0 <= t).all() or not (t <= 1).all():
                raise ValueError(f"request_conf/history_conf must be tables of probabilities, got {t.tolist()}")
        self.prm_i = np.array([p["max_len"], p["max_occ"], p["branch"], p["max_depth"]], np.int64)
        self.request = TokenIndex(matrix.vocab_size)   # the default session's request (single-request use)
        self.history = TokenIndex(matrix.vocab_size, hash_bits=18)
        self.recycle = R.RecycleTable(matrix.vocab_size, int(p["recycle_k"]))
        self.combiner = C.OnlineLogistic(p["weights"], p["learn_rate"])
        self._last = None                 # (context length, tokens, parents, features) of the last draft
        self._buf = None                  # observe_draft's output arrays
        self.sc = np.zeros((2, C.N_SRC))  # the request's verdicts per source (combine.reliability)
        # Optional sharing hook (duck-typed, e.g. SharedStore): ``record_request(tokens)`` receives this
        # process's finished requests, ``drain_history(drafter)`` hands over the other processes' ones.
        self.journal = None

    def observe(self, seq) -> None:
        """Single-request use: a ``seq`` that does not continue the indexed request starts a new one (the
        finished one joins the history). Concurrent requests each use their own :meth:`session`."""
        seq = np.asarray(seq, np.int32)
        if self._observe(self, seq, restart=False):
            return
        r = self.request
        self._last = None
        self.sc[:] = 0.0
        self.remember(r.seq[: r.n])
        r.clear()
        self._observe(self, seq)

    def _observe(self, state, seq: np.ndarray, restart: bool = True) -> bool:
        """Adaptive update, judge the state's last draft, index the tokens new to its request; the common case
        in one kernel (:func:`aded_ray.draft.step.observe_kernel`). A ``seq`` that does not continue the
        request starts it over (``restart``) or changes nothing and returns False."""
        if self.journal is not None:
            self.journal.drain_history(self)
        r, m, c = state.request, self.matrix, self.combiner
        last = state._last
        fast_update = m.journal is None       # a journal (fleet store) sees every update through matrix.update
        if last is None:
            n_ctx, tokens, parents, feats = -1, _NO_TOK, _NO_TOK, _NO_FEAT
        else:
            n_ctx, tokens, parents, feats = last
        status, n, judged = observe_kernel(r.seq, r.n, r.prev, r.last, r.prev3, r.head3, seq, m.ov, m.prm,
                                           self.window, fast_update, tokens, parents, feats, n_ctx,
                                           last is not None and c.lr > 0, c.w, c.g2, c.lr, state.sc, c.workload)
        if status == S.OK:
            state._last = None
            r.n = n
            c.seen += judged
            if not fast_update:
                m.update(seq, self.window)
            return True
        if status == S.RESTART and not restart:
            return False
        m.update(seq, self.window)
        if status == S.SLOW:
            self._learn(state, seq)
            r.extend(seq[r.n:])
        else:                            # a session's tokens never shrink; start over if they do
            state._last = None
            state.sc[:] = 0.0
            r.clear()
            r.extend(seq)
        return True

    def observe_draft(self, seq, max_nodes: int | None = None) -> DraftTree:
        """``observe(seq)`` then ``draft(seq, max_nodes)``, in one kernel call when the request continues (the
        decode loop's per-step form; after a forward pass every Python-level call costs tens of µs). Same
        state and same tree as the two calls. The tree's arrays are this drafter's reused buffers: valid
        until its next ``observe_draft`` (a step uses its tree before the next one is drafted)."""
        return self._observe_draft(self, seq, max_nodes, self.observe)

    def _observe_draft(self, state, seq, max_nodes: int | None, observe) -> DraftTree:
        seq = np.asarray(seq, np.int32)
        m = self.matrix
        if self.journal is not None or m.journal is not None:   # a fleet journal sees updates in Python
            observe(seq)
            return self._draft(state, seq, max_nodes)
        b = 64 if max_nodes is None else int(max_nodes)
        buf = self._buffers(state, b)
        r, c, h, rc = state.request, self.combiner, self.history, self.recycle
        last = state._last
        if last is None:
            n_ctx, tokens, parents, feats = -1, _NO_TOK, _NO_TOK, _NO_FEAT
        else:
            n_ctx, tokens, parents, feats = last
        status, n, judged, k = observe_draft_kernel(
            r.arrays, seq, m.ov, m.prm, self.window, tokens, parents, feats, n_ctx, last is not None and c.lr > 0,
            c.w, c.g2, c.lr, state.sc, c.workload, h.arrays, (m.base, m.ov, m.prm),
            (rc.keys, rc.ids, rc.probs, rc.n_tokens, rc.slot_bits), self.prm_f, self.prm_i, self.rconf, self.hconf,
            b, buf.tok, buf.par, buf.score, buf.feat, buf.si, buf.sf, buf.sg)
        if status != S.OK:                   # a new request, or the index / overlay needs room: the general path
            observe(seq)
            return self._draft(state, seq, max_nodes)
        r.n = n
        c.seen += judged
        if b <= 0 or n == 0:
            state._last = None
            return DraftTree()
        tree = DraftTree.trusted(buf.tok[:k], buf.par[:k], buf.score[:k])
        state._last = (n, tree.tokens, tree.parents, buf.feat[:k])
        return tree

    def _buffers(self, state, b: int) -> _StepBuffers:
        buf = state._buf
        if buf is None or buf.cap < b:
            buf = state._buf = _StepBuffers(max(b, 64), self.prm_i)
        return buf

    def session(self) -> "DraftSession":
        """A drafter for one request among several running at once: its own request index and last draft;
        the matrix, history, recycled predictions and combiner are this drafter's, shared."""
        return DraftSession(self)

    def observe_logits(self, prev, inputs, top_ids, top_p) -> None:
        """The model's predictions from a verification pass: after tokens ``prev[i], inputs[i]``
        (``prev[i] = -1`` when unknown) its top next tokens were ``top_ids[i]`` with probabilities
        ``top_p[i]``."""
        self.recycle.record(prev, inputs, top_ids, top_p)

    def observe_tree_logits(self, before_root, root, tokens, parents, top_ids, top_p) -> None:
        """:meth:`observe_logits` for one verified tree (row 0: after ``before_root, root``; row ``i + 1``:
        after node ``i``), the decode loop's per-step form (:meth:`RecycleTable.record_tree`)."""
        self.recycle.record_tree(before_root, root, tokens, parents, top_ids, top_p)

    def _learn(self, state, seq: np.ndarray) -> None:
        """Judge the state's last draft against the tokens committed since; ``seq`` continues its request."""
        last, state._last = state._last, None
        if last is None:
            return
        n_ctx, tokens, parents, feats = last
        if seq.shape[0] <= n_ctx or state.request.n != n_ctx:
            return
        self.combiner.learn_draft(tokens, parents, feats, seq[n_ctx:], state.sc)

    def warm_up(self) -> None:
        """Compile (or load from numba's cache) every per-step kernel now, with the types the decode loop passes,
        not inside a request's first steps (a first call costs milliseconds); then forget what it saw."""
        warm = np.array([0, 1, 0, 1], np.int32)
        self.observe(warm)
        tree = self.draft(warm, 4)
        ids = np.zeros((len(tree) + 1, 2), np.int64)          # the decode loop's rows: int64 ids, float32 probs
        p = np.zeros((len(tree) + 1, 2), np.float32)
        self.observe_tree_logits(0, 1, tree.tokens, tree.parents, ids, p)
        self.observe_logits(np.zeros(1, np.int64), np.ones(1, np.int64), ids[:1], p[:1])
        self.observe_draft(np.array([0, 1, 0, 1, 0], np.int32), 4)     # the request continues: the one-call form
        self.matrix.reset_deltas()
        self.reset()

    def reset(self) -> None:
        """Forget the current request, the history, the recycled predictions and what the combiner learned
        (the matrix deltas are the matrix's business)."""
        self.request.clear()
        self.history.clear()
        self.recycle.clear()
        self.combiner.reset()
        self._last = None
        self.sc[:] = 0.0

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
        if self.request.n != len(seq):
            self.observe(seq)  # draft() without observe(): index the request now
        return self._draft(self, seq, max_nodes)

    def _draft(self, state, seq, max_nodes: int | None) -> DraftTree:
        b = 64 if max_nodes is None else int(max_nodes)
        if b <= 0:
            return DraftTree()
        r = state.request
        if r.n == 0:
            return DraftTree()
        out_tok = np.empty(b, np.int32)
        out_par = np.empty(b, np.int32)
        out_sc = np.empty(b, np.float64)
        out_feat = np.empty((b, C.N_FEAT), np.float64)
        m, h, rc = self.matrix, self.history, self.recycle
        buf = self._buffers(state, b)
        n = best_first_tree(r.arrays, h.arrays, (m.base, m.ov, m.prm),
                            (rc.keys, rc.ids, rc.probs, rc.n_tokens, rc.slot_bits), self.prm_f, self.prm_i,
                            self.rconf, self.hconf, self.combiner.w, state.sc, self.combiner.workload, b,
                            out_tok, out_par, out_sc, out_feat, buf.si, buf.sf, buf.sg)
        tree = DraftTree.trusted(out_tok[:n], out_par[:n], out_sc[:n])     # breadth-first from the kernel
        state._last = (r.n, tree.tokens, tree.parents, out_feat[:n])
        return tree


class DraftSession:
    """One request's view of a :class:`BestDrafter` (see :meth:`BestDrafter.session`). ``close()`` hands the
    finished request to the drafter's history (and, through its journal, the fleet's)."""

    def __init__(self, drafter: BestDrafter):
        self.drafter = drafter
        self.request = TokenIndex(drafter.matrix.vocab_size)
        self._last = None
        self._buf = None
        self.sc = np.zeros((2, C.N_SRC))

    def observe(self, seq) -> None:
        self.drafter._observe(self, np.asarray(seq, np.int32))

    def draft(self, seq, max_nodes: int | None = None) -> DraftTree:
        if self.request.n != len(seq):
            self.observe(seq)
        return self.drafter._draft(self, seq, max_nodes)

    def observe_draft(self, seq, max_nodes: int | None = None) -> DraftTree:
        return self.drafter._observe_draft(self, seq, max_nodes, self.observe)

    def observe_logits(self, prev, inputs, top_ids, top_p) -> None:
        self.drafter.observe_logits(prev, inputs, top_ids, top_p)

    def observe_tree_logits(self, before_root, root, tokens, parents, top_ids, top_p) -> None:
        self.drafter.observe_tree_logits(before_root, root, tokens, parents, top_ids, top_p)

    def close(self, share: bool = True) -> None:
        r = self.request
        if r.n:
            self.drafter.remember(r.seq[: r.n].copy(), share=share)
        r.clear()
        self._last = None
        self.sc[:] = 0.0


def _bfs(tok, par, score) -> tuple[DraftTree, np.ndarray]:
    """Re-order insertion-ordered nodes breadth-first (stable), remapping parents; scores travel along.
    Returns the tree and the order (new index -> insertion index)."""
    n = tok.shape[0]
    depth = np.zeros(n, np.int32)
    for i in range(n):
        depth[i] = 1 if par[i] < 0 else depth[par[i]] + 1
    order = np.lexsort((np.arange(n), depth))
    new_of = np.empty(n, np.int32)
    new_of[order] = np.arange(n, dtype=np.int32)
    parents = np.where(par[order] < 0, -1, new_of[np.maximum(par[order], 0)]).astype(np.int32)
    return DraftTree(tok[order], parents, score[order]), order
