"""The pass-cost table over (batch, width) on literal numbers (no timing), and its measurement grid."""
import pytest

from aded_ray.verify.cost import CostCurve, PassCost, cached_pass_cost, pass_grid


def test_worked_example():
    c = PassCost({1: {1: 30, 8: 40}, 4: {1: 40, 8: 100}})
    assert c(1, 4) == pytest.approx(30 + 10 * 3 / 7)
    assert c(2, 1) == pytest.approx(30 + 10 / 3)         # between batch 1 and 4
    assert c(8, 8) == pytest.approx(200)                 # past the largest batch: proportional
    assert c(1, 16) == pytest.approx(80)                 # past the widest pass: proportional


def test_a_single_request_curve_is_a_serial_verifier():
    c = PassCost(CostCurve({1: 30, 64: 31}))
    assert c(1, 64) == 31 and c(3, 64) == 93


def test_fixed_widths_round_every_pass_up():
    c = PassCost({1: {1: 10, 16: 11, 64: 12}}, widths=(16, 64))
    assert c(1, 1) == 11 and c(1, 17) == 12


def test_needs_batch_one():
    with pytest.raises(ValueError, match="batch 1"):
        PassCost({2: {1: 10}})


def test_online_measurements_move_the_level_and_the_nearest_shape():
    c = PassCost({1: {1: 40.0, 8: 50.0}, 8: {1: 80.0, 8: 200.0}})
    for _ in range(300):
        c.observe(8, 2, 60.0)                 # the machine is faster than at start-up, for batch 8
    assert c(8, 2) == pytest.approx(60.0, rel=0.05)
    assert c(1, 1) < 40.0                     # every shape's level moved with it
    assert c(8, 8) >= c(8, 2)                 # still monotone in the width


def test_grid_covers_plain_and_the_smallest_draft_at_every_batch():
    g = pass_grid(32, 65, max_tokens=64)
    assert list(g) == [1, 2, 4, 8, 16, 32]
    assert g[1] == [1, 2, 4, 8, 16, 32, 64] and g[32] == [1, 2] and g[8] == [1, 2, 4, 8]
    assert pass_grid(8, 65, widths=(64,)) == {1: [64], 2: [64], 4: [64], 8: [64]}


def test_cache_is_reused_unless_the_probe_is_off_by_more_than_a_factor_two(tmp_path):
    calls = []

    def measure():
        calls.append(1)
        return PassCost({1: {1: 30.0, 8: 40.0}, 4: {1: 50.0}})

    ok = lambda: PassCost({1: {1: 33.0, 8: 44.0}})           # noqa: E731 - 10% slower: the same table
    assert cached_pass_cost(measure, ok, "k", tmp_path)(4, 1) == 50.0 and len(calls) == 1
    again = cached_pass_cost(measure, ok, "k", tmp_path)                 # the cached shape at the probe's level
    assert again(4, 1) == pytest.approx(55.0) and again(1, 8) == pytest.approx(44.0)
    assert len(calls) == 1
    # a machine 40% slower for now, and one point noisier still: the median ratio (1.4, 1.4, 2.5) is 1.4, inside
    # the factor 2: not measured again, scaled
    noisy = lambda: PassCost({1: {1: 42.0, 4: 48.0, 8: 100.0}})  # noqa: E731
    assert cached_pass_cost(measure, noisy, "k", tmp_path)(4, 1) == pytest.approx(70.0) and len(calls) == 1
    slow = lambda: PassCost({1: {1: 75.0, 8: 90.0}})          # noqa: E731 - 2.5x: the cache was taken under load
    cached_pass_cost(measure, slow, "k", tmp_path)
    assert len(calls) == 2
    fast = lambda: PassCost({1: {1: 12.0, 8: 18.0}})          # noqa: E731 - 0.4x, 0.45x: measured again
    cached_pass_cost(measure, fast, "k", tmp_path)
    assert len(calls) == 3
    f = next(tmp_path.glob("cost-*.json"))                   # a damaged cache: zeros are no table
    f.write_text(f.read_text().replace("30.0", "0.0").replace("40.0", "0.0"))
    assert cached_pass_cost(measure, ok, "k", tmp_path)(1, 1) == 30.0 and len(calls) == 4


def test_a_compiled_pass_costs_its_token_bucket():
    # measured at the bucket edges (T = batch x width); a pass between two edges runs the larger bucket's graph
    cost = PassCost({1: {1: 30.0, 2: 32.0, 4: 36.0, 8: 44.0}, 2: {1: 33.0, 2: 37.0, 4: 45.0}})
    assert cost(1, 3) == pytest.approx(34.0)                # eager: linear between the measured widths
    above = cost(1, 12)
    cost.token_buckets = (1, 2, 4, 8)
    assert cost(1, 3) == cost(1, 4) == 36.0                  # 3 tokens: the 4-token graph
    assert cost(1, 5) == cost(1, 8) == 44.0
    assert cost(2, 1.5) == cost(2, 2) == 37.0                # 2 requests x 1.5 = 3 tokens: bucket 4
    assert cost(2, 3) == cost(2, 4) == 45.0                  # 6 tokens: bucket 8
    assert cost(1, 12) == above                              # above the largest bucket: eager, no rounding
