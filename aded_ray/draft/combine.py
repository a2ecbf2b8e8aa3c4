"""One acceptance probability per candidate from several sources' evidence, learned online.

Each source says how likely a token is the model's next one (``cp[s]``, 0 when the source has nothing to
say). The sources are correlated and differently calibrated, so instead of trusting a fixed rule the
drafter scores a candidate with a logistic model over features of that evidence::

    p = sigmoid(w . phi)        phi = [1, per source (present, p_s, logit p_s), logit(noisy-OR prior),
                                       depth == 1, depth >= 3, request match length / 16, history ... / 16,
                                       per source proposing it: its reliability in this request]

With the initial weights (1 on the prior's logit and on each source's reliability, 0 elsewhere) p is exactly
the noisy-OR prior ``1 - prod(1 - p_s)`` at a request's start, and moves by a source's log-odds deviation
in this request (shrunk toward the workload's rate) as its verdicts come in. Verification then judges every
drafted node whose parent was accepted (``judge``), and
AdaGrad steps on the log-loss fit ``w`` to what this model, on this traffic, actually accepts. numpy + numba.
"""
from __future__ import annotations

import numpy as np
from numba import njit

SOURCES = ("request", "history", "matrix", "recycle_pair", "recycle_last")
N_SRC = len(SOURCES)
N_FEAT = 1 + 3 * N_SRC + 1 + 2 + 2 + N_SRC
PRIOR = 1 + 3 * N_SRC                  # index of the prior's logit
REL = PRIOR + 5                        # per source: this request's reliability against the workload's
SHRINK = 8.0                           # a request's rate counts as much as the workload's after 8 judged nodes
DECAY = 0.998                          # the workload's rates forget with this factor per judged node


@njit(cache=True, inline="always")
def reliability(sc, wl, out):
    """Per source: ``logit(request rate) - logit(workload rate)``, where the request's rate is shrunk toward
    the workload's (``SHRINK`` pseudo-counts, the guard against one request's few verdicts) and the workload
    rate is a decayed count with a Laplace prior. ``sc[0, s]`` / ``sc[1, s]``: accepted / judged nodes
    where source s had a say, in this request; ``wl``: the same, decayed, over the workload.

    >>> out = np.zeros(N_SRC); sc = np.zeros((2, N_SRC)); wl = np.zeros((2, N_SRC))
    >>> reliability(sc, wl, out); out.tolist() == [0.0] * N_SRC
    True
    """
    for s in range(N_SRC):
        r = (wl[0, s] + 1.0) / (wl[1, s] + 2.0)
        q = (sc[0, s] + SHRINK * r) / (sc[1, s] + SHRINK)
        out[s] = _logit(q) - _logit(r)


@njit(cache=True, inline="always")
def count_verdict(phi, j, ok, sc, wl):
    """Count one judged node for every source present in its features ``phi[j]``."""
    for s in range(N_SRC):
        if phi[j, 1 + 3 * s] > 0.0:
            sc[0, s] += ok
            sc[1, s] += 1.0
            wl[0, s] = DECAY * wl[0, s] + ok
            wl[1, s] = DECAY * wl[1, s] + 1.0


@njit(cache=True, inline="always")
def _logit(p):
    p = min(max(p, 1e-4), 1.0 - 1e-4)
    return np.log(p / (1.0 - p))


@njit(cache=True, inline="always")
def features_at(cp, i, prior, depth, m_request, m_history, rel, out, j):
    """Write the feature vector of candidate ``cp[i]`` into ``out[j]`` (length N_FEAT); ``rel``: see
    :func:`reliability` (a source's term is 0 unless it proposed the candidate). Rows are indexed, not
    sliced: a row view costs two reference-count calls, per candidate, in the drafter's innermost loop."""
    out[j, 0] = 1.0
    for s in range(N_SRC):
        p = cp[i, s]
        present = p > 0.0
        out[j, 1 + 3 * s] = 1.0 if present else 0.0
        out[j, 2 + 3 * s] = p
        out[j, 3 + 3 * s] = _logit(p) if present else 0.0
        out[j, REL + s] = rel[s] if present else 0.0
    out[j, PRIOR] = _logit(prior)
    out[j, PRIOR + 1] = 1.0 if depth == 1 else 0.0
    out[j, PRIOR + 2] = 1.0 if depth >= 3 else 0.0
    out[j, PRIOR + 3] = m_request / 16.0
    out[j, PRIOR + 4] = m_history / 16.0


@njit(cache=True, inline="always")
def predict_at(w, phi, j):
    """``sigmoid(w . phi[j])``."""
    z = 0.0
    for f in range(w.shape[0]):
        z += w[f] * phi[j, f]
    return 1.0 / (1.0 + np.exp(-z))


@njit(cache=True)
def features(cp, prior, depth, m_request, m_history, rel, out):
    """One candidate's features (``cp``: its per-source probabilities) into ``out``: :func:`features_at`."""
    features_at(cp.reshape((1, cp.shape[0])), 0, prior, depth, m_request, m_history, rel,
                out.reshape((1, out.shape[0])), 0)


@njit(cache=True)
def predict(w, phi):
    return predict_at(w, phi.reshape((1, phi.shape[0])), 0)


def prior_weights() -> np.ndarray:
    w = np.zeros(N_FEAT)
    w[PRIOR] = 1.0
    w[REL:REL + N_SRC] = 1.0           # a source's log-odds move by its request's deviation (0 at a request's start)
    return w


class OnlineLogistic:
    """Logistic regression trained online with AdaGrad (per-feature step sizes)."""

    def __init__(self, weights=None, lr: float = 0.05):
        w = prior_weights() if weights is None else np.array(weights, np.float64)
        if w.shape != (N_FEAT,) or not np.isfinite(w).all():
            raise ValueError(f"weights must be {N_FEAT} finite numbers, got shape {w.shape}")
        if not lr >= 0:
            raise ValueError(f"lr = {lr} must be >= 0")
        self.initial = w.copy()
        self.w = w
        self.lr = float(lr)
        self.g2 = np.full(N_FEAT, 1e-2)
        self.seen = 0
        self.workload = np.zeros((2, N_SRC))    # decayed accepted / judged counts per source (reliability)

    def learn(self, phi: np.ndarray, y: np.ndarray) -> None:
        """One step on judged nodes: ``phi [n, N_FEAT]``, ``y [n]`` (1 = accepted)."""
        if phi.shape[0] == 0 or self.lr == 0:
            return
        p = 1.0 / (1.0 + np.exp(-(phi @ self.w)))
        g = phi.T @ (y.astype(np.float64) - p)
        self.g2 += g * g
        self.w += self.lr * g / np.sqrt(self.g2)
        self.seen += phi.shape[0]

    def learn_draft(self, tokens, parents, feats, truth, sc=None) -> int:
        """Judge a breadth-first draft against ``truth`` (see :func:`judge`) and take one step on the judged
        nodes, in one kernel (the same step as ``learn(feats[judged], ok[judged])``). Returns how many nodes
        were judged."""
        m = judge_learn(tokens, parents, feats, truth, self.w, self.g2, self.lr,
                        np.zeros((2, N_SRC)) if sc is None else sc, self.workload)
        self.seen += m
        return m

    def reset(self) -> None:
        self.w = self.initial.copy()
        self.g2[:] = 1e-2
        self.seen = 0
        self.workload[:] = 0.0


@njit(cache=True, inline="always")
def judge_learn(tokens, parents, feats, truth, w, g2, lr, sc, wl):
    """:func:`judge` and one AdaGrad step on the judged nodes (``w`` and ``g2`` updated in place), each
    verdict counted for the sources' reliability (``sc``: the request's, ``wl``: the workload's, see
    :func:`reliability`); returns the number of judged nodes."""
    n = tokens.shape[0]
    ok = np.zeros(n, np.bool_)
    depth = np.zeros(n, np.int64)
    grad = np.zeros(w.shape[0])
    m = 0
    for i in range(n):
        p = parents[i]
        depth[i] = 1 if p < 0 else depth[p] + 1
        if (p < 0 or ok[p]) and depth[i] <= truth.shape[0]:
            ok[i] = tokens[i] == truth[depth[i] - 1]
            pr = predict_at(w, feats, i)
            y = 1.0 if ok[i] else 0.0
            count_verdict(feats, i, y, sc, wl)
            for f in range(w.shape[0]):
                grad[f] += (y - pr) * feats[i, f]
            m += 1
    if m > 0 and lr > 0:
        for f in range(w.shape[0]):
            g2[f] += grad[f] * grad[f]
            w[f] += lr * grad[f] / np.sqrt(g2[f])
    return m


def judge(tokens, parents, truth) -> tuple[np.ndarray, np.ndarray]:
    """Which nodes of a breadth-first draft can be judged against ``truth`` (the tokens verification
    committed after the draft's root, in order) and whether each was accepted.

    A node is judged when its parent was accepted (or is the root) and its depth is within ``truth``.

    >>> j, ok = judge(np.array([5, 6, 7, 8]), np.array([-1, -1, 0, 2]), np.array([5, 7]))
    >>> j.tolist(), ok.tolist()
    ([True, True, True, False], [True, False, True, False])
    """
    n = tokens.shape[0]
    judged = np.zeros(n, bool)
    ok = np.zeros(n, bool)
    depth = np.zeros(n, np.int64)
    for i in range(n):
        p = parents[i]
        depth[i] = 1 if p < 0 else depth[p] + 1
        if (p < 0 or ok[p]) and depth[i] <= truth.shape[0]:
            judged[i] = True
            ok[i] = tokens[i] == truth[depth[i] - 1]
    return judged, ok
