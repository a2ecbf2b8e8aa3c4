"""One acceptance probability per candidate from several sources' evidence, learned online.

Each source says how likely a token is the model's next one (``cp[s]``, 0 when the source has nothing to
say). The sources are correlated and differently calibrated, so instead of trusting a fixed rule the
drafter scores a candidate with a logistic model over features of that evidence::

    p = sigmoid(w . phi)        phi = [1, per source (present, p_s, logit p_s), logit(noisy-OR prior),
                                       depth == 1, depth >= 3, request match length / 16, history ... / 16]

With the initial weights (1 on the prior's logit, 0 elsewhere) p is exactly the noisy-OR prior
``1 - prod(1 - p_s)``. Verification then judges every drafted node whose parent was accepted (``judge``), and
AdaGrad steps on the log-loss fit ``w`` to what this model, on this traffic, actually accepts. numpy + numba.
"""
from __future__ import annotations

import numpy as np
from numba import njit

SOURCES = ("request", "history", "matrix", "recycle_pair", "recycle_last")
N_SRC = len(SOURCES)
N_FEAT = 1 + 3 * N_SRC + 1 + 2 + 2
PRIOR = 1 + 3 * N_SRC                  # index of the prior's logit


@njit(cache=True)
def _logit(p):
    p = min(max(p, 1e-4), 1.0 - 1e-4)
    return np.log(p / (1.0 - p))


@njit(cache=True)
def features(cp, prior, depth, m_request, m_history, out):
    """Write the feature vector of one candidate into ``out`` (length N_FEAT)."""
    out[0] = 1.0
    for s in range(N_SRC):
        present = cp[s] > 0.0
        out[1 + 3 * s] = 1.0 if present else 0.0
        out[2 + 3 * s] = cp[s]
        out[3 + 3 * s] = _logit(cp[s]) if present else 0.0
    out[PRIOR] = _logit(prior)
    out[PRIOR + 1] = 1.0 if depth == 1 else 0.0
    out[PRIOR + 2] = 1.0 if depth >= 3 else 0.0
    out[PRIOR + 3] = m_request / 16.0
    out[PRIOR + 4] = m_history / 16.0


@njit(cache=True)
def predict(w, phi):
    z = 0.0
    for i in range(phi.shape[0]):
        z += w[i] * phi[i]
    return 1.0 / (1.0 + np.exp(-z))


def prior_weights() -> np.ndarray:
    w = np.zeros(N_FEAT)
    w[PRIOR] = 1.0
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

    def learn(self, phi: np.ndarray, y: np.ndarray) -> None:
        """One step on judged nodes: ``phi [n, N_FEAT]``, ``y [n]`` (1 = accepted)."""
        if phi.shape[0] == 0 or self.lr == 0:
            return
        p = 1.0 / (1.0 + np.exp(-(phi @ self.w)))
        g = phi.T @ (y.astype(np.float64) - p)
        self.g2 += g * g
        self.w += self.lr * g / np.sqrt(self.g2)
        self.seen += phi.shape[0]

    def reset(self) -> None:
        self.w = self.initial.copy()
        self.g2[:] = 1e-2
        self.seen = 0


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
