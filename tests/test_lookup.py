import numpy as np
import pytest

from aded_ray.draft.lookup import PromptLookupDrafter, lookup_chain


@pytest.mark.parametrize("seq, expected", [
    ([5, 6, 7, 8, 5, 6], [7, 8, 5, 6]),            # 2-gram (5, 6) matches at 0
    ([1, 2, 3, 9, 2, 3, 4, 1, 2, 3], [9, 2, 3, 4, 1, 2, 3]),   # the 3-gram wins over later 2-grams
    ([1, 2, 3, 4], []),                            # nothing repeats
    ([7], []),
    ([4, 4], [4]),                                 # 1-gram
])
def test_lookup_chain(seq, expected):
    assert lookup_chain(np.array(seq), num_tokens=10).tolist() == expected


def test_num_tokens_and_tree_is_a_chain():
    t = PromptLookupDrafter(num_tokens=2).draft([1, 2, 3, 4, 1, 2])
    assert t.tokens.tolist() == [3, 4] and t.parents.tolist() == [-1, 0]
    with pytest.raises(ValueError):
        PromptLookupDrafter(min_ngram=0)
