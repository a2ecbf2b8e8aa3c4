"""Compiled batched passes: the ragged pass of :class:`~aded_ray.verify.batch.BatchKV` through ``torch.compile``,
one specialisation per *token bucket* (the pass's total token count, padded up).

A ragged pass is shaped by the running requests (how many, their prefix lengths, their trees) in its attention
only: every other operation of the model (embedding, norms, projections, rotary, MLP, LM head) sees one
sequence of ``T`` packed tokens. So the compiled graph keeps attention out of it: each layer's attention is
one opaque operator, ``aded::ragged_attend`` (a ``torch.library`` custom op), that writes the layer's new keys
and values into the slots' buffers and attends per request exactly as the eager ragged pass does, reading
the pass's layout (slots, positions, tree masks) from the :class:`BatchKV` running it. The model is called
without a cache and without a mask (transformers builds none for an attention function it does not know);
its only inputs are the ``[1, T]`` token ids and positions. A graph is then a function of ``T`` alone, and
``T`` is padded to the smallest bucket that holds it (padding rows are token 0 at position 0: the operator
gives them a zero attention output, writes no key for them, and their logits are dropped). Passes larger than
the largest bucket (a fused prompt chunk, a prefill) run the eager pass.

Measured on the 2-core Intel Xeon (AVX-512; README "Compiled static passes"): inductor with frozen weights
compiles one bucket in ~30 s; the per-bucket graphs are what makes it fast (a graph with a symbolic ``T``
was no faster than the eager pass).

On CUDA the operator is tagged ``cudagraph_unsafe`` where torch has the tag, so that ``mode="reduce-overhead"``
captures the graph pieces between attention operators (piecewise CUDA graphs) instead of freezing the
operator's host-side logic into a graph; **never run on a GPU**.
"""
from __future__ import annotations

import functools
import threading

import numpy as np
import torch

_ACTIVE = threading.local()          # the BatchKV whose compiled pass is running on this thread
_COMPILED_ATTR = "_aded_compiled_ragged"


def bucket_for(n: int, buckets) -> int | None:
    """The smallest bucket holding ``n`` tokens, or None when none does.

    >>> bucket_for(3, (1, 2, 4, 8)), bucket_for(8, (1, 2, 4, 8)), bucket_for(9, (1, 2, 4, 8))
    (4, 8, None)
    """
    return next((b for b in buckets if b >= n), None)


def _attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer: int, scaling: float):
    kv = getattr(_ACTIVE, "kv", None)
    if kv is None or kv.current is None:
        raise RuntimeError("aded::ragged_attend runs only inside a compiled BatchKV pass")
    p = kv.current
    T = p.slot_t.shape[0]                            # real rows; the rest of the bucket is padding
    # the layer's own ragged write (each real row at its slot and position), then the running slots' views
    keys, values = kv.cache.layers[layer].update(key[:, :, :T], value[:, :, :T])
    if p.rows is not None:                           # the row-invariant kernel over the slots' buffers
        from aded_ray.verify.invariant_attention import attention

        out = attention(query[0, :, :T].transpose(0, 1), *p.buffers(layer), p.rows, scaling)
    else:
        from aded_ray.verify.batch import ragged_attention

        out = ragged_attention(query[:, :, :T], keys, values, p.mask, p, scaling)     # [T, H, D]
    full = query.new_zeros((query.shape[2], query.shape[1], query.shape[3]))
    full[:T] = out
    return full[None]                                                          # [1, T_bucket, H, D]


@functools.cache
def register_op() -> str:
    """Register ``aded::ragged_attend`` and the ``aded_ragged_op`` attention function that calls it."""
    from transformers import AttentionInterface

    tags = (torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ()

    @torch.library.custom_op("aded::ragged_attend", mutates_args=(), tags=tags)
    def ragged_attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer: int,
                      scaling: float) -> torch.Tensor:
        return _attend(query, key, value, layer, scaling)

    @ragged_attend.register_fake
    def _(query, key, value, layer, scaling):
        return query.new_empty((1, query.shape[2], query.shape[1], query.shape[3]))

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        return torch.ops.aded.ragged_attend(query, key, value, module.layer_idx, float(scaling)), None

    AttentionInterface.register("aded_ragged_op", attention)
    return "aded_ragged_op"


def compiled_ragged_forward(model: torch.nn.Module, compile_mode: str | None = None):
    """The model's forward with the operator above as its attention, compiled (static shapes: one graph per
    token count), kept on the model and shared by every :class:`BatchKV` of it. On CPUs inductor freezes the
    weights (as :func:`aded_ray.verify.static.compiled_forward`)."""
    per_model = model.__dict__.setdefault(_COMPILED_ATTR, {})
    if compile_mode not in per_model:
        import torch._dynamo

        name = register_op()
        if next(model.parameters()).device.type == "cpu":
            import torch._inductor.config as inductor_config

            inductor_config.freezing = True
        # dynamic=False: one graph per bucket, never a symbolic token count. Every bucket is an entry of the
        # forward's code object (shared with any other compiled path of the model class): past dynamo's
        # limit of 8 per code object a new shape would silently run eager
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        compiled = torch.compile(model.forward, dynamic=False, mode=compile_mode)

        def forward(input_ids, position_ids):
            previous = model.config._attn_implementation
            model.config._attn_implementation = name   # read by each layer at call time
            try:
                return compiled(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
            finally:
                model.config._attn_implementation = previous

        per_model[compile_mode] = forward
    return per_model[compile_mode]


def run_compiled(kv, fn, bucket: int, tokens: np.ndarray, positions: np.ndarray) -> torch.Tensor:
    """One compiled ragged pass of ``kv`` (its ``current`` pass set up): ``tokens`` / ``positions`` ``[T]``
    padded to ``bucket``; the logits of the ``T`` real rows, ``[T, V]``."""
    T = len(tokens)
    ids = np.zeros(bucket, np.int64)
    pos = np.zeros(bucket, np.int64)
    ids[:T], pos[:T] = tokens, positions
    _ACTIVE.kv = kv
    try:
        logits = fn(torch.from_numpy(ids).to(kv.device)[None], torch.from_numpy(pos).to(kv.device)[None])
    finally:
        _ACTIVE.kv = None
    return logits[0, :T]
