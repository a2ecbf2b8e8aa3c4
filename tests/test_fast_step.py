"""The drafter's fast step (issue 17), on small literal cases: tri-gram chains in suffix matching, the
breadth-first re-ordering inside the kernel, the one-kernel observation and the fused judge + learn step."""
import numpy as np
import pytest

from aded_ray.draft import combine as C
from aded_ray.draft.best import BestDrafter, _bfs
from aded_ray.draft.matrix import TrigramMatrix
from aded_ray.draft.step import _to_bfs_into
from aded_ray.draft.suffix import TokenIndex, match


def test_trigram_chain_finds_an_old_long_match_beyond_the_recent_occurrences():
    # "1 2 3 -> 4" once, long ago; then token 3 twenty times (each followed by 5): the last-token walk,
    # limited to 8 occurrences, only sees "3 -> 5"; the tri-gram chain finds "1 2 3 -> 4"
    seq = [1, 2, 3, 4] + [3, 5] * 20 + [1, 2, 3]
    ix = TokenIndex(10)
    ix.extend(seq)
    tok, cnt, m = ix.matches(max_occ=8)
    assert tok.tolist() == [4] and m == 3
    old = match(ix.seq, ix.n, ix.prev, ix.last, np.zeros(0, np.int32), 0, 16, 8, np.zeros(8, np.int32),
                np.zeros(8, np.int32))
    assert old[1] == 1                                   # what the last-token walk alone would find


def test_trigram_chain_survives_hash_collisions_and_clear():
    ix = TokenIndex(50, hash_bits=1)                     # 2 heads: nearly every tri-gram collides
    ix.extend([7, 8, 9, 1, 4, 5, 6, 2, 7, 8, 9])
    tok, _, m = ix.matches()
    assert tok.tolist() == [1] and m == 3
    ix.clear()
    assert (ix.head3 == -1).all() and len(ix.matches([7, 8, 9])[0]) == 0


def test_tail_context_match_uses_the_tail_for_the_trigram():
    ix = TokenIndex(20)
    ix.extend([1, 2, 3, 9, 1, 2, 4, 7, 1, 2])
    tok, _, m = ix.matches([4, 7, 1])                    # the worked example: length 5 through the tail
    assert tok.tolist() == [2] and m == 5


def test_to_bfs_matches_the_numpy_reordering():
    tok = np.array([10, 11, 12, 13, 14], np.int32)
    par = np.array([-1, 0, -1, 1, 2], np.int32)
    sc = np.array([.9, .8, .5, .4, .3])
    feat = np.arange(5 * 3, dtype=np.float64).reshape(5, 3)
    ref, order = _bfs(tok, par, sc)
    depth = np.array([1, 2, 1, 3, 2], np.int32)
    t, p, s, f = tok.copy(), par.copy(), sc.copy(), feat.copy()
    _to_bfs_into(5, depth, t, p, s, f, np.empty(5, np.int32), np.empty(5, np.int32), np.empty(5, np.int32),
                 np.empty(5, np.int32), np.empty(5), np.empty((5, 3)))
    assert t.tolist() == ref.tokens.tolist() == [10, 12, 11, 14, 13]
    assert p.tolist() == ref.parents.tolist() == [-1, -1, 0, 1, 2]
    assert s.tolist() == ref.scores.tolist() and (f == feat[order]).all()


def test_learn_draft_is_judge_then_learn():
    tokens, parents = np.array([5, 6, 7, 8], np.int32), np.array([-1, -1, 0, 2], np.int32)
    feats = np.random.default_rng(0).random((4, C.N_FEAT))
    truth = np.array([5, 7], np.int32)
    a, b = C.OnlineLogistic(lr=0.3), C.OnlineLogistic(lr=0.3)
    judged, ok = C.judge(tokens, parents, truth)
    a.learn(feats[judged], ok[judged])
    assert b.learn_draft(tokens, parents, feats, truth) == 3
    np.testing.assert_allclose(a.w, b.w, rtol=1e-12)
    np.testing.assert_allclose(a.g2, b.g2, rtol=1e-12)
    assert a.seen == b.seen == 3


@pytest.mark.parametrize("journal", [False, True])
def test_one_kernel_observation_equals_the_general_path(journal):
    """The same request through the fast path and through the general one (forced by a matrix journal,
    which makes the matrix update go through ``matrix.update``): same drafts, weights, deltas and index."""
    class Journal:
        def drain(self):
            pass

        def record(self, keys, toks):
            pass

    seqs = [[1, 2, 3, 4, 1, 2], [1, 2, 3, 4, 1, 2, 3, 4], [1, 2, 3, 4, 1, 2, 3, 4, 9, 1, 2]]
    runs = []
    for use_journal in (False, journal):
        m = TrigramMatrix.empty(20)
        m.journal = Journal() if use_journal else None
        d = BestDrafter(m, learn_rate=0.5)
        trees = []
        for s in seqs:
            d.observe(s)
            trees.append(d.draft(s, 4).tokens.tolist())
        runs.append((trees, d.combiner.w.copy(), d.combiner.seen, d.request.n, m.weight(3, 4, 1)))
    (t0, w0, s0, n0, x0), (t1, w1, s1, n1, x1) = runs
    assert t0 == t1 and s0 == s1 and n0 == n1 == len(seqs[-1]) and x0 == x1 > 0
    np.testing.assert_allclose(w0, w1)
    assert s0 > 0


def test_a_new_request_restarts_through_the_fast_path():
    d = BestDrafter(TrigramMatrix.empty(20))
    d.observe([1, 2, 3, 4])
    d.observe([5, 6, 7])                                 # does not continue: the first joins the history
    assert d.history.n == 4 and d.request.n == 3 and d.request.seq[:3].tolist() == [5, 6, 7]
    s = d.session()
    s.observe([1, 2, 3])
    s.observe([9, 9])                                    # a session starts over
    assert s.request.n == 2


def test_reliability_is_shrunk_toward_the_workload():
    out = np.empty(C.N_SRC)
    sc, wl = np.zeros((2, C.N_SRC)), np.zeros((2, C.N_SRC))
    sc[:, 3] = [0.0, 8.0]                      # source 3: 8 verdicts in this request, none accepted
    C.reliability(sc, wl, out)
    # workload rate (0 + 1) / (0 + 2) = 0.5; request (0 + 8 * 0.5) / (8 + 8) = 0.25
    assert out[3] == pytest.approx(np.log(0.25 / 0.75)) and out[0] == 0.0
    phi = np.empty(C.N_FEAT)
    C.features(np.array([0.0, 0.0, 0.0, 0.9, 0.0]), 0.9, 1, 0, 0, out, phi)
    assert C.predict(C.prior_weights(), phi) == pytest.approx(1 / (1 + np.exp(-(np.log(9) + np.log(1 / 3)))))


def test_a_collapsing_source_is_down_weighted_within_a_few_steps():
    """The workload found the recycled pair source right 80% of the time; in this request the model keeps
    predicting 3 after (1, 2) with p 0.9 but verification keeps taking something else. With no global
    learning (a negligible learn rate), the request's own verdicts pull that source's score down at every
    step: 0.9 -> ~0.77 after three rejections (log-odds moved by logit(0.577) - logit(0.794), see
    ``reliability``)."""
    d = BestDrafter(TrigramMatrix.empty(100), learn_rate=1e-9)
    d.combiner.workload[:, 3] = [80.0, 100.0]
    seq = [1, 2]
    scores = []
    for i in range(4):
        d.observe_logits([seq[-2]], [seq[-1]], [[3, 0]], [[0.9, 0.0]])
        d.observe(seq)
        t = d.draft(seq, 64)
        root3 = [j for j in range(len(t)) if t.parents[j] == -1 and t.tokens[j] == 3]
        scores.append(float(t.scores[root3[0]]))
        seq = seq + [10 + i, 1, 2]             # not 3: rejected; the context (1, 2) comes back
    assert scores[0] == pytest.approx(0.9, abs=1e-3)
    assert all(np.diff(scores) < 0) and scores[-1] < 0.8
    assert d.sc[1, 3] == 3                      # three verdicts counted for the recycled pair source
    s = d.session()                             # a new request starts from the workload's rates again
    s.observe([1, 2])
    t = s.draft([1, 2], 64)
    assert float(t.scores[list(t.tokens).index(3)]) > scores[-1]
