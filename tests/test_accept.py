"""Acceptance rules on literal logits (no model): greedy walk, exact sampling, parameter checks."""
import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from aded_ray.draft.tree import DraftTree
from aded_ray.verify.accept import SamplingParams, accept, greedy_accept, reduce_rows, target_probs, uniforms


def logits_for(rows, V=10):
    """Row i strongly prefers token rows[i] (+100), vLLM-test style."""
    x = torch.zeros(len(rows), V)
    for i, t in enumerate(rows):
        x[i, t] = 100.0
    return x


def test_greedy_worked_example():
    tree = DraftTree([5, 6, 7], [-1, -1, 1])          # root -> 5 ; root -> 6 -> 7
    path, bonus = greedy_accept(tree, np.array([6, 9, 7, 2]))
    assert (path, bonus) == ([1, 2], 2)


@pytest.mark.parametrize("rows, path, bonus", [
    ([3, 0, 0, 0], [], 3),             # the root's choice is not drafted
    ([5, 8, 0, 0], [0], 8),            # first branch, then a miss
    ([6, 0, 7, 4], [1, 2], 4),         # the deep branch entirely, plus the bonus
])
def test_greedy_table(rows, path, bonus):
    tree = DraftTree([5, 6, 7], [-1, -1, 1])
    assert accept(tree, logits_for(rows), SamplingParams()) == (path, bonus)


def test_empty_tree_is_plain_decoding():
    assert accept(DraftTree(), logits_for([4]), SamplingParams()) == ([], 4)


def test_sampling_is_exact_at_root_and_at_a_drafted_node():
    torch.manual_seed(0)
    V = 6
    logits = torch.randn(3, V) * 1.5               # rows: root, node 0 (token 2), node 1 (token 3, child of 0)
    tree = DraftTree([2, 3], [-1, 0])
    first, second = np.zeros(V), np.zeros(V)
    n = 20000
    for seed in range(n):                          # one request per seed: its uniforms are independent
        p = SamplingParams(temperature=0.8, seed=seed)
        path, bonus = accept(tree, logits, p)
        emitted = [int(tree.tokens[i]) for i in path] + [bonus]
        first[emitted[0]] += 1
        if emitted[0] == 2:                          # after the drafted token 2 the target's row 1 applies
            second[emitted[1]] += 1
    p = SamplingParams(temperature=0.8)
    p_root = target_probs(logits[0], p).numpy()
    p_node = target_probs(logits[1], p).numpy()
    assert chisquare(first, p_root * n).pvalue > 1e-3
    assert chisquare(second, p_node * second.sum()).pvalue > 1e-3
    # the biased best-of-rows rule would over-emit the drafted token; exactness keeps it at p_root[2]
    assert abs(first[2] / n - p_root[2]) < 0.02


def test_seeded_sample_depends_on_the_output_position_not_on_the_tree():
    """The token at output position j is decided by u(seed, j): with or without a tree, the same tokens."""
    torch.manual_seed(1)
    logits = torch.randn(3, 50)
    p = SamplingParams(temperature=1.0, seed=42)
    tree = DraftTree([7, 8], [-1, 0])
    alone = [int(reduce_rows(logits[r], p, positions=[5 + r]).tokens[0]) for r in range(3)]
    batched = reduce_rows(logits, p, positions=[5, 6, 7]).tokens.tolist()
    assert alone == batched
    # walking the tree emits, position by position, exactly the row samples of the visited rows
    tree = DraftTree([alone[0], 9], [-1, 0])
    path, bonus = accept(tree, logits, p, position=5)
    assert path[:1] == [0] and (bonus == alone[1] if len(path) == 1 else True)


def test_uniforms_are_counter_based_and_uniform():
    u = uniforms(7, np.arange(200_000))
    assert ((0 <= u) & (u < 1)).all()
    assert np.array_equal(uniforms(7, [3, 5]), u[[3, 5]])
    assert not np.array_equal(uniforms(8, [3, 5]), u[[3, 5]])
    hist = np.histogram(u, bins=20, range=(0, 1))[0]
    assert chisquare(hist).pvalue > 1e-3


def test_logits_rows_reduce_on_their_device_in_one_small_copy():
    logits = torch.randn(5, 1000)
    rows = reduce_rows(logits, SamplingParams(), top_k=8)
    assert rows.tokens.tolist() == logits.argmax(-1).tolist()
    assert rows.top_ids.shape == (5, 8) and (rows.top_ids[:, 0] == rows.tokens).all()
    assert np.allclose(rows.top_p.sum(1), torch.softmax(logits, -1).topk(8).values.sum(1).numpy(), atol=1e-6)


def test_top_k_and_top_p_filtering():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    pk = target_probs(logits, SamplingParams(temperature=1.0, top_k=2))
    assert (pk[2:] == 0).all() and pk.sum().item() == pytest.approx(1.0)
    pp = target_probs(logits, SamplingParams(temperature=1.0, top_p=0.5))
    assert pp[0].item() == pytest.approx(1.0)       # the top token alone already reaches 0.5 (0.64)


@pytest.mark.parametrize("kw", [{"temperature": -1}, {"temperature": float("nan")}, {"temperature": 5e-324},
                                {"temperature": float("inf")}, {"top_p": 0}, {"top_p": float("nan")},
                                {"top_p": 1.5}, {"top_k": -2}, {"seed": -1}, {"seed": 2**64}])
def test_bad_sampling_params(kw):
    with pytest.raises(ValueError):
        SamplingParams(**kw)


def test_top_k_only_for_the_requests_that_recycle_it():
    from aded_ray.verify.accept import reduce_batch, reduce_rows

    g = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 40, generator=g)                  # requests of 2, 1 and 3 rows
    greedy = [SamplingParams()] * 3
    every = reduce_batch(logits, greedy, [np.arange(2), np.arange(1), np.arange(3)], [2, 1, 3], top_k=4)
    some = reduce_batch(logits, greedy, [np.arange(2), np.arange(1), np.arange(3)], [2, 1, 3], top_k=4,
                        top_k_for=[False, True, True])
    assert some[0].top_ids is None and some[0].top_p is None
    for a, b, rows in zip(every, some, [logits[:2], logits[2:3], logits[3:]]):
        assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.tokens, rows.argmax(-1).numpy())
    for r, rows in ((1, logits[2:3]), (2, logits[3:])):
        ref = reduce_rows(rows, SamplingParams(), positions=np.arange(len(rows)), top_k=4)
        assert np.array_equal(some[r].top_ids, ref.top_ids) and np.array_equal(every[r].top_ids, ref.top_ids)
        assert np.allclose(some[r].top_p, ref.top_p) and np.allclose(every[r].top_p, ref.top_p)
