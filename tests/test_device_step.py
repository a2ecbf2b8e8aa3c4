"""The decode step keeps the logits on the model's device: a verifier whose logits refuse to be copied to the
host (above a few thousand numbers) or converted with ``.numpy()`` runs greedy and sampled requests with
the recycling drafter, exactly as the plain tensors do."""
import numpy as np
import pytest
import torch

from aded_ray.decode import FixedBudget, generate_ids
from aded_ray.draft.best import BestDrafter
from aded_ray.verify.accept import SamplingParams
from aded_ray.verify.target import TreeVerifier

pytestmark = pytest.mark.model

HOST_LIMIT = 4096   # numbers: a step's own copy is rows x 17; full logits are rows x 49152


class DeviceOnly(torch.Tensor):
    """Stands for a tensor on an accelerator: ``.numpy()``/``__array__`` fail, copies to the host are
    allowed only for small results (and come back as plain tensors)."""

    copies = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in ("numpy", "__array__", "tolist"):
            raise RuntimeError(f"can't convert a device tensor with {name}()")
        to_host = name == "cpu" or (name == "to" and any(
            (isinstance(a, (str, torch.device)) and torch.device(a).type == "cpu") for a in args[1:]))
        if to_host:
            n = args[0].numel()
            if n > HOST_LIMIT:
                raise RuntimeError(f"copied {n} numbers to the host")
            cls.copies.append(n)
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs).as_subclass(torch.Tensor)
        return super().__torch_function__(func, types, args, kwargs)


class DeviceVerifier(TreeVerifier):
    def prefill(self, ids):
        return super().prefill(ids).as_subclass(DeviceOnly)

    def forward_tree(self, root, tree):
        return super().forward_tree(root, tree).as_subclass(DeviceOnly)


def test_refusing_tensor_really_refuses():
    x = torch.zeros(2, 10_000).as_subclass(DeviceOnly)
    with pytest.raises(RuntimeError):
        x.numpy()
    with pytest.raises(RuntimeError):
        x.cpu()
    assert type(x.argmax(-1).cpu()) is torch.Tensor


@pytest.mark.parametrize("sampling", [SamplingParams(), SamplingParams(temperature=0.8, top_p=0.9, seed=3)])
def test_step_reduces_logits_on_the_device(model, tokenizer, corpus_matrix, sampling):
    from aded_ray.bench.traces import chat_ids

    ids = chat_ids(tokenizer, [{"role": "user", "content": "List three fruits and their colours."}])
    outs = []
    for verifier in (TreeVerifier(model), DeviceVerifier(model)):
        corpus_matrix.reset_deltas()
        drafter = BestDrafter(corpus_matrix)
        DeviceOnly.copies.clear()
        outs.append([t for new in generate_ids(verifier, drafter, ids, max_new_tokens=24, sampling=sampling,
                                               eos_ids=[tokenizer.eos_token_id], budget=FixedBudget(16))
                     for t in new])
    assert outs[0] == outs[1]
    steps = len(DeviceOnly.copies)
    assert steps >= 2 and max(DeviceOnly.copies) <= 17 * 17   # one small copy per pass: rows x (1 + 2 x 8)
