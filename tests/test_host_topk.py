"""The CPU kernel for a pass's argmax / top-k / probabilities, against torch (the oracle) and literal rows."""
import numpy as np
import pytest
import torch

import aded_ray.verify.accept as A
from aded_ray.verify.accept import SamplingParams, reduce_batch
from aded_ray.verify.host_topk import BLOCK, sum_exp, top_rows


def torch_path(*args, **kw):
    """reduce_batch with the host kernel switched off: torch's three reductions."""
    keep = A._reduce_batch_host
    A._reduce_batch_host = lambda *a, **k: None
    try:
        return reduce_batch(*args, **kw)
    finally:
        A._reduce_batch_host = keep


def test_literal_rows_ties_and_the_first_maximum():
    x = np.array([[1.0, 3.0, 3.0, 2.0, 3.0],          # three-way tie: first index wins, then in index order
                  [0.0, 0.0, 0.0, 0.0, 0.0],           # all equal
                  [-5.0, 9.0, -1.0, 8.5, 9.0]], np.float32)
    ok, first, ids, probs = top_rows(x, np.array([True, True, False]), 3)
    assert ok and first.tolist() == [1, 0, 1] == torch.from_numpy(x).argmax(-1).tolist()
    assert ids[0].tolist() == [1, 2, 4] and ids[1].tolist() == [0, 1, 2]
    assert ids[2].tolist() == [0, 0, 0] and probs[2].tolist() == [0, 0, 0]     # not wanted: argmax only
    e = np.exp(x[0] - 3.0)
    assert probs[0] == pytest.approx(e[[1, 2, 4]] / e.sum(), rel=1e-5)
    assert probs[1] == pytest.approx([0.2] * 3, rel=1e-5)


def test_non_finite_logits_are_refused_and_torch_decides():
    x = np.zeros((2, 300), np.float32)
    for bad in (np.nan, np.inf, -np.inf):
        y = x.copy()
        y[1, 257] = bad
        assert not top_rows(y, np.array([True, True]), 4)[0]
    t = torch.zeros(2, 300)
    t[1, 257] = float("nan")
    got = reduce_batch(t, [SamplingParams()], [np.arange(2)], [2], top_k=4)[0]
    assert got.tokens.tolist() == t.argmax(-1).tolist() == [0, 257]       # torch's NaN semantics


@pytest.mark.parametrize("V", [7, BLOCK - 1, 3 * BLOCK + 5, 49152])
def test_matches_torch_on_model_like_rows(V):
    g = torch.Generator().manual_seed(V)
    logits = torch.randn(13, V, generator=g) * 4
    logits[::3, V // 2] += 25                           # peaked rows, as a model's mostly are
    logits[1, :] = torch.round(logits[1, :])            # many ties
    counts = [5, 8]
    s = [SamplingParams(), SamplingParams(temperature=0.8, seed=11)]
    pos = [np.arange(5), np.arange(3, 11)]
    k = min(8, V)
    host = reduce_batch(logits, s, pos, counts, top_k=k, top_k_for=[True, True])
    ref = torch_path(logits, s, pos, counts, top_k=k, top_k_for=[True, True])
    for h, r, rows in zip(host, ref, (logits.numpy()[:5], logits.numpy()[5:])):
        assert np.array_equal(h.tokens, r.tokens) and h.tokens.dtype == np.int64
        assert h.top_ids.dtype == r.top_ids.dtype and h.top_p.dtype == r.top_p.dtype
        assert np.allclose(h.top_p, r.top_p, rtol=1e-4, atol=1e-7)
        vals = np.take_along_axis(rows, h.top_ids, 1)
        assert (np.diff(vals, axis=1) <= 0).all()        # descending; equal values may differ from torch's order
        assert np.array_equal(vals, np.take_along_axis(rows, r.top_ids, 1))   # the same top-k values as torch's
    part = reduce_batch(logits, s, pos, counts, top_k=k, top_k_for=[False, True])
    assert part[0].top_ids is None and np.array_equal(part[0].tokens, ref[0].tokens)


def test_normaliser_exponential_is_accurate():
    g = np.random.default_rng(0)
    for scale in (0.1, 1.0, 5.0, 30.0):
        row = (g.standard_normal(49152) * scale).astype(np.float32)
        m = row.max()
        exact = np.exp(row.astype(np.float64) - m).sum()
        assert sum_exp(row, m) == pytest.approx(exact, rel=1e-5)
