"""The tensor-parallel batched KV's protocol without Ray or DeepSpeed: two in-process "ranks" (the real
``RankWorker.kv_call``, each on the scheduler tests' fake model) behind a fake group. Every call reaches both
ranks with the same arguments, the compaction travels with the next call, and the scheduler over it gives
each request the output it gets alone."""
import importlib.util
import threading
from pathlib import Path

import numpy as np

from aded_ray.decode import FixedBudget, GenerationStats
from aded_ray.draft.tree import DraftTree
from aded_ray.scheduler import GenRequest, Scheduler
from aded_ray.tp.group import RankWorker, TPBatchKV

_spec = importlib.util.spec_from_file_location("_sched_fakes", Path(__file__).with_name("test_scheduler.py"))
_fakes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fakes)           # the scheduler tests' fake model (tests import in importlib mode)


class FakeRank(RankWorker):
    def __init__(self, rank):               # (no DeepSpeed: the fake model's KV per TPBatchKV id)
        self.rank, self.kvs, self.saved, self.calls = rank, {}, {}, []

    def kv_new(self, kid, prefill_chunk):
        self.kvs[kid] = _fakes.FusingKV()
        self.kvs[kid].fused = []

    def kv_call(self, kid, method, args, commit=None):
        self.calls.append((method, commit))
        return super().kv_call(kid, method, args, commit)


class FakeGroup:
    broken = None

    def __init__(self):
        self.ranks = [FakeRank(0), FakeRank(1)]

    def _all(self, method, *args):
        return [getattr(r, method)(*args) for r in self.ranks][0]

    def drop_kv(self, kid):
        for r in self.ranks:
            r.kv_drop(kid)


def test_compaction_travels_with_the_next_call_to_every_rank():
    g = FakeGroup()
    kv = TPBatchKV(g)
    assert kv.add_slot() == 0 and kv.used == 1
    assert kv.prefill(0, [3, 4, 5]) is not None and list(kv.lens) == [3]
    logits = kv.forward_trees([7], [DraftTree.from_paths([[8, 9]])])
    assert logits.shape[0] == 3                                   # root + 2 nodes: rank 0's rows
    kv.commit([[0, 1]])
    assert list(kv.lens) == [5]                                   # counted here at once
    assert all(len(r.kvs[kv.kid].slots[0]) == 3 for r in g.ranks)  # not yet sent
    kv.forward_trees([1], [DraftTree()])
    for r in g.ranks:                                             # sent with the next pass, to both ranks
        assert r.calls[-1] == ("forward_trees", [[0, 1]])
        assert r.kvs[kv.kid].slots[0][:5] == [3, 4, 5, 7, 8]
    kv.commit([[0]])
    kv.commit([[0]])                                              # two without a call between: the first flushed
    assert [c[0] for c in g.ranks[0].calls[-1:]] == ["sync"] and list(kv.lens) == [7]
    g.broken = "rank died"
    kv.drop_last()                                                # freeing slots of a broken group: local only
    assert kv.used == 0 and g.ranks[0].calls[-1][0] == "sync"


def test_the_scheduler_over_a_tp_batch_kv_gives_each_request_its_output_alone():
    g = FakeGroup()
    s = Scheduler(TPBatchKV(g), _fakes.OracleDrafter(), FixedBudget(4), [_fakes.EOS], max_batch=4,
                  default_max_nodes=8)
    res = {}

    def go(i):
        h = s.submit(GenRequest(_fakes.PROMPTS[i], 12 + 3 * i), GenerationStats())
        res[i] = [t for toks, _ in h for t in toks]

    threads = [threading.Thread(target=go, args=(i,)) for i in range(6)]
    [t.start() for t in threads]
    [t.join(10) for t in threads]
    s.close()
    for i in range(6):
        assert res[i] == _fakes.alone(_fakes.PROMPTS[i], 12 + 3 * i), i
    kv = g.ranks[1].kvs[s.kv.kid]
    assert max(b for b, _ in kv.passes) >= 2                      # batched on the ranks
    assert g.ranks[0].calls == g.ranks[1].calls                   # the same calls, in the same order
    assert s.counters.accepted_tokens > 0 and s.counters.fused_prefills > 0   # prompt chunks rode in passes
    assert np.array_equal(s.kv.lens, g.ranks[0].kvs[s.kv.kid].lens)
