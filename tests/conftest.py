"""Shared fixtures. The real SmolLM2 model is converted once into the cache (~20 s) and reused."""
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def sibling():
    """``f(name)``: the test module ``name`` of this directory, loaded (pytest imports tests with importlib, so
    they are not on the path); for tests that run another file's scenario on other parts."""
    import importlib.util
    from pathlib import Path

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"_sibling_{name}", Path(__file__).with_name(f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="session")
def serve_with(tmp_path_factory, corpus_matrix):
    """``with serve_with(name, **args) as (svc, store):`` a started LocalService (deployments/aded.yaml with
    ``args``) serving a copy of the corpus matrix as its store; stopped on leaving."""
    import contextlib

    from aded_ray.serve.local import LocalService

    @contextlib.contextmanager
    def start(name: str, **args):
        d = tmp_path_factory.mktemp(name)
        store = d / "store.tri"
        corpus_matrix.save(store)
        svc = LocalService(d, args={"store": str(store), **args})
        svc.start()
        try:
            yield svc, store
        finally:
            svc.stop()

    return start


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


@pytest.fixture(scope="session")
def greedy_references(model, tokenizer):
    """``f(prompts, new_tokens)``: (chat prompt ids, ``model.generate``'s greedy continuation) per prompt, the
    oracle of the lossless tests."""
    import torch

    from aded_ray.bench.traces import chat_ids

    def references(prompts, new_tokens: int) -> list[tuple[list[int], list[int]]]:
        refs = []
        for p in prompts:
            ids = chat_ids(tokenizer, [{"role": "user", "content": p}])
            out = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
            refs.append((ids, out[0, len(ids):].tolist()))
        return refs

    return references
