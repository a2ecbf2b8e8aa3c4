"""Length groups of a ragged pass (:func:`aded_ray.verify.batch.length_groups`) on literal cases: the split
minimises padded key entries plus a fixed cost per attention call, over runs of consecutive slots."""
import numpy as np

from aded_ray.verify.batch import length_groups


def test_alike_lengths_attend_together():
    assert length_groups(np.array([100, 110, 105]), np.array([1, 1, 1]), 96) == [(0, 3)]


def test_short_requests_beside_long_ones_get_their_own_run():
    # one run: 96 + 4 * 302 = 1304 entries; two runs: 2 * 96 + 2 * 302 + 2 * 42 = 880
    assert length_groups(np.array([300, 290, 40, 35]), np.array([2, 2, 2, 2]), 96) == [(0, 2), (2, 4)]


def test_a_split_that_saves_less_than_a_call_is_not_made():
    # the short one alone reads 10 keys instead of 60 (50 fewer) but costs two more calls (it splits the
    # run in three): worth it only when a call costs under 25 entries
    lens, counts = np.array([58, 8, 58]), np.array([2, 2, 2])
    assert length_groups(lens, counts, 26) == [(0, 3)]
    assert length_groups(lens, counts, 24) == [(0, 1), (1, 2), (2, 3)]


def test_runs_cover_every_slot_in_order():
    rng = np.random.default_rng(3)
    for _ in range(50):
        B = int(rng.integers(1, 40))
        runs = length_groups(rng.integers(1, 500, B), rng.integers(1, 9, B), int(rng.integers(0, 300)))
        assert runs[0][0] == 0 and runs[-1][1] == B
        assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(runs, runs[1:]))
    assert length_groups(np.array([], np.int64), np.array([], np.int64)) == []
