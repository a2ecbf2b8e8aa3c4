"""aded_ray's best-first drafter on small literal cases."""
import numpy as np
import pytest

from aded_ray.draft.best import BestDrafter, _bfs
from aded_ray.draft.build import matrix_from_token_docs
from aded_ray.draft.matrix import TrigramMatrix
from aded_ray.draft.suffix import TokenIndex


def test_suffix_match_worked_example():
    ix = TokenIndex(20)
    ix.extend([1, 2, 3, 9, 1, 2, 4, 7, 1, 2])
    tok, cnt, m = ix.matches()
    assert sorted(zip(tok.tolist(), cnt.tolist())) == [(3, 1), (4, 1)] and m == 2
    tok, cnt, m = ix.matches([4, 7, 1])       # context ... 1 2 4 7 1: matches at position 8 with length 5
    assert tok.tolist() == [2] and m == 5
    tok, cnt, m = ix.matches([5])             # token never seen
    assert len(tok) == 0 and m == 0


def test_suffix_index_grows_and_clears():
    ix = TokenIndex(50, capacity=4)
    ix.extend(np.arange(10) % 5)
    assert ix.n == 10 and ix.matches()[0].tolist() == [0]
    ix.clear()
    assert ix.n == 0 and len(ix.matches([1])[0]) == 0


def test_request_repetition_is_drafted_as_a_chain():
    d = BestDrafter(TrigramMatrix.empty(100))
    seq = [5, 6, 7, 8, 9, 10, 11, 5, 6]
    d.observe(seq)
    t = d.draft(seq, 4)
    assert t.token_paths()[0] == [7, 8, 9, 10]          # the continuation of the earlier "5 6"
    assert (np.diff(t.scores) <= 0).all() and t.scores[0] < 1


def test_budget_keeps_the_most_probable_nodes():
    # (1, 2) -> 3 (0.6) or 4 (0.4) in the corpus; nothing in the request
    m = matrix_from_token_docs([[1, 2, 3]] * 3 + [[1, 2, 4]] * 2, 10)
    d = BestDrafter(m, window=3)
    seq = [0, 1, 2]
    d.observe(seq)
    t1 = d.draft(seq, 1)
    assert t1.tokens.tolist() == [3]
    t2 = d.draft(seq, 2)
    assert sorted(t2.tokens.tolist()) == [3, 4] and t2.scores.max() == pytest.approx(0.6 / 1.15, abs=0.01)
    assert len(d.draft(seq, 0)) == 0


def test_empty_draft_when_nothing_matches():
    d = BestDrafter(TrigramMatrix.empty(100))
    d.observe([1, 2, 3])
    assert len(d.draft([1, 2, 3], 8)) == 0


def test_history_carries_across_requests():
    d = BestDrafter(TrigramMatrix.empty(100))
    first = [1, 2, 40, 41, 42, 43, 44]
    d.observe(first)
    d.observe([9, 9, 41, 42])                          # a new request: the first joins the history
    assert d.history.n == len(first)
    t = d.draft([9, 9, 41, 42], 3)
    assert t.token_paths()[0][:2] == [43, 44]


def test_bfs_reorder_and_ranks():
    # insertion order: 0:(a, root) 1:(b, child of 0) 2:(c, root) 3:(d, child of 1)
    t, _ = _bfs(np.array([10, 11, 12, 13], np.int32), np.array([-1, 0, -1, 1], np.int32), np.array([.9, .8, .5, .4]))
    assert t.tokens.tolist() == [10, 12, 11, 13] and t.parents.tolist() == [-1, -1, 0, 2]
    assert t.ranks().tolist() == [0, 2, 1, 3]          # budget b keeps the nodes of rank < b


def test_unknown_parameter_is_rejected():
    with pytest.raises(ValueError, match="unknown"):
        BestDrafter(TrigramMatrix.empty(10), banana=1)
    with pytest.raises(ValueError, match="branch"):
        BestDrafter(TrigramMatrix.empty(10), branch=0)


def _twin_drafters():
    docs = [[1, 2, 3, 4, 5, 6], [1, 2, 3, 7, 8], [2, 3, 4, 5, 9], [7, 8, 1, 2, 3]] * 3
    return [BestDrafter(matrix_from_token_docs(docs, 20), window=4) for _ in range(2)]


@pytest.mark.parametrize("session", [False, True], ids=["drafter", "session"])
def test_observe_draft_is_observe_then_draft(session):
    """The one-call form gives the same trees and learns the same weights as observe + draft, step by step,
    across a new request (the general path) too."""
    one, two = _twin_drafters()
    a, b = (one.session(), two.session()) if session else (one, two)
    requests = [[1, 2, 3, 4, 5, 6, 1, 2, 3, 7, 8, 1, 2], [7, 8, 1, 2, 3, 4, 5, 9, 2, 3, 4]]
    for req in requests:
        for n in range(3, len(req) + 1, 2):               # two tokens committed per step
            seq = np.asarray(req[:n], np.int32)
            t1 = a.observe_draft(seq, 6)
            b.observe(seq)
            t2 = b.draft(seq, 6)
            assert t1.tokens.tolist() == t2.tokens.tolist() and t1.parents.tolist() == t2.parents.tolist()
            assert t1.scores.tolist() == t2.scores.tolist()
        if session:
            a.close(), b.close()
    assert one.combiner.seen == two.combiner.seen > 0
    np.testing.assert_array_equal(one.combiner.w, two.combiner.w)
    assert one.history.n == two.history.n > 0


def test_observe_draft_reuses_its_buffers():
    d, _ = _twin_drafters()
    t1 = d.observe_draft(np.array([1, 2, 3], np.int32), 4)
    t2 = d.observe_draft(np.array([1, 2, 3, 4, 5], np.int32), 4)
    assert len(t1) and len(t2) and np.shares_memory(t1.tokens, t2.tokens)    # valid until the next call
    assert len(d.observe_draft(np.array([1, 2, 3, 4, 5, 6], np.int32), 0)) == 0


def test_tree_kernel_scratch_too_small_is_replaced():
    """Scratch below :func:`scratch_sizes` is never written past: the kernel makes its own, same tree."""
    from aded_ray.draft import best as B
    d, _ = _twin_drafters()
    seq = np.array([1, 2, 3, 4, 5, 6, 1, 2, 3], np.int32)
    d.observe(seq)
    m, h, rc = d.matrix, d.history, d.recycle
    trees = []
    for n_i, n_f, n_g in (B.scratch_sizes(6, d.prm_i), (3, 2, 1)):
        out = (np.empty(6, np.int32), np.empty(6, np.int32), np.empty(6), np.empty((6, B.C.N_FEAT)))
        si, sf, sg = np.full(n_i, -7, np.int32), np.full(n_f, -7.0), np.full((n_g, B.C.N_FEAT), -7.0)
        k = B.best_first_tree(d.request.arrays, h.arrays, (m.base, m.ov, m.prm),
                              (rc.keys, rc.ids, rc.probs, rc.n_tokens, rc.slot_bits), d.prm_f, d.prm_i, d.rconf,
                              d.hconf, d.combiner.w, d.sc, d.combiner.workload, 6, *out, si, sf, sg)
        trees.append((out[0][:k].tolist(), out[1][:k].tolist(), out[2][:k].tolist()))
        if n_i == 3:
            assert (si == -7).all() and (sf == -7.0).all() and (sg == -7.0).all()
    assert trees[0] == trees[1] and len(trees[0][0]) == 6
