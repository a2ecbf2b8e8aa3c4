"""MCTS drafter: golden cases, search invariants, determinism, budgets."""
import numpy as np
import pytest

from aded_ray.draft.build import matrix_from_token_docs
from aded_ray.draft.matrix import TrigramMatrix
from aded_ray.draft.mcts import MCTSDrafter, cut_to_budget, mcts_tree


def chain_matrix():
    # (1, 2) -> 3 and (2, 3) -> 4 only
    return matrix_from_token_docs([[1, 2, 3], [2, 3, 4]], 10)


def random_matrix(seed=0, V=60, n=4000):
    rng = np.random.default_rng(seed)
    # a Zipf-ish token stream: many contexts with several successors
    toks = np.minimum(rng.zipf(1.3, n), V) - 1
    return matrix_from_token_docs([toks.tolist()], V)


def test_golden_chain():
    d = MCTSDrafter(chain_matrix())
    tree = d.draft([1, 2])
    assert tree.token_paths() == [[3, 4]]       # 3 from the search, 4 from the greedy extension
    assert tree.parents.tolist() == [-1, 0]


def test_golden_branching():
    # (1,2) -> 3 (2/3), 4 (1/3); (2,3) -> 5; (2,4) -> 6
    m = matrix_from_token_docs([[1, 2, 3, 5], [1, 2, 3, 5], [1, 2, 4, 6]], 10)
    tree = MCTSDrafter(m).draft([1, 2])
    assert sorted(tree.token_paths()) == [[3, 5], [4, 6]]


def test_empty_draft_on_unknown_context():
    d = MCTSDrafter(chain_matrix())
    assert len(d.draft([7, 8])) == 0
    assert len(d.draft([8])) == 0
    assert len(MCTSDrafter(TrigramMatrix.empty(10)).draft([1, 2])) == 0


@pytest.mark.parametrize("reward", [False, True])
@pytest.mark.parametrize("shuffle", [False, True])
def test_search_invariants(reward, shuffle):
    m = random_matrix()
    iterations, depth = 150, 3
    tok, ctxa, parent, fchild, nchild, visits, W, P, dep = mcts_tree(
        m.base, m.ov, m.prm, 0, 1, iterations, depth, 32.0, 8.0, reward, shuffle, 7)
    n = len(tok)
    assert n > 20
    assert visits[0] == iterations
    ended = visits.copy()
    for v in range(1, n):
        ended[parent[v]] -= visits[v]
        assert dep[v] == dep[parent[v]] + 1 and ctxa[v] == tok[parent[v]]
    assert (ended >= 0).all() and ended.sum() == iterations   # visits = iterations ended here + children's
    assert dep.max() <= depth
    for v in range(n):                                          # children contiguous, priors = weights
        for c in range(nchild[v]):
            ch = fchild[v] + c
            assert parent[ch] == v
            assert P[ch] == pytest.approx(m.weight(ctxa[v], tok[v], tok[ch]))
    assert (W >= visits).all()                                  # every reward is >= 1


def test_budgets_and_depth_bounds():
    m = random_matrix(1)
    for seed in range(20):
        ctx = [int(x) for x in np.random.default_rng(seed).integers(0, 10, 2)]
        t = MCTSDrafter(m, seed=seed).draft(ctx)
        assert len(t) <= 64 and (len(t) == 0 or t.depths().max() <= 4)
        small = MCTSDrafter(m, max_nodes=8, choices=16).draft(ctx, seed=seed)
        assert len(small) <= 8
        assert sum(len(set(p)) for p in small.token_paths()) <= 16 or len(small) == 8
        deep = MCTSDrafter(m, depth=5).draft(ctx, seed=seed)
        assert len(deep) == 0 or deep.depths().max() <= 6


def test_determinism_under_seed():
    m = random_matrix(2)
    a = MCTSDrafter(m).draft([0, 1], seed=123)
    b = MCTSDrafter(m).draft([0, 1], seed=123)
    assert a.tokens.tolist() == b.tokens.tolist() and a.parents.tolist() == b.parents.tolist()
    trees = {tuple(MCTSDrafter(m).draft([0, 1], seed=s).tokens.tolist()) for s in range(10)}
    assert len(trees) > 1       # the seed does matter (shuffled creation order, rollouts)


def test_cut_to_budget():
    paths = [[1, 2, 3, 4], [5], [6, 7], [8, 9, 9]]      # distinct counts 4, 1, 2, 2 -> 9
    assert cut_to_budget(paths, 9) == paths
    assert cut_to_budget(paths, 5) == [[5], [6, 7], [8, 9, 9]]
    assert cut_to_budget(paths, 4) == [[5], [6, 7]]     # drop the 4-count, then the later 2-count
    assert cut_to_budget(paths, 0) == []


def test_bad_parameters_raise():
    with pytest.raises(ValueError, match="reward"):
        MCTSDrafter(chain_matrix(), reward="best")
    with pytest.raises(ValueError, match="depth"):
        MCTSDrafter(chain_matrix(), depth=0)
