"""Sharing the model's own predictions and the learned combiner across a fleet (aded_ray.store.model_state):
order-independent merges, hostile entries, another model's state refused. Real redis-server processes."""
import numpy as np
import pytest
import redis

from aded_ray.draft import combine as C
from aded_ray.draft.best import BestDrafter
from aded_ray.draft.recycle import RecycleTable
from aded_ray.store import model_state as M
from aded_ray.store.redis_store import SharedStore, StoreMismatch
from aded_ray.store.server import RedisServer

V, K, BITS = 10, 3, 8


def _entries(rows):
    """Literal entries ``(ctx, ver, wid, ids, probs)`` -> the arrays ``apply_entries`` takes."""
    return (np.array([r[0] for r in rows], np.int64), np.array([r[1] for r in rows], np.int64),
            np.array([r[2] for r in rows], np.int64), np.array([r[3] for r in rows], np.int32),
            np.array([r[4] for r in rows], np.float32))


def _colliding_pair():
    """Two token pairs whose pair rows share one direct-mapped slot of a 2**BITS-slot table."""
    seen = {}
    for a in range(V):
        for b in range(V):
            row = int(M.row_of(V, BITS, a * V + b))
            if row in seen:
                return seen[row], (a, b)
            seen[row] = (a, b)
    raise AssertionError("no collision")


def _table_state(rows_in_order, split):
    t = RecycleTable(V, K, slot_bits=BITS)
    lver, lwid = np.zeros(t.keys.shape[0], np.int64), np.zeros(t.keys.shape[0], np.int64)
    for i in range(0, len(rows_in_order), split):
        M.apply_entries(t.keys, t.ids, t.probs, lver, lwid, V, BITS, *_entries(rows_in_order[i:i + split]))
    return t, [t.keys.copy(), t.ids.copy(), t.probs.copy(), lver, lwid]


def test_recycle_merge_gives_the_same_table_in_any_order():
    (a1, b1), (a2, b2) = _colliding_pair()
    rows = [
        (-(3 + 1), 100, 7, [1, 2, 3], [0.5, 0.2, 0.1]),     # last-token row of token 3
        (-(3 + 1), 105, 2, [4, 5, 6], [0.6, 0.3, 0.05]),    # newer: wins
        (-(3 + 1), 105, 1, [7, 8, 9], [0.9, 0.05, 0.01]),   # same version, lower writer: loses
        (-(3 + 1), 90, 9, [0, 0, 0], [0.1, 0.1, 0.1]),      # older: loses
        (a1 * V + b1, 200, 3, [2, 2, 2], [0.3, 0.3, 0.3]),  # two pairs, one slot: the higher version holds it
        (a2 * V + b2, 201, 1, [6, 5, 4], [0.7, 0.2, 0.1]),
        (2 * V + 3, 50, 4, [9, 8, 7], [0.4, 0.3, 0.2]),
    ]
    order_b = [rows[i] for i in (6, 5, 3, 1, 0, 4, 2)]
    t1, s1 = _table_state(rows, 1)
    t2, s2 = _table_state(order_b, 3)
    _, s3 = _table_state(order_b + rows, 7)                  # re-delivery changes nothing (idempotent)
    for x, y, z in zip(s1, s2, s3):
        np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(x, z)
    assert t1.get(-1, 3) == ([4, 5, 6], pytest.approx([0.6, 0.3, 0.05], abs=1e-5), False)
    assert t1.get(a2, b2)[0] == [6, 5, 4] and t1.get(a2, b2)[2]
    assert t1.get(a1, b1)[2] is False                       # evicted by the newer colliding pair
    assert t1.get(2, 3) == ([9, 8, 7], pytest.approx([0.4, 0.3, 0.2], abs=1e-5), True)


def test_combiner_merge_gives_the_same_weights_in_any_order():
    n = C.N_FEAT
    e = {b"a1": [(1, 10, np.full(n, 1.0), np.full(n, 2.0)), (3, 30, np.full(n, 3.0), np.full(n, 4.0))],
         b"b2": [(2, 10, np.full(n, -1.0), np.full(n, 1.0))],
         b"c3": [(5, 0, np.full(n, 9.0), np.full(n, 9.0)), (4, 60, np.full(n, 7.0), np.full(n, 7.0))]}
    flat = [(wr, x) for wr, xs in e.items() for x in xs]
    d1, d2 = {}, {}
    for wr, x in flat:
        M.offer_combiner(d1, wr, x)
    for wr, x in reversed(flat):
        M.offer_combiner(d2, wr, x)
    assert {k: v[0] for k, v in d1.items()} == {k: v[0] for k, v in d2.items()} == {b"a1": 3, b"b2": 2, b"c3": 5}
    w1, g1 = M.merge_combiners(d1)
    w2, g2 = M.merge_combiners(d2)
    np.testing.assert_array_equal(w1, w2)
    np.testing.assert_array_equal(g1, g2)
    # seen-weighted: a1 (30 seen, w 3) and b2 (10 seen, w -1); c3's latest entry has seen nothing
    np.testing.assert_allclose(w1, np.full(n, (30 * 3 - 10) / 40))
    assert M.merge_combiners({b"x": (1, 0, np.ones(n), np.ones(n))}) is None


def test_hostile_entries_are_rejected_or_clamped():
    now = 10**15
    ctx, ver, wid, ids, probs = _entries([
        (-1, 5, 1, [1, 2, 3], [0.5, float("nan"), 7.0]),       # kept, probabilities clamped
        (-(V + 1), 5, 1, [1, 2, 3], [0.1, 0.1, 0.1]),          # context out of range
        (V * V, 5, 1, [1, 2, 3], [0.1, 0.1, 0.1]),             # pair context out of range
        (4, 5, 1, [1, V, 3], [0.1, 0.1, 0.1]),                 # token id out of vocabulary
        (4, 5, 1, [1, -2, 3], [0.1, 0.1, 0.1]),
        (4, 0, 1, [1, 2, 3], [0.1, 0.1, 0.1]),                 # no version
        (4, now + M.MAX_SKEW_US + 1, 1, [1, 2, 3], [0.1, 0.1, 0.1]),   # from the far future: would pin a row
        (5, 6, 2, [0, 1, 2], [-3.0, 0.25, float("inf")]),      # kept, clamped
    ])
    good, bad = M.validate_rec((ctx, ver, wid, ids, probs), V, now)
    assert bad == 6
    assert good[0].tolist() == [-1, 5]
    assert good[4].tolist() == [[0.5, 0.0, 1.0], [0.0, 0.25, 1.0]]
    blob = M.pack_rec(*good)
    assert [x.tolist() for x in M.unpack_rec(blob, K)] == [x.tolist() for x in good]
    for b in (b"", blob[:-1], blob + b"\0", np.array([1, K], "<i8").tobytes()):
        with pytest.raises(ValueError):
            M.unpack_rec(b, K)
    with pytest.raises(ValueError):
        M.unpack_rec(blob, K + 1)                              # another table width
    n = C.N_FEAT
    ok = M.pack_comb(3, 5, np.full(n, 1e9), np.full(n, -1.0))
    seq, seen, w, g2 = M.unpack_comb(ok, n)
    assert (seq, seen, w.max(), g2.min()) == (3, 5, M.W_CLAMP, M.G2_MIN)
    for b in (ok[:-8], M.pack_comb(0, 5, np.ones(n), np.ones(n)), M.pack_comb(1, -1, np.ones(n), np.ones(n)),
              M.pack_comb(1, 5, np.full(n, np.nan), np.ones(n)), M.pack_comb(1, 5, np.ones(n), np.full(n, np.inf))):
        with pytest.raises(ValueError):
            M.unpack_comb(b, n)


@pytest.fixture
def server(tmp_path):
    s = RedisServer(tmp_path / "redis")
    yield s
    s.stop(kill=True)


def _matrix(vocab=200, tokenizer="test", model="m1"):
    from aded_ray.draft.build import matrix_from_token_docs

    rng = np.random.default_rng(0)
    return matrix_from_token_docs([rng.integers(0, vocab, 500).tolist()], vocab,
                                  meta={"tokenizer": tokenizer, "model": model})


def _store(url, ns, **kw):
    m = _matrix(**kw)
    d = BestDrafter(m)
    return SharedStore(m, url, namespace=ns, drafter=d, start=False, combiner_interval_s=0.0), d


def test_predictions_and_combiner_travel_through_redis_in_either_order(server):
    top = np.array([[5, 6, 7, 8, 9, 10, 11, 12]], np.int32)
    p = np.array([[0.5, 0.2, 0.1, 0.05, 0.05, 0.04, 0.03, 0.02]], np.float32)
    finals = []
    for ns, order in (("o1", (0, 1)), ("o2", (1, 0))):
        (sa, da), (sb, db) = _store(server.url, ns), _store(server.url, ns)
        da.observe_logits([1], [2], top, p)                    # both record the same context
        db.observe_logits([1], [2], top[:, ::-1].copy(), p)
        da.combiner.w[:] += 1.0
        da.combiner.seen = 40
        for s in (sa, sb):
            s.drain()                                          # publishes its combiner
        for i in order:
            (sa, sb)[i].flush()
        for s in (sa, sb):
            s.pull()
            s.drain()
        # both replicas hold the newer recording (b's) and the fleet's combiner (only a has learnt)
        for d in (da, db):
            assert d.recycle.get(1, 2)[0] == top[0, ::-1].tolist()
            np.testing.assert_allclose(d.combiner.w, C.prior_weights() + 1.0)
        sc, dc = _store(server.url, ns)                        # warm start from the merged hashes
        sc._load_merged()
        sc.drain()
        finals.append((dc.recycle.get(1, 2), dc.combiner.w.copy()))
        for s in (sa, sb, sc):
            s.close(flush=False)
    assert finals[0][0][0] == top[0, ::-1].tolist() and finals[0][0][2]
    np.testing.assert_allclose(finals[0][1], finals[1][1])


def test_hostile_entries_in_redis_do_not_reach_the_table(server):
    s, d = _store(server.url, "hostile")
    r = redis.Redis.from_url(server.url)
    good = M.pack_rec(*_entries([(-(3 + 1), 7, 1, [1, 2, 3, 4, 5, 6, 7, 8], [0.4] * 8)]))
    bad_tok = M.pack_rec(*_entries([(-(4 + 1), 7, 1, [1, 2, 3, 4, 5, 6, 7, 10**6], [0.4] * 8)]))
    for blob in (b"garbage", bad_tok, good):
        r.xadd(s.model_sync.k_rlog, {"w": b"intruder0000", "d": blob})
    r.hset(s.model_sync.k_comb, b"intruder0000", M.pack_comb(1, 5, np.full(C.N_FEAT, np.nan), np.ones(C.N_FEAT)))
    s.pull()
    s._load_merged()
    s.drain()
    assert d.recycle.get(-1, 3)[0] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert d.recycle.get(-1, 4)[0] == []                       # the out-of-vocabulary entry never applied
    assert s.model_sync.stats["rec_rejected"] == 2 and s.model_sync.stats["comb_rejected"] == 1
    np.testing.assert_array_equal(d.combiner.w, C.prior_weights())
    s.close(flush=False)


@pytest.mark.parametrize("other", [dict(vocab=300), dict(tokenizer="another-tokenizer"), dict(model="m2")])
def test_another_models_state_is_refused_with_a_clear_error(server, other):
    s, _ = _store(server.url, "fleet")
    s._load_merged()                                           # claims the namespace for its model
    with pytest.raises(StoreMismatch, match="holds the state of another model"):
        m = _matrix(**other)
        SharedStore(m, server.url, namespace="fleet", drafter=BestDrafter(m))   # a replica start
    with pytest.raises(StoreMismatch):
        _store(server.url, "fleet", **other)[0]._load_merged()
    s.close(flush=False)


def test_replay_recycles_the_predictions_of_the_root_and_accepted_rows():
    from aded_ray.bench.replay import replay
    from aded_ray.draft.tree import DraftTree

    class Fake:
        def __init__(self):
            self.calls = []

        def observe(self, seq):
            pass

        def draft(self, seq):
            return DraftTree([4, 9, 5], [-1, -1, 0])

        def observe_logits(self, prev, inputs, top_ids, top_p):
            self.calls.append((list(prev), list(inputs), np.asarray(top_ids).tolist()))

    trace = {"prompt_ids": [1, 2], "output_ids": [3, 4, 5, 6, 7],
             "top_ids": [[30], [40], [50], [60], [70]], "top_p": [[0.3], [0.4], [0.5], [0.6], [0.7]]}
    f = Fake()
    r = replay([trace], f)
    # step 1: root 3, accepts 4 5 (rows 3, 4, 5 predicted outputs 1..3); step 2: root 6, accepts nothing (row 6
    # predicted output 4); step 3: root 7, the last token, nothing after it to predict
    assert (r.steps, r.emitted, r.per_trace) == (3, 5, [(3, 5)])
    assert f.calls == [([2, 3, 4], [3, 4, 5], [[40], [50], [60]]), ([5], [6], [[70]])]
    f.calls.clear()
    replay([{k: v for k, v in trace.items() if k not in ("top_ids", "top_p")}], f)
    assert f.calls == []
