"""Shared fixtures. The real SmolLM2 model is converted once into the cache (~20 s) and reused."""
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tokenizer():
    from aded_ray.verify.loading import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def model():
    """The real SmolLM2-135M-Instruct, fp32, eager nn.Linear: the reference for exactness tests."""
    import torch

    from aded_ray.verify.loading import load_model

    torch.manual_seed(0)
    return load_model(dtype="float32")


@pytest.fixture(scope="session")
def corpus_matrix(tokenizer):
    """A real store: the first 2000 ShareGPT turns through the model's tokenizer."""
    from aded_ray.data import iter_corpus
    from aded_ray.draft.build import TrigramCounter

    c = TrigramCounter(len(tokenizer))
    docs = list(iter_corpus("sharegpt", limit=2000))
    for ids in tokenizer(docs)["input_ids"]:
        c.add(ids)
    return c.matrix()
