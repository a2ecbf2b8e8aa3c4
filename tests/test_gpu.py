"""On a GPU (skipped without CUDA; run by `make gpu-check`): the default configuration speculates there and
is lossless, greedy token-identical to plain decoding in the same mode and seeded sampling identical too."""
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.model,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

PROMPTS = [
    "Write a Python function that checks whether a number is prime.",
    "What is the capital of France? Answer in one sentence.",
    "List three fruits.",
    "Explain recursion to a child.",
    "def fibonacci(n):",
    "Summarise the plot of Hamlet in four sentences.",
]


@pytest.fixture(scope="module")
def engine():
    from aded_ray.engine import Engine

    return Engine()       # every default: device auto (cuda), mode auto, widths auto, budget auto


def test_default_configuration_speculates_on_cuda(engine):
    assert engine.device == "cuda" and engine.speculate, engine.speculation_off_reason
    assert engine.exactness.exact and engine.exactness.rows_compared > 0


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_identical_to_plain(engine, prompt):
    spec = list(engine.generate(prompt, chat=True, max_new_tokens=64))
    plain = list(engine.generate(prompt, chat=True, max_new_tokens=64, speculate=False))
    assert [t for c in spec for t in c.token_ids] == [t for c in plain for t in c.token_ids]
    assert spec[-1].stats.drafts > 0


def test_seeded_sampling_identical_to_plain(engine):
    kw = dict(chat=True, max_new_tokens=48, temperature=0.8, top_p=0.95, seed=11)
    spec = [t for c in engine.generate(PROMPTS[3], **kw) for t in c.token_ids]
    plain = [t for c in engine.generate(PROMPTS[3], speculate=False, **kw) for t in c.token_ids]
    assert spec == plain


def test_logits_stay_on_the_device(engine):
    from aded_ray.draft.tree import DraftTree

    v = engine.make_verifier()
    v.prefill([1, 2, 3, 4])
    out = v.forward_tree(5, DraftTree([6, 7], [-1, 0]))
    assert out.device.type == "cuda" and out.shape[0] == 3
