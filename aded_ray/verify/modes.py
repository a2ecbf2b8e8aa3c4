"""Verify modes: how the target model's weights are laid out for the machine, and whether a mode is exact.

| mode          | weights                                   | exact tree verification?                   |
|---------------|-------------------------------------------|--------------------------------------------|
| ``fp32``      | eager ``nn.Linear``                       | yes (rows independent to ~5e-5)            |
| ``fp32-packed`` | fp32, pre-packed for oneDNN (CPU only)  | yes, and the fastest exact mode on CPUs    |
| ``bf16``      | eager bf16                                | no on CPUs: a k-token pass rounds differently|
| ``bf16-packed`` | bf16, pre-packed for oneDNN (CPU only)  | no (plain decoding only)                   |
| ``fp16``      | eager fp16 (GPUs)                         | checked at start-up                        |

"Exact" is measured, not assumed: :mod:`aded_ray.verify.exactness` compares tree passes of the shapes the loop
uses with plain decoding at start-up. A mode that fails it may still serve plain decoding, never speculation.

On CUDA the default mode is ``fp32`` with TF32 off (fp32 matmuls in full precision: TF32 rounds inputs to
10 mantissa bits, which makes rows depend on the kernel a pass happens to pick). A mode the hardware cannot
run (packing on a GPU, bf16 packing on a CPU without AVX-512 BF16/AVX-NE-CONVERT, CUDA absent) raises
``ValueError`` naming the mode, so commands skip it with a note instead of crashing.
"""
from __future__ import annotations

import torch

MODES = ("fp32", "fp32-packed", "bf16", "bf16-packed", "fp16")
_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


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
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available on this machine")
    dtype = _DTYPES[mode.split("-")[0]]
    if packed:
        probe_packed(dtype)
    if device.startswith("cuda") and dtype == "float32":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    lm = load_model(model, dtype=dtype, device=device)
    return pack_linears(lm) if packed else lm


def probe_packed(dtype: str) -> None:
    """Run one tiny pre-packed linear in ``dtype``: oneDNN refuses bf16 on CPUs without the instructions."""
    lin = torch.nn.Linear(32, 32).to(getattr(torch, dtype))
    try:
        with torch.inference_mode():
            PackedLinear(lin)(torch.ones(2, 32, dtype=lin.weight.dtype))
    except RuntimeError as e:
        raise ValueError(f"mode {dtype}-packed is not supported by this CPU ({str(e).splitlines()[0][:160]})") \
            from None


def verifier_factory(model_or_factory):
    """A callable returning a fresh verifier: a model is wrapped in :class:`TreeVerifier`."""
    if isinstance(model_or_factory, torch.nn.Module):
        from aded_ray.verify.target import TreeVerifier

        return lambda: TreeVerifier(model_or_factory)
    return model_or_factory
