"""Leave-one-set-out harness (issue 17) on small literal cases: the monotone fit, the match-accuracy priors,
fitting without the scored set, the table, and the dev sets' prompts."""
import numpy as np
import pytest

from aded_ray.bench import generalize as G
from aded_ray.bench.traces import spread_pick


def test_pav_is_monotone_and_weighted():
    assert G.pav([1, 3, 2, 9], [2, 4, 4, 10]).round(3).tolist() == [0.5, 0.625, 0.625, 0.9]
    assert G.pav([0, 1], [0, 1]).tolist() == [0.0, 1.0]              # no data before any: 0
    assert G.pav([1, 0, 1], [1, 0, 2]).tolist() == pytest.approx([2 / 3] * 3)  # pooled; the empty bin too


def test_match_accuracy_counts_the_top_continuation_by_match_length():
    # one trace: prompt 1 2 3 1 2, output 3 4 1 2 3. Steps (root = output[i], truth = output[i+1]):
    #   ctx 1 2 3 1 2 3      -> "1 2 3" seen before, followed by 1; truth 4: a miss at length 3
    #   ctx ... 3 4          -> 4 unseen: no match
    #   ctx ... 3 4 1        -> "1" seen twice (-> 2, -> 2); truth 2: a hit at length 1
    #   ctx ... 3 4 1 2      -> "1 2" twice (-> 3, -> 3); truth 3: a hit at length 2
    tr = [{"prompt_ids": [1, 2, 3, 1, 2], "output_ids": [3, 4, 1, 2, 3]}]
    rc, hc, counts = G.match_accuracy(tr, 10, max_len=4)
    assert counts[0] == [0, 1, 1, 1, 0] and counts[1] == [0] * 5   # no history for the first trace
    # hits 1, 1, 0 at lengths 1, 2, 3 are not monotone: pooled to 2/3, and length 4 (no data) takes it
    assert rc == (0.0, 0.667, 0.667, 0.667, 0.667) and hc == (0.0, 0.0, 0.0, 0.0, 0.0)
    rc2, hc2, counts2 = G.match_accuracy(tr + tr, 10, max_len=4)   # the second trace also has a history
    assert sum(counts2[1]) > 0


def test_fit_never_sees_the_scored_set(monkeypatch):
    seen = []
    monkeypatch.setattr(G, "match_accuracy", lambda traces, V: (seen.append([t["id"] for t in traces]) or
                                                               ((0.0, 0.5), (0.0, 0.4), [])))
    sets = {"a": [{"id": "a1"}], "b": [{"id": "b1"}, {"id": "b2"}], "c": [{"id": "c1"}]}
    for name in sets:
        G.fit_params({k: v for k, v in sets.items() if k != name}, 10)
    assert seen == [["b1", "b2", "c1"], ["a1", "c1"], ["a1", "b1", "b2"]]


def test_table_reports_the_worst_set():
    def res(name, a, m30, m16, m8):
        rows = [{"drafter": "authors", "mat": a}, {"drafter": "lookup", "mat": 1.5}]
        rows += [{"drafter": f"best{b}", "mat": m, "draft_us_p50": 200.0} for b, m in ((30, m30), (16, m16), (8, m8))]
        return {"set": name, "traces": 3, "rows": rows}
    out = G.table([res("x", 2.0, 4.0, 3.0, 2.5), res("y", 2.0, 3.0, 2.8, 2.2)])
    assert "| x (3) | 2.000 | 1.500 | 4.000 | 3.000 | 2.500 | 2.00x / 1.50x / 1.25x | 200 / 200 / 200 |" in out
    assert "<= 30: mean 1.75x, worst 1.50x (y)" in out


def test_spread_pick():
    assert spread_pick(list(range(10)), 3) == [0, 3, 6]
    assert spread_pick([1, 2], 5) == [1, 2] and spread_pick([1, 2], None) == [1, 2]
