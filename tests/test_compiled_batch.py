"""Compiled batched passes (``BatchKV(compile_tokens=...)``, ``verify.compile`` with ``max_batch`` > 1): a ragged pass
compiled per token bucket gives the eager pass's rows, step after step (a tiny random Llama: seconds to
compile), and an engine running them decodes under load exactly what each request decodes alone, greedy
outputs equal to ``model.generate`` (the real SmolLM2)."""

import pytest
import torch

from aded_ray.draft.tree import DraftTree
from aded_ray.verify.batch import BatchKV


def _tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=512)).eval()


@pytest.mark.parametrize("attention", ["sdpa", "invariant"])
def test_compiled_ragged_passes_give_the_eager_rows_step_after_step(attention, monkeypatch):
    from aded_ray.verify import invariant_attention as ia

    calls = []
    for name in ("attend_rows", "attend_rows_serial"):       # (one thread: the serial one)
        kernel = getattr(ia, name)
        monkeypatch.setattr(ia, name, lambda *a, k=kernel: calls.append(1) or k(*a))
    torch._dynamo.reset()
    model = _tiny()
    eager, comp = BatchKV(model, attention=attention), BatchKV(model, compile_tokens=(4, 8), attention=attention)
    prompts = [list(range(10, 15)), list(range(40, 57)), list(range(90, 99))]
    for kv in (eager, comp):
        for p in prompts:
            kv.prefill(kv.add_slot(), p)
    steps = [   # (roots, trees, keeps): 3 + 1 + 4 = 8 tokens (bucket 8), 3 (bucket 4), 13 (eager), 3 (bucket 4)
        ([1, 2, 3], [DraftTree([5, 6], [-1, 0]), DraftTree(), DraftTree([7, 8, 9], [-1, -1, 0])],
         [[0, 1, 2], [0], [0, 1, 3]]),
        ([4, 5, 6], [DraftTree(), DraftTree(), DraftTree()], [[0], [0], [0]]),
        ([7, 8, 9], [DraftTree([1, 2, 3, 4], [-1, 0, 1, 2]), DraftTree([5, 6, 7], [-1, -1, -1]), DraftTree([8], [-1])],
         [[0, 1, 2], [0, 3], [0]]),
        ([10, 11, 12], [DraftTree(), DraftTree(), DraftTree()], [[0], [0], [0]]),
    ]
    for roots, trees, keeps in steps:
        a, b = eager.forward_trees(roots, trees), comp.forward_trees(roots, trees)
        assert a.shape == b.shape == (sum(len(t) + 1 for t in trees), 256)
        assert (a - b).abs().max().item() < 1e-5
        assert torch.equal(a.argmax(-1), b.argmax(-1))
        for kv in (eager, comp):
            kv.commit(keeps)
    assert comp.compiled_passes == 3 and eager.compiled_passes == 0     # the 13-token pass ran eager
    # the invariant kernel in every layer of every pass, compiled ones included (2 layers, 3 prefills and 4
    # passes for each BatchKV)
    assert len(calls) == (2 * 2 * (3 + 4) if attention == "invariant" else 0)
    assert eager.lens.tolist() == comp.lens.tolist() == [5 + 3 + 1 + 3 + 1, 17 + 1 + 1 + 2 + 1, 9 + 3 + 1 + 1 + 1]
    for kv in (eager, comp):          # request 0 leaves: the last slot moves into its place
        kv.move_slot(2, 0)
        kv.drop_last()
    a, b = eager.forward_trees([20, 21], [DraftTree([3], [-1]), DraftTree()]), comp.forward_trees(
        [20, 21], [DraftTree([3], [-1]), DraftTree()])
    assert (a - b).abs().max().item() < 1e-5 and comp.compiled_passes == 4
    seq = prompts[2] + [3, 7, 9, 6, 9, 12, 20]         # request 2's committed tokens, then its new root
    ref = model(input_ids=torch.tensor([seq])).logits[0, -1]
    assert (b[0] - ref).abs().max().item() < 1e-4


def test_compile_tokens_need_the_ragged_layout():
    with pytest.raises(ValueError, match=r"compile_tokens \(8,\) need the ragged layout"):
        BatchKV(_tiny(), widths=(4,), compile_tokens=(8,))


@pytest.fixture(scope="module")
def compiled_engine(corpus_matrix, tmp_path_factory):
    from aded_ray.config import EngineConfig, VerifyConfig
    from aded_ray.engine import Engine

    torch._dynamo.reset()
    store = tmp_path_factory.mktemp("compiled") / "store.tri"
    corpus_matrix.save(store)
    # budget 2: trees of 2 nodes, so that the passes of up to 8 requests (<= 24 tokens) fit the buckets; a
    # given cost curve: no start-up measurement
    e = Engine(EngineConfig(store=str(store), max_batch=8, verify=VerifyConfig(
        compile=True, compile_tokens=[8, 32], budget=2, cost_curve={1: 40.0, 8: 50.0, 32: 80.0})))
    yield e
    e.shutdown()


@pytest.mark.model
@pytest.mark.slow
def test_engine_with_compiled_batched_passes_is_lossless_under_load(compiled_engine, sibling):
    e = compiled_engine
    assert e.speculate and e.widths == [] and e.scheduler.kv.compile_tokens == (8, 32)
    before = e.scheduler.kv.compiled_passes
    sibling("test_batch")._lossless_under_load(e)   # every request under load = the same request alone (greedy, sampled, ...)
    assert e.scheduler.kv.compiled_passes > before + 20


@pytest.mark.model
@pytest.mark.slow
def test_engine_with_compiled_batched_passes_equals_generate(compiled_engine, greedy_references, sibling):
    sibling("test_static").concurrent_greedy_equals_generate(compiled_engine, greedy_references)
