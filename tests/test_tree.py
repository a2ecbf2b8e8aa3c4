"""Golden tests for the canonical draft tree and its derived views."""
import numpy as np
import pytest

from aded_ray.draft.tree import DraftTree, ancestor_mask, depths, from_paths, paths


def test_chain():
    parents = np.array([-1, 0, 1, 2])
    assert depths(parents).tolist() == [1, 2, 3, 4]
    assert ancestor_mask(parents).astype(int).tolist() == [
        [1, 0, 0, 0],
        [1, 1, 0, 0],
        [1, 1, 1, 0],
        [1, 1, 1, 1],
    ]
    assert paths(parents) == [[0, 1, 2, 3]]


def test_branching_tree():
    #  root ├── 10 (0) ├── 12 (2) ── 13 (4)
    #       │          └── 14 (3)
    #       └── 11 (1)
    t = DraftTree([10, 11, 12, 14, 13], [-1, -1, 0, 0, 2])
    assert t.depths().tolist() == [1, 1, 2, 2, 3]
    assert ancestor_mask(t.parents, include_root=True).astype(int).tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0],
        [1, 1, 0, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],
        [1, 1, 0, 1, 0, 1],
    ]
    assert t.paths() == [[1], [0, 3], [0, 2, 4]]
    assert t.token_paths() == [[11], [10, 14], [10, 12, 13]]


def test_mask_properties_random_trees():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(1, 40))
        parents = [-1]
        for i in range(1, n):
            parents.append(int(rng.integers(-1, i)))
        # re-order breadth-first via from_paths on the node paths
        t = from_paths([[i + 100 for i in p] for p in paths(np.array(parents))])
        m = ancestor_mask(t.parents)
        assert (m.sum(1) == t.depths()).all()          # row sum = depth (self + ancestors, root excluded)
        assert not np.triu(m, 1).any()                 # lower-triangular in breadth-first order
        for i, p in enumerate(t.parents):
            if p >= 0:
                assert (m[i] >= m[p]).all() and m[i].sum() == m[p].sum() + 1


def test_from_paths_dedups_orders_and_truncates():
    t = from_paths([[10, 12, 13], [11], [10, 14], [10, 12]])
    assert t.tokens.tolist() == [10, 11, 12, 14, 13]
    assert t.parents.tolist() == [-1, -1, 0, 0, 2]
    cut = from_paths([[10, 12, 13], [11], [10, 14]], max_nodes=3)
    assert cut.tokens.tolist() == [10, 11, 12] and cut.parents.tolist() == [-1, -1, 0]
    assert len(from_paths([])) == 0


@pytest.mark.parametrize("parents", [[0], [-1, 1], [-1, -2], [-1, 0, -1]])
def test_invalid_trees_raise(parents):
    with pytest.raises(ValueError):
        DraftTree(np.zeros(len(parents), np.int32), np.array(parents))
