"""Recycled model predictions, the online combiner and how the decode loop feeds them (small literal cases)."""
import numpy as np
import pytest
import torch

from aded_ray.decode import RECYCLE_K, recycle_predictions
from aded_ray.verify.accept import SamplingParams, reduce_rows
from aded_ray.draft import combine as C
from aded_ray.draft.best import BestDrafter
from aded_ray.draft.matrix import TrigramMatrix
from aded_ray.draft.recycle import RecycleTable
from aded_ray.draft.tree import DraftTree


def test_table_prefers_the_exact_pair_and_falls_back_to_the_last_token():
    t = RecycleTable(100, k=3)
    t.record([5], [7], [[8, 9, 10]], [[0.6, 0.3, 0.1]])          # after (5, 7): 8 9 10
    t.record([6], [7], [[11, 12, 0]], [[0.9, 0.05, 0.0]])        # after (6, 7): 11 12 (latest for 7)
    assert t.get(5, 7) == ([8, 9, 10], pytest.approx([0.6, 0.3, 0.1], abs=1e-5), True)
    assert t.get(6, 7)[0] == [11, 12] and t.get(6, 7)[2]
    ids, _, exact = t.get(4, 7)                                  # unseen pair: the last token's latest row
    assert ids == [11, 12] and not exact
    assert t.get(1, 2) == ([], [], False)                        # never seen
    t.record([-1], [3], [[4, 0, 0]], [[1.0, 0, 0]])              # unknown previous token: last-token row only
    assert t.get(9, 3) == ([4], [1.0], False)          # probabilities kept in 1/65535 steps
    t.clear()
    assert t.get(5, 7) == ([], [], False)


def test_table_is_compact_and_keeps_ids_of_large_vocabularies():
    from aded_ray.draft.recycle import quantize

    small = RecycleTable(49152)                 # SmolLM2: uint16 ids and probabilities, uint32 keys
    assert (small.keys.dtype, small.ids.dtype, small.probs.dtype) == (np.uint32, np.uint16, np.uint16)
    assert small.nbytes < 21_000_000            # 41.3 MB as int64 / int32 / float32
    assert small.filled() == 0
    big = RecycleTable(70_000, k=2, slot_bits=8)     # ids above 65535, pair keys above 2**32
    assert (big.keys.dtype, big.ids.dtype) == (np.int64, np.int32)
    big.record([69_998], [69_999], [[65_537, 3]], [[0.7, 0.2]])
    assert big.get(69_998, 69_999) == ([65_537, 3], pytest.approx([0.7, 0.2], abs=1e-5), True)
    assert big.filled() == 2
    assert [int(quantize(p)) for p in (0.0, -1.0, float("nan"), 2.0, 1.0, 0.5, 3e-6, 1e-5)] == \
        [0, 0, 0, 65535, 65535, 32768, 0, 1]
    small.record([1], [2], [[5, 6, 7]], [[0.9, 4e-6, 1e-7]])       # below half a step: ends the row
    assert small.get(1, 2)[0] == [5]
    small.clear()
    assert small.filled() == 0 and small.get(1, 2) == ([], [], False)


def test_table_rejects_mismatched_shapes():
    t = RecycleTable(10, k=2)
    with pytest.raises(ValueError, match="shapes"):
        t.record([1, 2], [3], [[4, 5]], [[0.5, 0.5]])
    with pytest.raises(ValueError, match="k = 0"):
        RecycleTable(10, k=0)


def test_prior_weights_give_the_noisy_or():
    cp = np.array([0.5, 0.0, 0.2, 0.0, 0.0])
    prior = 1 - (1 - 0.5) * (1 - 0.2)
    phi = np.empty(C.N_FEAT)
    C.features(cp, prior, 1, 3, 0, np.zeros(C.N_SRC), phi)
    assert C.predict(C.prior_weights(), phi) == pytest.approx(prior, abs=1e-9)


def test_combiner_learns_that_a_source_is_wrong():
    # a source claiming 0.9 that is never right: the learned probability falls well below the claim
    cp = np.array([0.0, 0.0, 0.0, 0.9, 0.0])
    phi = np.empty(C.N_FEAT)
    C.features(cp, 0.9, 1, 0, 0, np.zeros(C.N_SRC), phi)
    lr = C.OnlineLogistic(lr=0.2)
    before = C.predict(lr.w, phi)
    for _ in range(50):
        lr.learn(phi[None], np.array([False]))
    assert before == pytest.approx(0.9) and C.predict(lr.w, phi) < 0.3
    lr.reset()
    assert C.predict(lr.w, phi) == pytest.approx(0.9) and lr.seen == 0
    with pytest.raises(ValueError, match="weights"):
        C.OnlineLogistic(weights=[1.0, 2.0])


def test_recycled_predictions_are_drafted_as_a_chain():
    d = BestDrafter(TrigramMatrix.empty(100))                   # no corpus, no request repetition
    d.observe_logits([1, 2, 3], [2, 3, 4], [[3, 0], [4, 0], [5, 6]], [[0.9, 0], [0.8, 0], [0.7, 0.2]])
    t = d.draft([1, 2], 3)                                        # after (1, 2) the model said 3, then 4, then 5
    assert t.token_paths()[0] == [3, 4, 5]
    assert t.scores[0] == pytest.approx(0.9, abs=0.01)


def test_drafter_judges_its_last_draft_when_the_request_grows():
    d = BestDrafter(TrigramMatrix.empty(100), learn_rate=0.5)
    d.observe_logits([1], [2], [[3, 9]], [[0.9, 0.1]])
    t = d.draft([1, 2], 2)
    assert sorted(t.tokens.tolist()) == [3, 9]
    w0 = d.combiner.w.copy()
    d.observe([1, 2, 9, 4])                                       # verification took 9 (then bonus 4)
    assert d.combiner.seen == 2 and not np.allclose(d.combiner.w, w0)
    d.observe([7, 7, 7])                                          # a different request: nothing to judge
    assert d.combiner.seen == 2


def test_decode_loop_hands_over_root_and_node_predictions():
    calls = []
    tree = DraftTree([10, 11, 12], [-1, -1, 0])                  # root r=5 -> 10 -> 12, and 11
    logits = torch.full((4, 20), -10.0)
    for row, tok in enumerate([10, 12, 1, 2]):                    # row 0 = root, row i = node i - 1
        logits[row, tok] = 5.0
    rows = reduce_rows(logits, SamplingParams(), top_k=RECYCLE_K)

    class ArrayForm:                                              # a drafter with the general form only
        def observe_logits(self, *a):
            calls.append(a)

    recycle_predictions(ArrayForm(), [3, 4, 5], tree, rows)
    prev, inputs, ids, probs = calls[0]
    assert inputs.tolist() == [5, 10, 11, 12] and prev.tolist() == [4, 5, 5, 10]
    assert ids.shape == (4, RECYCLE_K) and ids[:, 0].tolist() == [10, 12, 1, 2]
    assert probs[0, 0] == pytest.approx(np.exp(5) / (np.exp(5) + 19 * np.exp(-10)), rel=1e-5)
    assert (np.diff(probs, axis=1) <= 0).all()


def test_tree_form_records_what_the_array_form_records():
    # oracle: the per-step tree form (one kernel, contexts implied by the tree) leaves the table exactly as
    # the general form given the contexts spelled out; root 5 after 4, tree 5 -> 10 -> 12 -> 13, and 11
    tree = DraftTree([10, 11, 12, 13], [-1, -1, 0, 2])
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 40, (5, 3))
    probs = np.sort(rng.random((5, 3)).astype(np.float32), axis=1)[:, ::-1].copy()
    a, b = RecycleTable(40, k=3, slot_bits=8), RecycleTable(40, k=3, slot_bits=8)
    a.record([4, 5, 5, 10, 12], [5, 10, 11, 12, 13], ids, probs)
    b.record_tree(4, 5, tree.tokens, tree.parents, ids, probs)
    assert (a.keys == b.keys).all() and (a.ids == b.ids).all() and (a.probs == b.probs).all()
    assert b.filled() == 10 and b.get(10, 12)[0] == ids[3].tolist()     # 5 last-token rows + 5 pair rows
    c = RecycleTable(40, k=3, slot_bits=8)                        # the first token of a request: no pair row
    c.record_tree(-1, 5, tree.tokens[:0], tree.parents[:0], ids[:1], probs[:1])
    assert c.filled() == 1 and c.get(-1, 5)[0] == ids[0].tolist()
    with pytest.raises(ValueError, match="shapes"):               # one row per node and one for the root
        b.record_tree(4, 5, tree.tokens, tree.parents, ids[:4], probs[:4])
    with pytest.raises(ValueError, match="shapes"):               # not breadth-first: a parent after its child
        b.record_tree(4, 5, tree.tokens, np.array([-1, 2, 0, 2], np.int32), ids, probs)

    # the decode loop takes the tree form when the drafter has it, with the same rows
    d, e = BestDrafter(TrigramMatrix.empty(40)), BestDrafter(TrigramMatrix.empty(40))
    class ArrayOnly:
        observe_logits = e.observe_logits
    from aded_ray.verify.accept import RowChoices
    rows = RowChoices(np.zeros(5, np.int64), ids, probs)
    recycle_predictions(d.session(), [3, 4, 5], tree, rows)
    recycle_predictions(ArrayOnly(), [3, 4, 5], tree, rows)
    assert (d.recycle.keys == e.recycle.keys).all() and (d.recycle.ids == e.recycle.ids).all()
    assert (d.recycle.probs == e.recycle.probs).all() and d.recycle.filled() == 10


def test_tree_form_hands_a_fleet_journal_the_context_arrays():
    # with a journal (the fleet store's hook) the tree form records the same rows and hands over their contexts
    class Journal:
        calls = []

        def record_recycle(self, *a):
            self.calls.append(a)

    tree = DraftTree([10, 11, 12], [-1, -1, 0])
    ids = np.arange(12).reshape(4, 3)
    probs = np.full((4, 3), 0.25, np.float32)
    t, ref = RecycleTable(40, k=3, slot_bits=8), RecycleTable(40, k=3, slot_bits=8)
    t.journal = Journal()
    t.record_tree(4, 5, tree.tokens, tree.parents, ids, probs)
    ref.record([4, 5, 5, 10], [5, 10, 11, 12], ids, probs)
    prev, inputs, got_ids, got_p = Journal.calls[0]
    assert prev.tolist() == [4, 5, 5, 10] and inputs.tolist() == [5, 10, 11, 12]
    assert np.array_equal(got_ids, ids) and np.array_equal(got_p, probs)
    assert (t.keys == ref.keys).all() and (t.ids == ref.ids).all() and (t.probs == ref.probs).all()
