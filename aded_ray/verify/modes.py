"""Verify modes: how the target model's weights are laid out for the machine, and whether a mode is exact.

| mode          | weights                                   | exact tree verification?                   |
|---------------|-------------------------------------------|--------------------------------------------|
| ``fp32``      | eager ``nn.Linear``                       | yes (rows independent to ~5e-5)            |
| ``fp32-packed`` | fp32, pre-packed for oneDNN (CPU only)  | yes                                        |
| ``fp32-mkl``  | fp32, pre-packed for MKL's sgemm (CPU only) | yes, linears row-invariant (padded where needed) |
| ``bf16``      | eager bf16                                | no on CPUs: a k-token pass rounds differently|
| ``bf16-packed`` | bf16, pre-packed for oneDNN (CPU only)  | no (plain decoding only)                   |
| ``fp16``      | eager fp16 (GPUs)                         | checked at start-up                        |

"Exact" here is about the linears; the attention's share is :mod:`aded_ray.verify.invariant_attention`'s
(``verify.attention``, the CPU default in the float32 modes): with both, a tree pass's rows are plain decoding's
bit for bit; with SDPA they agree to ~5e-5.

``fp32-mkl`` (the CPU default where a probe of the machine, :func:`preferred_cpu_mode`, finds MKL's packed
kernel no more than 10% slower than oneDNN's; else ``fp32-packed``): each linear's weight packed once by MKL
(``cblas_sgemm_pack``), run by its packed GEMM. Measured on the 2-core Xeon (AVX-512, torch 2.13, SmolLM2's
five linear shapes): 1.25-1.5x faster per linear than oneDNN's packed kernel at 1-32 rows, 1.13-1.27x per
model pass; and a row's result is bit-identical whatever the number of rows in the call (1 to 300 checked,
any offset), where oneDNN computes a lone row of the 1536-input ``down_proj`` with another kernel. The packing
is done for 64 rows: a pack made for a single row gives that row another result (measured), one made for 2+
rows does not. Inductor's frozen CPU graphs use the same kernel (``mkl._mkl_linear``); this mode gets it
without compiling, and without one copy of the weights per compiled shape. On the AVX2 AMD EPYC MKL computes
calls of 1-3, 5-7 and 9-11 rows with kernels that round a row differently from every larger call (measured: all
counts 12-299, any offset, agree); there the mode pads such calls to 12 rows (:func:`measure_padding`, cached
with the probe), so that a row's bits never depend on the rows beside it, whatever the CPU: exact by
construction, not by luck of the batch's size. ``fp32-packed`` gets the same treatment (on the Xeon its lone
rows of the 1536-input projection need a second row; on the EPYC it needs none).

"Exact" is measured, not assumed: :mod:`aded_ray.verify.exactness` compares tree passes of the shapes the loop
uses with plain decoding at start-up. A mode that fails it may still serve plain decoding, never speculation.

On CUDA the default mode is ``fp32`` with TF32 off (fp32 matmuls in full precision: TF32 rounds inputs to
10 mantissa bits, which makes rows depend on the kernel a pass happens to pick). A mode the hardware cannot
run (packing on a GPU, bf16 packing on a CPU without AVX-512 BF16/AVX-NE-CONVERT, CUDA absent) raises
``ValueError`` naming the mode, so commands skip it with a note instead of crashing.
"""
from __future__ import annotations

import torch

MODES = ("fp32", "fp32-packed", "fp32-mkl", "bf16", "bf16-packed", "fp16")
_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _pad_rows(rows, min_rows: int):
    """``rows`` [n, in] with zero rows appended up to ``min_rows`` (or as it is when it has enough)."""
    n = rows.shape[0]
    return rows if n >= min_rows else torch.nn.functional.pad(rows, (0, 0, 0, min_rows - n))


class PackedLinear(torch.nn.Module):
    """An ``nn.Linear`` whose weight is reordered once into oneDNN's blocked layout (CPU inference only).

    ``min_rows`` as :class:`MklPackedLinear`'s: a smaller call is computed padded with zero rows. ``None``: this
    machine's measured padding for fp32 weights (:func:`machine_min_rows`; 1, no padding, where oneDNN is
    row-invariant as it is, as on the AMD EPYC; on the Xeon a lone row of the 1536-input projection takes
    another kernel), 1 for other dtypes (``bf16-packed`` serves plain decoding only)."""

    def __init__(self, linear: torch.nn.Linear, min_rows: int | None = None):
        super().__init__()
        with torch.no_grad():
            self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None),
                                 persistent=False)
            self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone(),
                                 persistent=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        if min_rows is None:
            min_rows = default_min_rows(PackedLinear, linear.weight.dtype)
        self.min_rows = int(min_rows)
        if self.min_rows < 1:
            raise ValueError(f"min_rows must be at least 1, not {min_rows!r}")

    def forward(self, x):
        if self.min_rows == 1:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        rows = x.reshape(-1, self.in_features)
        y = torch.ops.mkldnn._linear_pointwise(_pad_rows(rows, self.min_rows), self.packed, self.bias, "none", [], "")
        return y[:rows.shape[0]].reshape(*x.shape[:-1], self.out_features)


MKL_PACK_ROWS = 64     # rows MKL packs a weight for: any 2+ gives every row count the same result, 1 does not


class MklPackedLinear(torch.nn.Module):
    """An ``nn.Linear`` whose weight is packed once by MKL's ``cblas_sgemm_pack`` (fp32, CPU inference only).

    ``mkl._mkl_linear`` takes the unpacked weight too, only to fall back to a plain linear when the call's row
    count differs from the one it is told; it is told the real count, so it gets a stand-in of the weight's
    shape, and the module holds no second copy of the weight.

    ``min_rows``: a call with fewer rows is computed padded with zero rows to ``min_rows`` and cut back. MKL picks
    its kernel by the row count, and on some CPUs small counts take kernels that round a row differently (the
    AVX2 AMD EPYC: 1-3, 5-7 and 9-11 rows); padding them to a count whose kernel rounds like every larger call's
    makes a row's result independent of the rows beside it *by construction*. ``None`` (the default): this
    machine's measured padding (:func:`machine_min_rows`, 1 where MKL is row-invariant as it is, as on the Xeon)."""

    def __init__(self, linear: torch.nn.Linear, min_rows: int | None = None):
        super().__init__()
        with torch.no_grad():
            w = linear.weight.detach()
            if w.dtype != torch.float32:
                raise ValueError(f"fp32-mkl packs fp32 weights, not {w.dtype}")
            self.register_buffer("packed", torch.ops.mkl._mkl_reorder_linear_weight(w, MKL_PACK_ROWS),
                                 persistent=False)
            self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone(),
                                 persistent=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.min_rows = default_min_rows(MklPackedLinear, w.dtype) if min_rows is None else int(min_rows)
        if self.min_rows < 1:
            raise ValueError(f"min_rows must be at least 1, not {min_rows!r}")
        # never read (see above); allocated, never written: its pages are not resident. A real [out, in]
        # tensor, not a stride-0 view: a compiled graph would materialise a view into a buffer on every call
        self.register_buffer("stand_in", torch.empty(self.out_features, self.in_features), persistent=False)

    def forward(self, x):
        rows = x.reshape(-1, self.in_features)
        n = rows.shape[0]
        padded = _pad_rows(rows, self.min_rows)
        y = torch.ops.mkl._mkl_linear(padded, self.packed, self.stand_in, self.bias, padded.shape[0])
        return y[:n].reshape(*x.shape[:-1], self.out_features)


def default_min_rows(kind, dtype) -> int:
    """The padding a packed linear of ``kind`` takes by default: this machine's for its mode (fp32 weights),
    none for other dtypes (``bf16-packed`` serves plain decoding only)."""
    if dtype != torch.float32:
        return 1
    return machine_min_rows("fp32-mkl" if kind is MklPackedLinear else "fp32-packed")


def pack_linears(model: torch.nn.Module, kind=PackedLinear) -> torch.nn.Module:
    """Every ``nn.Linear`` of ``model`` replaced by ``kind(linear)``; for the packed kinds the machine's padding
    is read once per weight dtype, not once per linear (the probe's file: ~0.4 ms a read)."""
    pads: dict = {}
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear):
                if kind in (PackedLinear, MklPackedLinear):
                    dt = child.weight.dtype
                    if dt not in pads:
                        pads[dt] = default_min_rows(kind, dt)
                    setattr(module, name, kind(child, min_rows=pads[dt]))
                else:
                    setattr(module, name, kind(child))
    return model


def mkl_available() -> bool:
    return bool(getattr(torch._C, "has_mkl", False)) and hasattr(torch.ops.mkl, "_mkl_linear")


PROBE_SHAPES = ((1536, 576), (576, 1536), (576, 576))    # (out, in): a small model's MLP and attention linears
MKL_SLACK = 1.10          # MKL is preferred unless oneDNN is more than this much faster: a stable choice


def choose_cpu_mode(us: dict[str, float], invariant: dict[str, bool] | None = None) -> str:
    """The exact CPU mode from probe timings (µs per round of the probe's linears) and, when given, whether
    each mode's kernels are row-invariant (:func:`row_invariant`): a row-invariant mode wins over a faster one
    that is not; between equals, MKL unless oneDNN is more than ``MKL_SLACK`` faster:

    >>> choose_cpu_mode({"fp32-mkl": 100.0, "fp32-packed": 95.0}), choose_cpu_mode({"fp32-mkl": 120.0, "fp32-packed": 100.0})
    ('fp32-mkl', 'fp32-packed')
    >>> choose_cpu_mode({"fp32-mkl": 90.0, "fp32-packed": 100.0}, {"fp32-mkl": False, "fp32-packed": True})
    'fp32-packed'
    >>> choose_cpu_mode({"fp32-mkl": 200.0, "fp32-packed": 100.0}, {"fp32-mkl": True, "fp32-packed": False})
    'fp32-mkl'
    """
    if invariant and invariant.get("fp32-mkl") != invariant.get("fp32-packed"):
        return "fp32-mkl" if invariant.get("fp32-mkl") else "fp32-packed"
    return "fp32-mkl" if us["fp32-mkl"] <= MKL_SLACK * us["fp32-packed"] else "fp32-packed"


ROW_COUNTS = tuple(range(1, 18)) + (31, 32, 33, 40)


def row_invariant(kind, shapes=PROBE_SHAPES, counts=ROW_COUNTS, full: int = 64) -> bool:
    """Whether a packed linear of ``kind`` computes a row bit for bit the same whatever the number of rows in
    the call (each of ``counts`` rows against those rows of one ``full``-row call, random weights). Where it
    does, a tree pass, a batched pass and a lone decoding step give a token's row the same bits. It depends on
    the CPU, not only on the library: MKL's packed sgemm is row-invariant on the AVX-512 Xeon and not on the
    AVX2 AMD EPYC (1-3, 5-7 and 9-11 rows take other kernels there; padded to 12 rows it is); oneDNN's is on
    the EPYC, and not on the Xeon for a lone row of the 1536-input projection."""
    gen = torch.Generator().manual_seed(7)
    with torch.inference_mode():
        for n, k in shapes:
            lin = torch.nn.Linear(k, n, bias=False)
            with torch.no_grad():
                lin.weight.copy_(torch.randn(n, k, generator=gen) / k ** 0.5)
            m = kind(lin)
            x = torch.randn(full, k, generator=gen)
            ref = m(x)
            for c in counts:
                if not torch.equal(m(x[:c].contiguous()), ref[:c]):
                    return False
    return True


def probe_cpu_linears(rows: int = 8, reps: int = 60, min_rows: dict[str, int] | None = None) -> dict[str, float]:
    """µs per round of :data:`PROBE_SHAPES` at ``rows`` rows, MKL-packed against oneDNN-packed, each padded to
    its ``min_rows`` (default 1), interleaved, median of ``reps`` (~0.1 s). MKL's kernels differ by CPU vendor
    and instruction set: measured, not assumed."""
    import time

    torch.manual_seed(0)
    layers = [torch.nn.Linear(k, n, bias=False) for n, k in PROBE_SHAPES]
    pad = {"fp32-mkl": 1, "fp32-packed": 1, **(min_rows or {})}
    kinds = {"fp32-mkl": [MklPackedLinear(lin, min_rows=pad["fp32-mkl"]) for lin in layers],
             "fp32-packed": [PackedLinear(lin, min_rows=pad["fp32-packed"]) for lin in layers]}
    xs = [torch.randn(rows, k) for _, k in PROBE_SHAPES]
    times = {name: [] for name in kinds}
    with torch.inference_mode():
        for _ in range(reps):
            for name, mods in kinds.items():
                t = time.perf_counter()
                for m, x in zip(mods, xs):
                    m(x)
                times[name].append(time.perf_counter() - t)
    return {name: round(1e6 * sorted(ts)[len(ts) // 2], 1) for name, ts in times.items()}


PAD_CANDIDATES = (1, 2, 4, 8, 12, 16, 24, 32)
_PADDING: dict[tuple[str, int], int | None] = {}


def _padded_kind(mode: str):
    return {"fp32-mkl": MklPackedLinear, "fp32-packed": PackedLinear}[mode]


def _has_library(mode: str) -> bool:
    return mkl_available() if mode == "fp32-mkl" else torch.backends.mkldnn.is_available()


def measure_padding(mode: str, candidates=PAD_CANDIDATES) -> int | None:
    """The fewest rows (of ``candidates``) that a packed mode's linear (``fp32-mkl`` or ``fp32-packed``) must pad
    a smaller call to for a row's result to be bit for bit the same whatever the number of rows in the call
    (:func:`row_invariant`), or ``None`` when none does (or the library is missing). Measured on the AVX2 AMD
    EPYC: MKL 12 with 2 threads, 4 with 1, oneDNN 1 (no padding). Measured once per process and thread count
    (the kernels differ by it, as the probe's cache file does; ~0.1 s per candidate tried)."""
    key = (mode, torch.get_num_threads())
    if key not in _PADDING:
        kind = _padded_kind(mode)
        _PADDING[key] = next((p for p in candidates if row_invariant(lambda lin, p=p: kind(lin, min_rows=p))),
                             None) if _has_library(mode) else None
    return _PADDING[key]


def measure_row_invariance() -> dict[str, bool]:
    """Whether each packed mode is row-invariant on this CPU with the padding :func:`measure_padding` finds
    (measured once per process and thread count; a mode whose library this torch build lacks is ``False``)."""
    return {mode: measure_padding(mode) is not None for mode in ("fp32-mkl", "fp32-packed")}


def _both_libraries() -> bool:
    return mkl_available() and torch.backends.mkldnn.is_available()


def cpu_probe() -> dict:
    """This machine's CPU probe, ``{"us": ..., "row_invariant": ..., "min_rows": ..., "choice": ...}``:
    measured once per machine kind (:func:`measure_row_invariance`, :func:`measure_padding` per packed mode,
    :func:`probe_cpu_linears` with those paddings, :func:`choose_cpu_mode`) and cached in ``$ADED_CACHE_DIR/modes``
    so that every process of a machine, every restart included, reads the same verdict instead of measuring
    again. Files written before a field existed are measured again."""
    import json
    import os

    from aded_ray.paths import cache_dir
    from aded_ray.verify.cost import machine_key

    path = cache_dir() / "modes" / f"cpu-linears-{machine_key()}.json"
    try:
        got = json.loads(path.read_text())
        pads = got.get("min_rows")
        if "row_invariant" in got and isinstance(pads, dict) and got.get("choice") in MODES \
                and all(int(pads.get(m, 0)) >= 1 for m in ("fp32-mkl", "fp32-packed")):
            return got
    except (OSError, ValueError, KeyError, TypeError):
        pass
    invariant = measure_row_invariance()
    pads = {mode: measure_padding(mode) or 1 for mode in ("fp32-mkl", "fp32-packed")}
    us = probe_cpu_linears(min_rows=pads)
    got = {"us": us, "row_invariant": invariant, "min_rows": pads, "choice": choose_cpu_mode(us, invariant)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(got))
    tmp.replace(path)
    return got


def machine_min_rows(mode: str) -> int:
    """The rows a packed mode's linear (``fp32-mkl``, ``fp32-packed``) pads a smaller call to on this machine:
    the cached probe's where torch has both libraries, else measured once per process; 1 (no padding) where no
    padding helps (the mode is then reported not row-invariant) or the library is missing."""
    if not _has_library(mode):
        return 1
    if _both_libraries():
        return int(cpu_probe()["min_rows"][mode])
    return measure_padding(mode) or 1


def cpu_row_invariance() -> dict[str, bool]:
    """Whether each packed mode is row-invariant on this CPU (with its padding): the cached probe's verdict where
    torch has both libraries (the service's choice was made from it), else measured once per process."""
    return dict(cpu_probe()["row_invariant"]) if _both_libraries() else measure_row_invariance()


def row_invariance_warning(mode: str) -> str | None:
    """The warning an engine logs when it runs a packed CPU mode whose kernels are not row-invariant here (a
    mode asked for explicitly; the automatic choice avoids them where it can), else ``None``."""
    if mode not in ("fp32-mkl", "fp32-packed"):
        return None
    invariance = cpu_row_invariance()
    if invariance.get(mode):
        return None
    return (f"{mode}: this CPU's packed kernels round a row by the number of rows in the call, so a tree pass "
            "and a plain step can differ in the last bits (outputs equal plain decoding up to near-ties); modes "
            f"whose kernels are row-invariant here: {[m for m, ok in invariance.items() if ok] or 'none'}")


def preferred_cpu_mode() -> str:
    """``fp32-mkl`` or ``fp32-packed`` for this machine (or ``fp32`` without either library): the choice of
    :func:`cpu_probe`, cached per machine kind."""
    if not mkl_available():
        return "fp32-packed" if torch.backends.mkldnn.is_available() else "fp32"
    if not torch.backends.mkldnn.is_available():
        return "fp32-mkl"
    return cpu_probe()["choice"]


def load_for_mode(model: str | None, mode: str, device: str = "cpu"):
    """Load the model for ``mode`` on ``device``."""
    from aded_ray.verify.loading import load_model

    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {MODES}")
    if mode == "fp32-mkl":
        if device != "cpu":
            raise ValueError(f"mode {mode!r} is CPU-only (MKL packing); device is {device!r}")
        if not mkl_available():
            raise ValueError(f"mode {mode!r} needs MKL (torch.ops.mkl._mkl_linear), which this torch build lacks")
        return pack_linears(load_model(model, dtype="float32", device=device), MklPackedLinear)
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
