"""Shared fixtures. The real SmolLM2 model is converted once into the cache (~20 s) and reused."""
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tokenizer():
    from aded_ray.verify.loading import load_tokenizer

    return load_tokenizer()
