"""Tri-gram matrix: building, compact-array lookup against a dict oracle, file round trip, adaptive deltas."""
from collections import Counter, defaultdict

import numpy as np
import pytest

from aded_ray.draft.build import TrigramCounter, matrix_from_token_docs
from aded_ray.draft.matrix import TrigramMatrix


def oracle(docs, top_k):
    """Plain-dict reference: per-context probabilities, top-k by (prob desc, token asc)."""
    counts = defaultdict(Counter)
    for d in docs:
        for a, b, c in zip(d, d[1:], d[2:]):
            counts[(a, b)][c] += 1
    out = {}
    for ctx, cnt in counts.items():
        total = sum(cnt.values())
        items = sorted(((c, n / total) for c, n in cnt.items()), key=lambda x: (-x[1], x[0]))[:top_k]
        out[ctx] = items
    return out


@pytest.mark.parametrize("index", [True, False], ids=["context-index", "binary-search"])
def test_lookup_matches_dict_oracle(index):
    rng = np.random.default_rng(1)
    V = 40
    docs = [rng.integers(0, V, int(rng.integers(0, 60))).tolist() for _ in range(200)]
    m = matrix_from_token_docs(docs, V, top_k=5)
    ref = oracle(docs, 5)
    assert m.n_contexts == len(ref)
    assert (m.base[5] != 0).sum() == len(ref)           # one slot per context
    if not index:
        m.base = m.base[:5] + (np.zeros(0, np.uint64),)
    for a in range(V):
        for b in range(V):
            tok, w = m.successors(a, b)
            exp = ref.get((a, b), [])
            assert tok.tolist() == [c for c, _ in exp]
            np.testing.assert_allclose(w, [p for _, p in exp], rtol=1e-6)


def test_context_index_only_where_its_packing_fits():
    from aded_ray.draft.kernels import build_index
    keys, offsets = np.array([5, 70_000], np.int64), np.array([0, 3, 4], np.int64)
    idx = build_index(keys, offsets, 300)
    assert idx.shape == (4,) and sorted(int(v) >> 32 for v in idx if v) == [6, 70_001]
    assert build_index(keys, offsets, 65_536).shape == (0,)                  # V * V does not fit 32 bits
    assert build_index(keys, np.array([0, 3, 300], np.int64), 300).shape == (0,)   # > 255 successors
    assert build_index(keys[:0], offsets[:1], 300).shape == (0,)


def test_no_trigram_crosses_documents_and_short_docs_skipped():
    c = TrigramCounter(vocab_size=10)
    c.add([1, 2, 3])
    c.add([4, 5])          # too short: nothing
    c.add([6, 7, 8, 9])
    m = c.matrix()
    assert m.successors(2, 3)[0].tolist() == []        # (2, 3, 6) would cross the boundary
    assert m.successors(1, 2)[0].tolist() == [3]
    assert m.successors(7, 8)[0].tolist() == [9]
    assert c.documents == 2 and c.tokens == 7
    with pytest.raises(ValueError, match="out of range"):
        c.add([1, 2, 10])


def test_chunked_counting_equals_one_shot():
    rng = np.random.default_rng(2)
    docs = [rng.integers(0, 30, 50).tolist() for _ in range(40)]
    small = TrigramCounter(30, chunk=37)
    for d in docs:
        small.add(d)
    big = matrix_from_token_docs(docs, 30)
    a = small.matrix()
    for x in (a.base, big.base):
        assert len(x[1]) == len(big.base[1])
    for arr_a, arr_b in zip(a.base, big.base):
        np.testing.assert_array_equal(arr_a, arr_b)


def test_save_load_roundtrip_mmap(tmp_path):
    m = matrix_from_token_docs([[1, 2, 3, 1, 2, 4, 1, 2, 3]], 8, meta={"corpus": "x"})
    size = m.save(tmp_path / "s.tri")
    assert size == (tmp_path / "s.tri").stat().st_size
    for mmap in (True, False):
        m2 = TrigramMatrix.load(tmp_path / "s.tri", mmap=mmap)
        assert m2.meta["corpus"] == "x" and m2.vocab_size == 8
        for x, y in zip(m.base, m2.base):
            np.testing.assert_array_equal(x, y)
        assert m2.successors(1, 2)[0].tolist() == [3, 4]
    (tmp_path / "bad.tri").write_bytes(b"not a store at all")
    with pytest.raises(ValueError, match="not an aded_ray"):
        TrigramMatrix.load(tmp_path / "bad.tri")


def test_adaptive_update_window_increment_cap():
    m = TrigramMatrix.empty(100)
    seq = list(range(20))                       # 20 distinct tokens: tri-grams (i, i+1, i+2)
    m.update(seq)                               # window 16 -> tokens 4..19 -> tri-grams starting at 4..17
    keys, toks, counts = m.deltas()
    starts = sorted(int(k) // 100 for k in keys)
    assert starts == list(range(4, 18))          # exactly 14 tri-grams, none before the window
    assert m.weight(4, 5, 6) == pytest.approx(0.04)
    assert m.weight(3, 4, 5) == 0.0
    for _ in range(200):                         # 201 bumps * 0.04 > 3.0: capped at read time
        m.update(seq)
    assert m.weight(10, 11, 12) == pytest.approx(3.0)
    assert m.successors(10, 11)[1].tolist() == [3.0]
    assert m.deltas()[2].max() == 201            # the counts themselves are exact integers


def test_update_adds_to_base_and_appends_new_successors():
    m = matrix_from_token_docs([[1, 2, 3], [1, 2, 3], [1, 2, 4]], 10)     # (1,2): 3 -> 2/3, 4 -> 1/3
    for _ in range(10):
        m.update([1, 2, 5])
    tok, w = m.successors(1, 2)
    assert tok.tolist() == [3, 5, 4]
    np.testing.assert_allclose(w, [2 / 3, 0.4, 1 / 3], rtol=1e-6)


def test_deltas_merge_in_any_order_identically():
    rng = np.random.default_rng(3)
    base = matrix_from_token_docs([rng.integers(0, 20, 300).tolist()], 20)
    batches = [rng.integers(0, 20, int(rng.integers(3, 40))) for _ in range(30)]
    per_proc = []
    for b in batches:
        m = TrigramMatrix.empty(20)
        m.update(b)
        per_proc.append(m.deltas())
    results = []
    for order in (range(30), reversed(range(30)), rng.permutation(30)):
        m = TrigramMatrix(*base.base[:5], vocab_size=20)
        for i in order:
            m.apply_deltas(*per_proc[i])
        results.append([m.successors(a, b) for a in range(20) for b in range(20)])
    for other in results[1:]:
        for (t1, w1), (t2, w2) in zip(results[0], other):
            assert t1.tolist() == t2.tolist() and w1.tolist() == w2.tolist()


def test_overlay_grows_past_initial_capacity():
    m = TrigramMatrix.empty(5000)
    seq = np.arange(5000, dtype=np.int32)
    for s in range(0, 4990, 14):
        m.update(seq[s:s + 16])
    assert len(m.deltas()[0]) > 4096
    assert m.weight(100, 101, 102) == pytest.approx(0.04)
