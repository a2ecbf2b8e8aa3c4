"""Length groups of a ragged pass (:func:`aded_ray.verify.batch.length_groups`) on literal cases: the split
minimises padded (query x key) entries plus a fixed cost per attention call, over runs of consecutive slots."""
import numpy as np

from aded_ray.verify.batch import length_groups


def test_alike_lengths_attend_together():
    assert length_groups(np.array([100, 110, 105]), np.array([1, 1, 1]), 192) == [(0, 3)]


def test_short_requests_beside_long_ones_get_their_own_run():
    # one run: 192 + 4 * 302 * 2 = 2608 entries; two runs: 2 * 192 + 2 * 302 * 2 + 2 * 42 * 2 = 1760
    assert length_groups(np.array([300, 290, 40, 35]), np.array([2, 2, 2, 2]), 192) == [(0, 2), (2, 4)]


def test_a_split_that_saves_less_than_a_call_is_not_made():
    # the short one alone reads 10 keys instead of 60 (2 queries x 50 = 100 fewer entries) but costs two
    # more calls (it splits the run in three): worth it only when a call costs under 50 entries
    lens, counts = np.array([58, 8, 58]), np.array([2, 2, 2])
    assert length_groups(lens, counts, 52) == [(0, 3)]
    assert length_groups(lens, counts, 48) == [(0, 1), (1, 2), (2, 3)]


def test_a_prompt_chunk_is_not_padded_into_the_decoding_requests_run():
    # decoding requests of 200-210 keys, one query each, beside a request of 150 keys: one query each, they
    # attend together (192 + 3 * 211 = 825 entries; apart 192 + 2 * 211 + 192 + 151 = 957) ...
    assert length_groups(np.array([200, 210, 150]), np.array([1, 1, 1]), 192) == [(0, 3)]
    # ... but not when the third brings a 90-token prompt chunk: together 192 + 3 * 240 * 90 = 64992,
    # apart 192 + 2 * 211 + 192 + 240 * 90 = 22406
    assert length_groups(np.array([200, 210, 150]), np.array([1, 1, 90]), 192) == [(0, 2), (2, 3)]
