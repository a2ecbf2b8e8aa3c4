"""Trace replay: acceptance bookkeeping, and a store built from a text replayed on that same text."""
import json
import sysconfig
from pathlib import Path

import numpy as np

from aded_ray.bench.replay import ReplayResult, accepted_length, replay
from aded_ray.cli import main
from aded_ray.draft.build import matrix_from_token_docs
from aded_ray.draft.lookup import PromptLookupDrafter
from aded_ray.draft.mcts import MCTSDrafter
from aded_ray.draft.tree import DraftTree


class FixedDrafter:
    def __init__(self, tree):
        self.tree = tree

    def observe(self, seq):
        pass

    def draft(self, seq):
        return self.tree


def test_accepted_length_picks_longest_branch():
    t = DraftTree([1, 2, 3, 4], [-1, -1, 1, 2])   # root -> 1 ; root -> 2 -> 3 -> 4
    assert accepted_length(t, np.array([2, 3, 9])) == 2
    assert accepted_length(t, np.array([2, 3, 4, 5])) == 3
    assert accepted_length(t, np.array([7])) == 0
    assert accepted_length(DraftTree(), np.array([1])) == 0


def test_replay_counts_root_plus_accepted():
    trace = {"prompt_ids": [0], "output_ids": [5, 6, 7, 8, 9]}
    # each step drafts [6, 7]: step 1 (root 5) accepts 6, 7 -> emits 3; step 2 (root 8) accepts 0; step 3 (root 9)
    r = replay([trace], FixedDrafter(DraftTree([6, 7], [-1, 0])))
    assert (r.steps, r.emitted, r.nodes) == (3, 5, 6)
    assert r.summary()["mat"] == round(5 / 3, 4)


def test_store_from_text_replayed_on_same_text(tokenizer):
    text = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()
    ids = tokenizer(text)["input_ids"]
    m = matrix_from_token_docs([ids], len(tokenizer))
    trace = {"prompt_ids": ids[:32], "output_ids": ids[32:1500]}
    r = replay([trace], MCTSDrafter(m), "mcts")
    assert r.mat > 3.0, r.summary()
    plain = replay([trace], PromptLookupDrafter(), "lookup")
    assert plain.mat < r.mat


def test_bench_draft_cli_json(tmp_path, capsys):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 50, 200).tolist() for _ in range(5)]
    m = matrix_from_token_docs(docs, 50)
    m.save(tmp_path / "s.tri")
    traces = tmp_path / "t.jsonl"
    traces.write_text("\n".join(json.dumps({"prompt_ids": d[:10], "output_ids": d[10:]}) for d in docs))
    assert main(["bench-draft", "--traces", str(traces), "--store", str(tmp_path / "s.tri"),
                 "--no-authors", "--json", "--budgets"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"mat", "nodes_per_step", "draft_us_p50"} <= out.keys()
    assert out["mat"] > 2.0 and [d["name"] for d in out["drafters"]] == ["aded_ray parity (ADED MCTS, budget 64)", "prompt lookup (3..1-gram, 10 tokens)"]


def test_replay_pacing_makes_every_step_last_at_least_pace_ms():
    import time

    trace = {"prompt_ids": [0], "output_ids": [5, 6, 7, 8, 9]}
    t0 = time.perf_counter()
    r = replay([trace], FixedDrafter(DraftTree([6, 7], [-1, 0])), pace_ms=40)
    assert r.steps == 3 and time.perf_counter() - t0 >= 0.08   # steps 2 and 3 each wait out step 1, 2


def test_replay_sweep_reads_memory_between_steps_and_changes_no_result(monkeypatch):
    """``sweep_mb`` (bench-draft --sweep-mb): the other memory is read once before every step, before the
    drafter's (timed) calls, and the counts are those of a plain replay."""
    reads = []

    class Counted(np.ndarray):
        def sum(self, *a, **kw):
            reads.append(self.nbytes)
            return super().sum(*a, **kw)

    class Seen(FixedDrafter):
        def observe(self, seq):
            self.at.append(len(reads))          # reads done when the step's first drafter call starts

    zeros = np.zeros
    monkeypatch.setattr(np, "ones", lambda n: zeros(n).view(Counted))
    trace = {"prompt_ids": [0], "output_ids": [5, 6, 7, 8, 9]}
    plain, swept = Seen(DraftTree([6, 7], [-1, 0])), Seen(DraftTree([6, 7], [-1, 0]))
    plain.at, swept.at = [], []
    a = replay([trace], plain)
    assert reads == [] and plain.at == [0, 0, 0]
    b = replay([trace], swept, sweep_mb=2)
    assert (a.steps, a.emitted, a.nodes) == (b.steps, b.emitted, b.nodes) == (3, 5, 6)
    assert swept.at == [1, 2, 3] and reads == [2 << 20] * 3


def test_model_loop_host_time_pairs_each_draft_with_its_own_recycling_only():
    # the last step of a request recycles nothing (NaN): left out, not counted as a zero
    res = ReplayResult("x", draft_us=[100.0, 200.0, 300.0, 400.0], recycle_us=[10.0, float("nan"), 30.0, 50.0])
    got = res.summary()
    assert got["recycle_us_p50"] == 30.0 and got["host_us_p50"] == 330.0      # of 110, 330, 450
    assert "host_us_p50" not in ReplayResult("y", draft_us=[1.0], recycle_us=[float("nan")]).summary()
    assert "host_us_p50" not in ReplayResult("z", draft_us=[1.0, 2.0], recycle_us=[1.0]).summary()
