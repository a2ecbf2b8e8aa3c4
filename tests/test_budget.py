"""Cost model and adaptive budget on literal curves (no timing)."""
import pytest

from aded_ray.verify.budget import AdaptiveBudget, CostCurve, PassCost


def test_worked_example():
    cost = CostCurve({1: 34, 8: 40, 64: 133})
    b = AdaptiveBudget(cost, explore_every=0)
    b.acc.update({0: 0.0, 1: 0.3, 3: 0.6, 5: 0.8, 7: 0.9})
    b.acc.update({k: 1.0 for k in b.acc if k > 7})
    assert b.best() == 7
    assert b.expected_rate(7) == pytest.approx(1.9 / 40.3)
    assert b.expected_rate(0) == pytest.approx(1 / 34)


def test_falls_back_to_plain_when_drafts_do_not_pay():
    cost = CostCurve({1: 30, 2: 60, 64: 500})        # any multi-token pass costs double
    b = AdaptiveBudget(cost, explore_every=0)
    for _ in range(50):
        b.observe(63, 63, [])                          # nothing is ever accepted
    assert b.best() == 0


def test_learns_budget_from_accepted_paths():
    cost = CostCurve({1: 30, 4: 31, 16: 33, 64: 120})
    b = AdaptiveBudget(cost, explore_every=0, decay=0.5)
    for _ in range(20):
        b.observe(63, 40, [2, 9, 30])                  # at budget 3: 1 token, 11: 2, 31: 3
    assert b.acc[3] == pytest.approx(1) and b.acc[11] == pytest.approx(2) and b.acc[31] == pytest.approx(3)
    assert b.acc[1] == pytest.approx(0, abs=1e-5)
    assert b.best() in (11, 15)


def test_exploration_steps_up_the_grid():
    b = AdaptiveBudget(CostCurve({1: 30, 64: 31}), explore_every=2)
    first = b.choose()
    second = b.choose()
    assert b.grid.index(second) == b.grid.index(first) + 1 or first == b.grid[-1]


def test_cost_curve_is_monotone_and_needs_k1():
    c = CostCurve({1: 10, 2: 30, 4: 20})          # the spike at k=2 is cut to the larger pass's cost
    assert c(2) == 20 and c(3) == 20 and c(4) == 20
    assert c(8) == 40                              # past the last point: proportional
    with pytest.raises(ValueError):
        CostCurve({2: 5})


def test_cost_curve_follows_measurements():
    c = CostCurve({1: 40.0, 16: 60.0, 64: 130.0})
    for _ in range(200):
        c.observe(1, 30.0)              # the machine got faster than the start-up measurement
    assert c(1) == pytest.approx(30.0, abs=0.5)
    assert c(16) < 60.0 and c(64) < 130.0                    # the level moves for every size


def test_a_curve_measured_under_load_recovers_at_sizes_no_longer_visited():
    true = {1: 40.0, 2: 42.0, 8: 50.0, 64: 130.0}
    c = CostCurve({k: 10 * v for k, v in true.items()})       # start-up measured while the machine was busy
    b = AdaptiveBudget(c, explore_every=0)
    b.acc.update({g: 1.5 for g in b.grid if g})
    for _ in range(400):
        c.observe(1, 40.0)                                   # the budget only ever runs plain steps now
    assert 50.0 <= c(8) < 100.0                              # far from the 500 it started at (pessimistic)
    assert b.best() > 0                                      # and drafting pays again


def test_empty_drafts_teach_every_budget():
    b = AdaptiveBudget(CostCurve({1: 30, 64: 31}), explore_every=0)
    for _ in range(30):
        b.observe(7, 0, [])                                  # the drafter had nothing to propose
    assert all(b.acc[g] < 0.15 for g in b.grid)              # the prior (worth 4 observations) fades
    for _ in range(300):
        b.observe(7, 0, [])
    assert all(b.acc[g] < 1e-3 for g in b.grid)


def test_one_cold_step_does_not_erase_the_prior():
    # a fresh process's first drafting step (a cold request: nothing accepted) moves the estimate a fifth of
    # the way (the prior counts as 4 observations), it does not replace it: drafting is tried again
    c = CostCurve({1: 30, 8: 33, 16: 36, 64: 60})
    b = AdaptiveBudget(c, explore_every=0)
    assert b.best() > 0
    b.observe(15, 15, [])
    assert b.acc[15] == pytest.approx(0.8 * (0.4 + 0.1 * 4)) and b.best() > 0


def test_trees_shrink_as_the_batch_grows_and_exploration_stops_where_it_cannot_pay():
    # a CPU-like table: one request's 16-token pass costs 1.4x its 1-token pass; 64 requests' 2-token
    # pass costs 2x their 1-token pass
    c = PassCost({1: {1: 35, 2: 37, 8: 42, 16: 50, 64: 120}, 4: {1: 40, 2: 45, 8: 70, 16: 120},
                  16: {1: 60, 2: 90, 8: 250}, 64: {1: 150, 2: 300, 8: 1100}})
    b = AdaptiveBudget(c, explore_every=1)
    b.acc.update({g: min(2.0, 0.3 * g ** 0.5) for g in b.grid if g})
    sizes = [b.best(batch) for batch in (1, 4, 16, 64)]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > 0 and sizes[-1] == 0
    assert b.choose(64) == 0                     # no exploration: even 1 accepted per node could not pay


def test_the_batched_cost_decides_not_the_total_tokens():
    # one request's 16-token pass is cheap (1.2x its 1-token pass), but 8 requests x 2 tokens cost 1.8x
    # 8 x 1: a curve over total tokens would draft for the batch of 8; the measured table says plain
    c = PassCost({1: {1: 30, 2: 31, 8: 33, 16: 36}, 8: {1: 40, 2: 72, 4: 90}})
    b = AdaptiveBudget(c, explore_every=0)
    b.acc.update({g: 0.6 for g in b.grid if g})
    assert b.best(1) > 0
    assert b.best(8) == 0


def test_measured_drafting_time_is_learnt():
    b = AdaptiveBudget(CostCurve({1: 30, 64: 31}))
    for _ in range(200):
        b.observe_draft(2.0)
    assert b.draft_ms == pytest.approx(2.0, rel=0.01)


def test_a_draft_must_beat_plain_by_a_margin():
    b = AdaptiveBudget(CostCurve({1: 30, 8: 40, 64: 120}), explore_every=0, margin=0.05)
    b.acc.update({g: 0.0 for g in b.grid})
    b.acc.update({g: 0.36 for g in b.grid if g >= 7})     # 1.36 / 40.3 vs 1 / 30: 1.2% better: not enough
    assert b.best() == 0
    b.acc.update({g: 0.5 for g in b.grid if g >= 7})      # 11.7% better
    assert b.best() == 7


def test_a_request_that_accepts_more_than_the_process_gets_larger_trees_after_a_few_steps():
    c = PassCost({1: {1: 30, 2: 31, 4: 32, 8: 34, 16: 40, 32: 60, 64: 110}})
    b = AdaptiveBudget(c, explore_every=0, decay=0.001)             # the shared estimate moves slowly
    b.acc.update({g: min(0.4, 0.1 * g) for g in b.grid if g})     # the process's chat traffic: little
    b.seen.update({g: 100 for g in b.grid})
    code = b.request_state()
    assert b.best(1, [code]) == b.best(1)                           # no record yet: the shared estimate
    for _ in range(12):
        b.observe(15, 15, [0, 1, 3, 6, 10], code)                   # this request accepts 5 of 15 nodes
    assert b.accepted(15, code) > 3.0 and b.accepted(15) < 1.0
    assert b.best(1, [code]) >= 11 > b.best(1)                     # all 5 fit in 11 nodes
    one_lucky = b.request_state()
    b.observe(15, 15, [0, 1, 3, 6, 10], one_lucky)                  # a single step moves it only part way
    assert b.accepted(15, one_lucky) < 0.5 * (b.accepted(15) + 5)


def test_requests_that_do_not_speculate_count_their_root_only():
    b = AdaptiveBudget(PassCost({1: {1: 30, 8: 40}, 2: {1: 35, 8: 45}}), explore_every=0)
    b.acc.update({g: 1.0 for g in b.grid if g})
    r = b.request_state()
    assert b.expected_rate(7, 2, reqs=[r, None]) == pytest.approx((2.0 + 1.0) / (45 + 2 * b.draft_ms))


def test_drafting_that_does_not_pay_in_whole_steps_is_switched_off_whatever_the_estimates_say():
    b = AdaptiveBudget(PassCost({1: {1: 30, 2: 31, 8: 34}, 8: {1: 40, 2: 45, 8: 60}}), explore_every=0,
                       check_every=8)
    b.acc.update({g: 2.0 for g in b.grid if g})        # (wrongly) optimistic estimates: the model drafts
    b.seen.update({g: 100 for g in b.grid})
    chosen = []
    for _ in range(200):
        k = b.choose(8)
        chosen.append(k)
        # what really happens here: a drafting step commits 9 tokens in 60 ms, a plain step 8 in 40 ms
        b.observe_step(8, k > 0, 9 if k else 8, 60.0 if k else 40.0)
    late = chosen[100:]
    assert 0 < sum(k > 0 for k in late) <= len(late) // 8 + 1        # only the periodic probes draft
    assert b.best(8) > 0                                              # the model alone would draft


def test_probes_where_drafting_does_not_pay_back_off_and_start_over_when_it_pays():
    b = AdaptiveBudget(PassCost({1: {1: 30, 2: 31, 8: 34}, 8: {1: 40, 2: 45, 8: 60}}), explore_every=0,
                       check_every=8, max_probe_every=32)
    b.acc.update({g: 2.0 for g in b.grid if g})
    b.seen.update({g: 100 for g in b.grid})
    pays = False
    drafted = []
    for i in range(600):
        if i == 400:
            pays = True                  # the workload changes: drafting steps now commit 16 tokens in 50 ms
        k = b.choose(8)
        drafted.append(k > 0)
        b.observe_step(8, k > 0, (16 if pays else 9) if k else 8, (50.0 if pays else 60.0) if k else 40.0)
    probes = [i for i in range(400) if drafted[i]]
    gaps = [b - a for a, b in zip(probes, probes[1:])]
    # 12 drafting steps (the evidence the check needs before a veto), then probes after 8 (9 from the last
    # evidence step), 16, then every 32 steps (not every 8)
    assert sum(drafted[:15]) == 12 and gaps[11:13] == [9, 16] and all(g == 32 for g in gaps[13:])
    assert sum(drafted[200:400]) <= 200 // 32 + 1
    assert sum(drafted[450:600]) >= 120                       # drafting pays again: it is back, mostly


def test_drafting_that_pays_keeps_drafting_with_rare_plain_probes():
    b = AdaptiveBudget(PassCost({1: {1: 30, 2: 31, 8: 34}}), explore_every=0, check_every=8)
    b.acc.update({g: 1.0 for g in b.grid if g})
    b.seen.update({g: 100 for g in b.grid})
    chosen = []
    for _ in range(200):
        k = b.choose(1)
        chosen.append(k)
        b.observe_step(1, k > 0, 2 if k else 1, 34.0 if k else 30.0)
    late = chosen[100:]
    assert 0 < sum(k == 0 for k in late) <= len(late) // 8 + 1


def test_the_check_measures_plain_first_and_shares_it_within_a_power_of_two_of_batch_sizes():
    b = AdaptiveBudget(PassCost({1: {1: 30, 2: 31, 8: 34}}), explore_every=0, check_every=1000,
                       min_evidence=4)
    b.acc.update({g: 2.0 for g in b.grid if g})
    b.seen.update({g: 100 for g in b.grid})
    b.observe_step(1, False, 1, 30.0)                 # a caller that reports its steps
    assert b.choose(8) == 0                           # batch sizes 8-15: plain measured first
    b.observe_step(9, False, 9, 40.0)
    assert b.choose(12) > 0                           # then drafting is tried (same bucket as 9)
    for _ in range(4):
        b.observe_step(12, True, 12, 60.0)            # and did not pay, in enough steps to tell
    assert b.choose(15) == 0 and b.choose(16) == 0    # 16: a new bucket, plain first again


def test_the_first_few_drafting_steps_cannot_veto_drafting_alone():
    # a fresh process: its first drafting steps are cold (nothing learnt yet) and slow; the check needs
    # min_evidence (here 4) of them before it vetoes, and a vetoed size needs probes
    # ahead of plain by the margin
    b = AdaptiveBudget(PassCost({1: {1: 30, 2: 31, 8: 34}}), explore_every=0, check_every=1000,
                       min_evidence=4)
    b.acc.update({g: 2.0 for g in b.grid if g})
    b.seen.update({g: 100 for g in b.grid})
    b.observe_step(1, False, 1, 30.0)
    for _ in range(3):
        assert b.choose(1) > 0
        b.observe_step(1, True, 1, 60.0)              # cold: nothing accepted, a slower pass
    assert b.choose(1) > 0                            # three steps are not enough evidence
    b.observe_step(1, True, 1, 60.0)
    assert b.choose(1) == 0                           # four are: vetoed
    b.realized[1]["draft"][:2] = [1.02, 30.0]         # probes now show drafting 2% ahead: within the margin
    assert b.choose(1) == 0
    b.realized[1]["draft"][:2] = [1.1, 30.0]          # 10% ahead: drafting again
    assert b.choose(1) > 0


def test_the_check_weighs_steps_by_their_time_not_by_count():
    # drafting steps: nine quick ones (2 tokens in 10 ms) and one that stalls (2 tokens in 500 ms): 20 tokens
    # in 590 ms, 0.034 tokens / ms, against plain steps' 0.1; the mean of per-step rates (0.18) would say
    # the opposite
    b = AdaptiveBudget(PassCost({1: {1: 30, 2: 31, 8: 34}}), explore_every=0, check_every=1000,
                       min_evidence=10)
    b.acc.update({g: 2.0 for g in b.grid if g})
    b.seen.update({g: 100 for g in b.grid})
    for _ in range(10):
        b.observe_step(1, False, 10, 100.0)
    for ms in [10.0] * 9 + [500.0]:
        b.observe_step(1, True, 2, ms)
    assert b.realized_rate(1, "draft") < 0.05 < b.realized_rate(1, "plain") == pytest.approx(0.1)
    assert b.choose(1) == 0


def _record(b: AdaptiveBudget, accepted: dict, n: int = 50):
    """A request's acceptance record: ``accepted[g]`` nodes accepted on average at grid budget g."""
    r = b.request_state()
    for i, g in enumerate(b.grid):
        if g:
            r.sum[i], r.n[i] = n * accepted.get(g, max(v for k, v in accepted.items() if k <= g)), n
    return r


def test_allot_gives_nodes_to_the_requests_that_accept_them_in_a_ragged_pass():
    # 4 requests: a pass of 4 tokens 20 ms, 8 tokens 26 ms, 16: 38 ms, 32: 62 ms (tokens per request 1, 2, 4, 8)
    cost = PassCost({1: {1: 10, 2: 11, 4: 12, 8: 14, 16: 18, 64: 60}, 4: {1: 20, 2: 26, 4: 38, 8: 62}})
    b = AdaptiveBudget(cost, prior=0.05, draft_ms=0.3, explore_every=0)
    code = _record(b, {1: 0.9, 3: 2.5, 5: 3.4, 7: 3.8, 11: 4.0})
    chat = _record(b, {1: 0.05})
    ks = b.allot([code, chat, code, chat], [63, 63, 63, 63])
    assert ks[1] == ks[3] == 0 and ks[0] > 0 and ks[2] > 0, ks
    # the expected rate of that allotment beats plain decoding: tokens / ms of the whole pass
    total = 4 + sum(ks)
    tokens = 4 + 2 * b.accepted(ks[0], code)
    assert tokens / (cost(4, total / 4) + 2 * b.draft_ms) > 4 / cost(4, 1)
    # a request's own cap holds, and one that does not speculate (cap 0) gets nothing
    assert b.allot([code, code, chat, chat], [3, 0, 63, 63])[:2] == [3, 0]


def test_allot_drafts_nothing_where_no_tree_pays():
    cost = PassCost({1: {1: 10, 64: 640}, 4: {1: 40, 8: 320}})     # every token costs the same: nothing pays
    b = AdaptiveBudget(cost, prior=0.05, explore_every=0)
    good = _record(b, {1: 0.8, 3: 1.6, 7: 2.0})
    assert b.allot([good] * 4, [63] * 4) == [0, 0, 0, 0]
    # the realized-rate check vetoes drafting at a batch size where drafting steps delivered less
    cheap = AdaptiveBudget(PassCost({1: {1: 10, 64: 12}, 4: {1: 20, 8: 22}}), prior=0.05, explore_every=0,
                           check_every=1000, min_evidence=4)
    assert max(cheap.allot([good] * 4, [63] * 4)) > 0
    cheap.observe_step(4, False, 4, 20.0)
    for _ in range(4):
        cheap.observe_step(4, True, 4, 40.0)        # drafting steps: 0.1 tokens / ms against plain 0.2
    assert cheap.allot([good] * 4, [63] * 4) == [0, 0, 0, 0]


def test_allot_curves_match_accepted_per_request():
    b = AdaptiveBudget(PassCost({1: {1: 10, 64: 20}}), prior=0.3, explore_every=0)
    code, chat = _record(b, {1: 0.9, 3: 2.5}), _record(b, {1: 0.0}, n=2)
    rows = b._curves([code, chat, None])
    for row, r in zip(rows, [code, chat, None]):
        assert row == pytest.approx([b.accepted(g, r) for g in b.grid])


def test_exploration_tries_a_request_that_went_plain_again():
    # a request that accepted nothing in its first 20 steps is plain by its own record; its record only
    # learns from drafts, so every explore_every-th step tries it again with one node
    b = AdaptiveBudget(PassCost({1: {1: 30, 2: 31, 8: 34}}), explore_every=4)
    cold = _record(b, {1: 0.0}, n=20)
    assert [b.allot([cold], [63])[0] for _ in range(8)] == [0, 0, 0, 1, 0, 0, 0, 1]
    assert [b.allot([cold], [0])[0] for _ in range(4)] == [0, 0, 0, 0]      # never one that may not


def test_policy_check_runs_one_node_per_request_where_whole_steps_show_it_delivers_more():
    cost = PassCost({1: {1: 10, 2: 11, 4: 12, 8: 14}, 4: {1: 20, 2: 22, 4: 24, 8: 30}})
    b = AdaptiveBudget(cost, prior=0.05, draft_ms=0.0, explore_every=0, check_every=0,
                       policy_block=8, policy_every=64, policy_probe=8, min_evidence=12)
    code = _record(b, {1: 0.9, 3: 2.5, 5: 2.6})
    one_rate = {"one": (6, 20.0), "model": (8, 40.0)}      # tokens, ms of a step: one node 0.3 / ms, model 0.2

    def run(steps: int, batch: int = 4) -> list[str]:
        seen = []
        for _ in range(steps):
            ks = b.allot([code] * batch, [63] * batch)
            p = "one" if ks == [1] * batch and batch > 1 else "model"
            assert p == b._step_policy[1]
            seen.append(p)
            tok, ms = one_rate[p]
            b.observe_step(batch, any(ks), tok, ms)
        return seen

    first = run(200)
    # (the first reported step starts the check) then both measured in alternating blocks of 8 steps
    assert first[:9] == ["model"] * 9 and first[9:17] == ["one"] * 8 and first[17:25] == ["model"] * 8
    assert first[-100:].count("one") >= 80                  # then one node, 8 steps of the model every 64
    assert 0 < first[-100:].count("model") <= 20
    one_rate["model"] = (12, 30.0)                                      # the model's trees now deliver 0.4 / ms
    later = run(400)                                                    # (noticed at the model's probes)
    assert later[-100:].count("model") >= 80
    assert run(50, batch=1) == ["model"] * 50                           # one request: the model decides alone
    off = AdaptiveBudget(cost, prior=0.05, draft_ms=0.0, explore_every=0, check_every=0, uniform_policy=False)
    for _ in range(50):
        assert off.allot([code] * 4, [63] * 4) != [1, 1, 1, 1]
        off.observe_step(4, True, 6, 20.0)
