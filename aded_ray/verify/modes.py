"""Verify modes: how the target model's weights are laid out for the machine, and whether a mode is exact.

| mode          | weights                                   | exact tree verification?                   |
|---------------|-------------------------------------------|--------------------------------------------|
| ``fp32``      | eager ``nn.Linear``                       | yes (rows independent to ~5e-5)            |
| ``fp32-packed`` | fp32, pre-packed for oneDNN (CPU only)  | yes, and the fastest exact mode on CPUs    |
| ``bf16``      | eager bf16                                | no on CPUs: a k-token pass rounds differently|
| ``bf16-packed`` | bf16, pre-packed for oneDNN (CPU only)  | no (plain decoding only)                   |
| ``fp16``      | eager fp16 (GPUs)                         | checked at start-up                        |

"Exact" is measured, not assumed: :func:`row_independence` compares an 8-token pass with the same tokens fed
one at a time. A mode that fails the check may still serve plain decoding, never speculation.
"""
from __future__ import annotations

import torch

MODES = ("fp32", "fp32-packed", "bf16", "bf16-packed", "fp16")
_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
ROW_TOLERANCE = 1e-3


class PackedLinear(torch.nn.Module):
    """An ``nn.Linear`` whose weight is reordered once into oneDNN's blocked layout (CPU inference only)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        with torch.no_grad():
            self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None),
                                 persistent=False)
            self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone(),
                                 persistent=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x):
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def pack_linears(model: torch.nn.Module) -> torch.nn.Module:
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(module, name, PackedLinear(child))
    return model


def load_for_mode(model: str | None, mode: str, device: str = "cpu"):
    """Load the model for ``mode`` on ``device``."""
    from aded_ray.verify.loading import load_model

    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {MODES}")
    packed = mode.endswith("-packed")
    if packed and device != "cpu":
        raise ValueError(f"mode {mode!r} is CPU-only (oneDNN packing); device is {device!r}")
    if packed and not torch.backends.mkldnn.is_available():
        raise ValueError(f"mode {mode!r} needs oneDNN (mkldnn), which this torch build lacks")
    lm = load_model(model, dtype=_DTYPES[mode.split("-")[0]], device=device)
    return pack_linears(lm) if packed else lm


def verifier_factory(model_or_factory):
    """A callable returning a fresh verifier: a model is wrapped in :class:`TreeVerifier`."""
    if isinstance(model_or_factory, torch.nn.Module):
        from aded_ray.verify.target import TreeVerifier

        return lambda: TreeVerifier(model_or_factory)
    return model_or_factory


@torch.inference_mode()
def row_independence(model, n: int = 8, prefix: int = 48) -> tuple[float, bool]:
    """Max |logit difference| between one n-token pass and the same tokens one by one, and argmax equality.

    ``model`` is a model or a verifier factory (e.g. a tensor-parallel group's)."""
    import numpy as np

    from aded_ray.draft.tree import DraftTree

    v = verifier_factory(model)()
    ids = [(1000 + 37 * i) % 40000 for i in range(prefix)]
    toks = [(2000 + 91 * i) % 40000 for i in range(n)]
    v.prefill(ids)
    block = v.forward_tree(toks[0], DraftTree(np.array(toks[1:]), np.arange(-1, n - 2)))
    v.prefill(ids)
    rows = []
    for t in toks:
        rows.append(v.forward_tree(t, DraftTree())[0])
        v.commit([0])
    rows = torch.stack(rows)
    return float((block - rows).abs().max()), bool((block.argmax(-1) == rows.argmax(-1)).all())
