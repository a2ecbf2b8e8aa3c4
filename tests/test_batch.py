"""Batched verification with the real SmolLM2 (fp32): rows of a ragged or padded batch equal the same trees
verified alone, KV compaction per request, and lossless decoding under load (concurrent requests of different
lengths, greedy and seeded sampling, a stop string, a cancellation) against each request decoded alone."""
import threading
import time

import numpy as np
import pytest
import torch

from aded_ray.draft.tree import DraftTree
from aded_ray.verify.batch import BatchKV
from aded_ray.verify.target import TreeVerifier

pytestmark = pytest.mark.model


@pytest.mark.parametrize("layout,split_keys", [("ragged", 96), ("ragged", 0), ("padded", 96)])
def test_batched_rows_equal_rows_verified_alone(model, layout, split_keys, monkeypatch):
    import aded_ray.verify.batch as vb

    monkeypatch.setattr(vb, "SPLIT_KEYS", split_keys)      # 0: every request attends in its own group
    prompts = [list(range(100, 105)), list(range(300, 303)), list(range(500, 530))]
    trees = [DraftTree([11, 12, 13], [-1, 0, 0]), DraftTree(), DraftTree([21, 22], [-1, 0])]
    roots = [7, 8, 9]
    kv = BatchKV(model, prefill_chunk=16, layout=layout)       # the 30-token prompt takes two chunks
    alone = []
    for p, root, t in zip(prompts, roots, trees):
        s = kv.add_slot()
        pos = 0
        while kv.prefill(s, p, pos) is None:
            pos += kv.prefill_chunk
        v = TreeVerifier(model)
        v.prefill(p)
        alone.append(v.forward_tree(root, t))
    batched = kv.forward_trees(roots, trees)
    assert batched.shape[0] == 4 + 1 + 3                    # packed: real rows only, request after request
    for ref, a in zip(alone, (0, 4, 5)):
        assert (batched[a: a + ref.shape[0]] - ref).abs().max().item() < 1e-4
    # keep request 0's root, node 0 and node 2 (skipping its sibling node 1), request 2's root + node 0
    kv.commit([[0, 1, 3], [0], [0, 1]])
    assert kv.lens.tolist() == [8, 4, 32]
    nxt = kv.forward_trees([40, 41, 42], [DraftTree(), DraftTree(), DraftTree()])
    for r, seq in enumerate([prompts[0] + [7, 11, 13, 40], prompts[1] + [8, 41], prompts[2] + [9, 21, 42]]):
        ref = model(input_ids=torch.tensor([seq])).logits[0, -1]
        assert (nxt[r] - ref).abs().max().item() < 1e-4, r
    # a leaving request: the last slot moves into its place
    kv.commit([[0], [0], [0]])
    kv.move_slot(2, 0)
    kv.drop_last()
    after = kv.forward_trees([50, 51], [DraftTree(), DraftTree()])
    ref = model(input_ids=torch.tensor([prompts[2] + [9, 21, 42, 50]])).logits[0, -1]
    assert (after[0] - ref).abs().max().item() < 1e-4


@pytest.fixture(scope="module")
def engine(corpus_matrix, tmp_path_factory):
    from aded_ray.config import EngineConfig, VerifyConfig
    from aded_ray.engine import Engine

    store = tmp_path_factory.mktemp("batch") / "store.tri"
    corpus_matrix.save(store)
    return Engine(EngineConfig(store=str(store), verify=VerifyConfig(mode="fp32", budget=16), max_batch=8))


REQUESTS = [
    dict(prompt="List three fruits.", max_new_tokens=24),
    dict(prompt="Explain recursion to a child in two sentences.", max_new_tokens=48),
    dict(prompt="def fibonacci(n):", max_new_tokens=40, chat=False),
    dict(prompt="What is the capital of France? Answer in one sentence.", max_new_tokens=16),
    dict(prompt="Write a haiku about the sea.", max_new_tokens=32, temperature=0.8, seed=7),
    dict(prompt="Name five colours, one per line.", max_new_tokens=40, stop=["\n4"]),
    dict(prompt="Describe a cat.", max_new_tokens=56, temperature=1.0, top_p=0.9, seed=123),
    dict(prompt="Write a Python function that checks whether a number is prime.", max_new_tokens=64),
    dict(prompt="Tell me a long story about a dragon.", max_new_tokens=200),      # cancelled mid-way
]


def _run(engine, req, cancel_after=None):
    kw = dict(req)
    prompt = kw.pop("prompt")
    kw.setdefault("chat", True)
    out, text = [], ""
    gen = engine.generate(prompt, **kw)
    for i, c in enumerate(gen):
        out += c.token_ids
        text += c.text
        if cancel_after is not None and i + 1 >= cancel_after:
            gen.close()
            break
    return out, text


@pytest.mark.parametrize("policies", ["engine's budget", "both policies, switching often"])
def test_lossless_under_load(engine, policies):
    saved, seen = engine.budget, []
    if policies != "engine's budget":
        # the budget's policy check (the model's allotment against one node per request) in short blocks,
        # so that steps of both policies run under this load
        from aded_ray.verify.budget import AdaptiveBudget
        b = AdaptiveBudget(engine.cost, max_nodes=engine.max_nodes, policy_block=2, policy_every=3,
                           policy_probe=2, min_evidence=2)
        choose = b.policy
        b.policy = lambda batch: seen.append(choose(batch)) or seen[-1]
        engine.budget = b
    try:
        _lossless_under_load(engine)
    finally:
        engine.budget = saved
    if policies != "engine's budget":
        assert seen.count("one") >= 3 and seen.count("model") >= 3, seen


def _lossless_under_load(engine):
    alone = [_run(engine, r) for r in REQUESTS[:-1]]
    before = engine.scheduler.counters.aborted
    results, passes = {}, []
    orig = engine.scheduler.kv.forward_trees

    def spy(roots, trees, width=None, **kw):
        passes.append(len(trees))
        return orig(roots, trees, width, **kw)

    engine.scheduler.kv.forward_trees = spy

    def go(i):
        results[i] = _run(engine, REQUESTS[i], cancel_after=3 if i == len(REQUESTS) - 1 else None)

    try:
        threads = [threading.Thread(target=go, args=(i,)) for i in range(len(REQUESTS))]
        [t.start() for t in threads]
        [t.join(600) for t in threads]
    finally:
        engine.scheduler.kv.forward_trees = orig
    for i, ref in enumerate(alone):
        if REQUESTS[i].get("stop"):          # text is cut at the stop string; token chunks follow the steps
            assert results[i][1] == ref[1]
        else:
            assert results[i] == ref, REQUESTS[i]["prompt"]
    assert "\n4" not in alone[5][1] and alone[5][1]
    assert len(results[len(REQUESTS) - 1][0]) < 200                   # the cancelled one stopped early
    assert engine.scheduler.counters.aborted > before
    assert max(passes) >= 6                                            # requests really shared passes
    assert engine.scheduler.counters.fused_prefills > 0                # and prompts rode in their passes
    deadline = time.monotonic() + 30      # the last slots are freed at the scheduler's next iteration
    while engine.scheduler.kv.used and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.scheduler.kv.used == 0


def test_a_loaded_prefix_is_bitwise_the_pass_it_was_saved_from(model):
    # the preamble cache's guarantee: a prompt's rest, prefilled on a copied prefix, sees exactly the KV the
    # prefix's own pass wrote, so a hit and a miss give the same logits, bit for bit
    kv = BatchKV(model)
    ids, n = list(range(200, 240)), 12
    a, b = kv.add_slot(), kv.add_slot()
    assert kv.prefill(a, ids, 0, n) is None
    saved = kv.save_prefix(a, n)
    miss = kv.prefill(a, ids, n)
    kv.load_prefix(b, saved)
    assert kv.lens.tolist() == [40, 12]
    hit = kv.prefill(b, ids, n)
    assert torch.equal(miss, hit)
    for layer in kv.cache.layers:           # and the whole prompt's KV, the rest's entries included
        assert torch.equal(layer.kbuf[a, :, :40], layer.kbuf[b, :, :40])
        assert torch.equal(layer.vbuf[a, :, :40], layer.vbuf[b, :, :40])


@pytest.mark.parametrize("packed", [None, "oneDNN", "MKL"])
def test_a_prompt_chunk_riding_in_a_decoding_pass_is_its_own_prefill_bit_for_bit(model, packed):
    # chunked prefill inside the running requests' pass (the weights read once for both): the newcomer's KV
    # and first logits are those of a pass of its own, and the running requests' rows those of their pass
    # without it: bit for bit with pre-packed linears (oneDNN's and MKL's packed kernels compute a row the
    # same whatever the other rows); eager fp32 rounds by the shape of the whole pass, as any batched pass does
    from aded_ray.verify.batch import PrefillChunk
    from aded_ray.verify.modes import MklPackedLinear, PackedLinear, mkl_available, pack_linears, row_invariant

    if packed:
        import copy
        if packed == "MKL" and not mkl_available():
            pytest.skip("this torch build has no MKL")
        model = pack_linears(copy.deepcopy(model), MklPackedLinear if packed == "MKL" else PackedLinear)
    # bit for bit where the packed kernels are row-invariant, which both are, padded as this machine's probe
    # measured (MKL's calls of fewer than 12 rows on the AMD EPYC; oneDNN's lone rows on the Xeon)
    exact = packed is not None and row_invariant(MklPackedLinear if packed == "MKL" else PackedLinear)
    tol = 1e-4 if packed is None else 1e-3     # MKL where it is not row-invariant: each linear rounds its own way

    def same(a, b):
        return torch.equal(a, b) if exact else (a - b).abs().max().item() < tol
    prompts = [list(range(100, 140)), list(range(300, 352))]
    newcomer = list(range(700, 790))
    trees = [DraftTree([11, 12, 13], [-1, 0, 0]), DraftTree()]
    kv = BatchKV(model, prefill_chunk=64)
    for p in prompts:
        s = kv.add_slot()
        while kv.prefill(s, p, int(kv.lens[s])) is None:
            pass
    s = kv.add_slot()
    assert kv.prefill(s, newcomer, 0, 30) is None            # its first 30 tokens alone (as a preamble is)
    ref = BatchKV(model, prefill_chunk=64)
    for p in prompts + [newcomer]:
        r = ref.add_slot()
        while ref.prefill(r, p, int(ref.lens[r])) is None:
            pass
    alone = ref.forward_trees([7, 8], trees)
    first = PrefillChunk(newcomer, 30, 40)
    rows = kv.forward_trees([7, 8], trees, prefill=first)    # 40 more tokens: not complete yet
    assert first.ran == 40 and first.logits is None and kv.lens.tolist() == [40, 52, 70]
    assert same(rows, alone)
    kv.commit([[0], [0]])
    ref.commit([[0], [0]])
    last = PrefillChunk(newcomer, 70, 64)
    rows = kv.forward_trees([9, 10], [DraftTree(), DraftTree()], prefill=last)
    assert last.ran == 20 and kv.lens.tolist() == [41, 53, 90]
    assert same(rows, ref.forward_trees([9, 10], [DraftTree(), DraftTree()]))
    own = BatchKV(model, prefill_chunk=64)
    own.add_slot()
    assert own.prefill(0, newcomer, 0, 30) is None and own.prefill(0, newcomer, 30, 40) is None
    assert same(last.logits, own.prefill(0, newcomer, 70))
    for a, b in zip(kv.cache.layers, own.cache.layers):
        assert same(a.kbuf[2, :, :90], b.kbuf[0, :, :90]) and same(a.vbuf[2, :, :90], b.vbuf[0, :, :90])
    with pytest.raises(ValueError, match="starts at 80"):
        kv.forward_trees([1, 2], [DraftTree(), DraftTree()], prefill=PrefillChunk(newcomer, 80, 8))
