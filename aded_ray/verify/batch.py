"""Batched tree verification: one forward pass for the root and draft tree of every running request.

KV layout: per layer one buffer ``[slots, kv heads, capacity, head dim]``; request r owns slot r. Running
requests occupy slots ``0 .. B-1`` (a leaving request's slot is filled by moving the last one into it), so
a pass over all of them uses views, never gathers. Both dimensions grow by doubling when needed.

A decode pass carries, for request r, its root and its tree (``n[r]`` tokens), written at its own offset
``lens[r]`` of its own slot; positions are ``lens[r] + depth``. Two layouts:

- **ragged** (the default): the model's linear layers see only real tokens, all requests' packed in one
  sequence of ``T = sum(n)`` rows, so a request that drafts nothing costs one row, whatever the others draft.
  Attention alone is padded, per run of requests of similar length (:func:`length_groups`: a short request
  beside long ones does not read their length of keys): each layer gathers a run's queries into
  ``[b, w = max(n)]``, attends with a 4-D additive mask per request over the first ``max(lens) + w`` entries
  of each slot of the run (its committed prefix, its tree's ancestors: ``tree.ancestor_mask``; padding rows
  see only their own column), and keeps the real rows. Attention in every pass of a ``BatchKV`` is SDPA with
  grouped query heads (the ``aded_ragged`` attention function, registered with transformers).
- **padded** (with fixed ``widths``, e.g. for shape-stable GPU kernels): every request contributes ``W``
  tokens (its root, its tree, then padding) and the whole model runs on ``[B, W]``.

With ``compile_tokens`` a ragged decoding pass runs compiled, one graph per token bucket, its attention an
opaque operator over the same slots (:mod:`aded_ray.verify.compiled_batch`).

Both return the logits of real rows only, packed: ``[T, V]``, request r's rows from ``offsets[r]``.
:meth:`BatchKV.commit` keeps each request's root and accepted nodes, moved right after its prefix, in one
gather/scatter per layer. Prefill runs one request's prompt (in chunks) through its slot alone.

Worked example (tests/test_batch.py): two requests with 5 and 3 committed tokens; request 0 drafts [a, b]
(b child of a), request 1 drafts nothing: T = 3 + 1 rows, W = 3. Keys attended: 5 + 3 = 8 columns. Request
0's row for b sees columns 0-4 (prefix), 5 (root), 6 (a), 7 (b); request 1's root row sees 0-2 and 3.
Logits of every real row equal those of the same tokens verified alone.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from aded_ray.draft.tree import DraftTree, ancestor_mask
from aded_ray.verify.compiled_batch import bucket_for, compiled_ragged_forward, run_compiled
from aded_ray.verify.invariant_attention import ATTENTIONS, Rows
from aded_ray.verify.invariant_attention import attention as invariant_attention


@functools.cache
def _batch_layer_class():
    from transformers.cache_utils import DynamicLayer

    class BatchLayer(DynamicLayer):
        """Writes each row's new entries at its own offset in its slot; returns views over the running slots."""

        def __init__(self, kv):
            super().__init__()
            self.kv = kv
            self.kbuf = self.vbuf = None

        def lazy_initialization(self, key_states, value_states):
            self.dtype, self.device = key_states.dtype, key_states.device
            self.keys = self.values = key_states.new_empty(0)
            self.is_initialized = True

        def ensure(self, shape_like, slots: int, cap: int) -> None:
            kb = self.kbuf
            if kb is not None and kb.shape[0] >= slots and kb.shape[2] >= cap:
                return
            s = max(slots, 1 if kb is None else kb.shape[0])
            c = max(cap, 0 if kb is None else kb.shape[2])
            s, c = 1 << (s - 1).bit_length(), max(256, 1 << (c - 1).bit_length())
            h, d = shape_like.shape[1], shape_like.shape[3]
            nk, nv = shape_like.new_zeros((s, h, c, d)), shape_like.new_zeros((s, h, c, d))
            if kb is not None:
                nk[: kb.shape[0], :, : kb.shape[2]] = kb
                nv[: kb.shape[0], :, : kb.shape[2]] = self.vbuf
            self.kbuf, self.vbuf = nk, nv

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            p = self.kv.current
            self.ensure(key_states, p.first + p.batch, p.kv_len)
            if p.ragged:                  # [1, heads, T, dim]: token t goes to (slot_t[t], pos_t[t])
                self.kbuf[p.slot_t, :, p.pos_t] = key_states[0].transpose(0, 1)
                self.vbuf[p.slot_t, :, p.pos_t] = value_states[0].transpose(0, 1)
            else:
                rows = torch.arange(p.first, p.first + p.batch, device=key_states.device)[:, None, None]
                heads = torch.arange(key_states.shape[1], device=key_states.device)[None, :, None]
                self.kbuf[rows, heads, p.write_pos[:, None, :]] = key_states
                self.vbuf[rows, heads, p.write_pos[:, None, :]] = value_states
            sl = slice(p.first, p.first + p.batch)
            self.keys, self.values = self.kbuf[sl, :, : p.kv_len], self.vbuf[sl, :, : p.kv_len]
            return self.keys, self.values

        def get_seq_length(self) -> int:
            p = self.kv.current
            return 0 if p is None else p.kv_len - p.width

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.kv.current.kv_len, 0

    return BatchLayer


RAGGED = "aded_ragged"


def ragged_attention(query, key, value, mask, p, scaling) -> torch.Tensor:
    """Attention of a ragged pass ``p``: the packed queries ``[1, H, T, D]`` gathered per run of requests into
    ``[b, w]``, SDPA with grouped query heads over each run's slots (``key``/``value``: the running slots'
    views) under the padded additive ``mask`` ``[B, 1, W, K]``; the real rows, packed, ``[T, H, D]``."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    q = query[0].transpose(0, 1)                                     # [T, H, D]
    outs = []
    for g in p.groups:           # requests of similar length: each group reads only its own keys
        lo, hi, w, k = g.lo, g.hi, g.width, g.keys
        out = sdpa(q[g.gather].transpose(1, 2), key[lo:hi, :, :k], value[lo:hi, :, :k],
                   attn_mask=mask[lo:hi, :, :w, :k], scale=scaling, enable_gqa=True)
        b, h, _, d = out.shape
        outs.append(out.transpose(1, 2).reshape(-1, h, d)[g.real])         # its real rows, packed
    return outs[0] if len(outs) == 1 else torch.cat(outs)


@functools.cache
def _register_ragged_attention() -> str:
    """Register the ``aded_ragged`` attention function with transformers. For a pass of a :class:`BatchKV`
    (``aded_pass`` among the forward's keyword arguments) it runs SDPA over the slots' keys with grouped
    query heads (``enable_gqa``: the shared key/value heads are never copied out per query head, which
    costs more than the attention itself at a large batch); in a ragged pass it first gathers the packed
    queries into the padded ``[B, W]`` batch and afterwards scatters the real rows back. Any other call (a
    single-request verifier sharing the model) is transformers' SDPA attention unchanged."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def attention(module, query, key, value, attention_mask, aded_pass=None, scaling=None, dropout=0.0,
                  **kwargs):
        p = aded_pass
        if p is not None and p.rows is not None:       # row-invariant attention (verify.attention)
            kb, vb = p.buffers(module.layer_idx)
            B, H, W, D = query.shape
            q = query[0].transpose(0, 1) if p.ragged else query.transpose(1, 2).reshape(B * W, H, D)
            out = invariant_attention(q, kb, vb, p.rows, scaling)
            return (out[None] if p.ragged else out.reshape(B, W, H, D)), None
        if p is None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                          dropout=dropout, **kwargs)
        sdpa = torch.nn.functional.scaled_dot_product_attention
        if not p.ragged:
            out = sdpa(query, key, value, attn_mask=attention_mask, scale=scaling, enable_gqa=True)
            return out.transpose(1, 2), None                             # [B, W, H, D]
        return ragged_attention(query, key, value, attention_mask, p, scaling)[None], None   # [1, T, H, D]

    AttentionInterface.register(RAGGED, attention)
    return RAGGED


SPLIT_KEYS = 192   # padded (query x key) entries that one more attention call costs, about, on CPUs


def length_groups(lens: np.ndarray, counts: np.ndarray, split_keys: int = SPLIT_KEYS) -> list[tuple[int, int]]:
    """Split slots ``0 .. B-1`` (in order) into runs ``[lo, hi)`` whose attention is computed separately, each
    padded to its widest pass (``max(counts)`` queries) over its longest ``max(lens + counts)`` keys: the split
    minimising the padded query x key entries plus ``split_keys`` per run (the cost of one more call). One run
    when lengths and widths are alike; a short request beside long ones gets its own, and so does a prompt
    chunk prefilled in the same pass (a hundred queries that the decoding requests must not be padded to).
    Exact dynamic programme, O(B^2).

    >>> length_groups(np.array([300, 290, 40, 35]), np.array([2, 2, 2, 2]))
    [(0, 2), (2, 4)]
    >>> length_groups(np.array([200, 210, 150]), np.array([1, 1, 90]))
    [(0, 2), (2, 3)]
    """
    ends = (np.asarray(lens) + np.asarray(counts)).tolist()
    widths = np.asarray(counts).tolist()
    B = len(ends)
    best, cut = [0.0] + [float("inf")] * B, [0] * (B + 1)
    for i in range(1, B + 1):
        m = w = 0
        for j in range(i - 1, -1, -1):           # run [j, i)
            m, w = max(m, ends[j]), max(w, widths[j])
            c = best[j] + split_keys + (i - j) * m * w
            if c < best[i]:
                best[i], cut[i] = c, j
    runs, i = [], B
    while i > 0:
        runs.append((cut[i], i))
        i = cut[i]
    return runs[::-1]


class _Group:
    """One run of requests ``[lo, hi)`` of a ragged pass, attended together: its queries gathered from the
    packed rows into ``[hi - lo, width]`` (``width`` = its largest pass), ``keys`` = its longest prefix +
    width, and which of its padded rows are real (in packed order)."""

    def __init__(self, lo: int, hi: int, lens: np.ndarray, counts: np.ndarray, offsets: np.ndarray, device):
        n = counts[lo:hi]
        self.lo, self.hi, self.width = lo, hi, int(n.max())
        self.keys = int(lens[lo:hi].max()) + self.width
        j = np.arange(self.width)[None]
        self.gather = torch.from_numpy(offsets[lo:hi, None] + np.minimum(j, n[:, None] - 1)).to(device)
        self.real = torch.from_numpy(np.flatnonzero((j < n[:, None]).ravel())).to(device)


class _Pass:
    """What the layers need to know about the pass in flight. A ragged pass (``counts`` given: request r
    brings ``counts[r]`` tokens, packed in order) also carries where each token's keys go and how its
    queries map onto the padded attention batch."""

    rows: Rows | None = None        # set when the pass's attention is the row-invariant kernel

    def __init__(self, first: int, lens: np.ndarray, width: int, device, counts: np.ndarray | None = None):
        self.first, self.batch, self.width = first, len(lens), width
        self.kv_len = int(lens.max()) + width
        self.ragged = counts is not None
        if not self.ragged:
            self.write_pos = torch.from_numpy(lens[:, None] + np.arange(width)[None]).to(device)
            return
        B = len(counts)
        offsets = np.r_[0, np.cumsum(counts)[:-1]]
        self.groups = [_Group(lo, hi, lens, counts, offsets, device)
                       for lo, hi in length_groups(lens, counts, SPLIT_KEYS)]
        slot = np.repeat(np.arange(first, first + B), counts)
        pos = np.concatenate([lens[r] + np.arange(counts[r]) for r in range(B)])
        self.slot_t, self.pos_t = torch.from_numpy(slot).to(device), torch.from_numpy(pos).to(device)


@dataclass
class PrefillChunk:
    """A newcomer's prompt ``ids`` from ``start`` (what its slot holds), at most ``max_tokens`` of it, to be
    prefilled in the running requests' next pass (:meth:`BatchKV.forward_trees`). After the pass ``ran``
    tokens were written and, once the prompt is complete, ``logits`` holds the ``[V]`` logits after its last
    token (float32), as :meth:`BatchKV.prefill` returns them."""

    ids: Sequence[int]
    start: int
    max_tokens: int
    ran: int = 0
    logits: torch.Tensor | None = None


class BatchKV:
    """KV caches of up to ``slots`` requests for one model, and the passes over them."""

    def __init__(self, model, prefill_chunk: int = 512, widths=(), layout: str | None = None,
                 compile_tokens=(), compile_mode: str | None = None, attention: str = "sdpa"):
        """``layout``: ``"ragged"`` or ``"padded"``; by default ragged, padded where fixed ``widths`` are
        given (fixed shapes need every request padded to one of them). ``attention``: ``"sdpa"`` (torch's) or
        ``"invariant"`` (a row's result depends on its own keys only, so that tree and batched rows equal plain
        decoding's bit for bit: :mod:`aded_ray.verify.invariant_attention`; float32 on CPUs). ``compile_tokens`` (ragged only):
        token buckets of compiled passes (:mod:`aded_ray.verify.compiled_batch`); a ragged decoding pass of
        at most the largest runs compiled, padded to its bucket; ``compile_mode``: ``torch.compile``'s."""
        from transformers import DynamicCache

        self.model = model
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.prefill_chunk = int(prefill_chunk)
        self.widths = tuple(sorted(int(w) for w in widths))
        self.layout = layout or ("padded" if self.widths else "ragged")
        if self.layout not in ("ragged", "padded"):
            raise ValueError(f"layout must be 'ragged' or 'padded', got {layout!r}")
        if self.layout == "ragged" and self.widths:
            raise ValueError(f"the ragged layout has no fixed widths, got widths={self.widths}")
        self.compile_tokens = tuple(sorted({int(t) for t in compile_tokens}))
        if self.compile_tokens and (self.layout != "ragged" or self.compile_tokens[0] < 1):
            raise ValueError(f"compile_tokens {self.compile_tokens} need the ragged layout and positive token "
                             f"counts (layout is {self.layout!r})")
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        if attention == "invariant" and (self.dtype != torch.float32 or self.device.type != "cpu"):
            raise ValueError(f"attention 'invariant' runs float32 passes on a CPU, not {self.dtype} on "
                             f"{self.device.type}")
        self.attention = attention
        if model.config._attn_implementation != RAGGED:
            model.set_attn_implementation(_register_ragged_attention())
        self._compiled = None
        if self.compile_tokens:
            self._compiled = compiled_ragged_forward(model, compile_mode)
        self.cache = DynamicCache(config=model.config)
        layer_cls = _batch_layer_class()
        self.cache.layers = [layer_cls(self) for _ in self.cache.layers]
        self.lens = np.zeros(0, np.int64)      # committed length per slot
        self.current: _Pass | None = None
        self.compiled_passes = 0               # passes that ran a compiled graph

    @property
    def fuses_prefill(self) -> bool:
        """Whether a prompt chunk can ride in a decoding pass (``forward_trees(..., prefill=...)``)."""
        return self.layout == "ragged"

    # ---- slots ----------------------------------------------------------------------------------
    @property
    def used(self) -> int:
        return len(self.lens)

    def add_slot(self) -> int:
        self.lens = np.r_[self.lens, 0]
        return len(self.lens) - 1

    @torch.inference_mode()
    def move_slot(self, src: int, dst: int) -> None:
        """Copy slot ``src``'s committed entries into slot ``dst`` (which it replaces)."""
        n = int(self.lens[src])
        for layer in self.cache.layers:
            if layer.kbuf is not None:
                layer.kbuf[dst, :, :n] = layer.kbuf[src, :, :n]
                layer.vbuf[dst, :, :n] = layer.vbuf[src, :, :n]
        self.lens[dst] = n

    def drop_last(self) -> None:
        self.lens = self.lens[:-1]

    @torch.inference_mode()
    def save_prefix(self, slot: int, n: int) -> list:
        """A copy of the first ``n`` KV entries of ``slot``, per layer (for :meth:`load_prefix`)."""
        return [(layer.kbuf[slot, :, :n].clone(), layer.vbuf[slot, :, :n].clone()) for layer in self.cache.layers]

    @torch.inference_mode()
    def load_prefix(self, slot: int, saved: list) -> None:
        """Make ``slot`` hold exactly the saved entries (a prefix computed earlier by the same model)."""
        n = saved[0][0].shape[1]
        for layer, (k, v) in zip(self.cache.layers, saved):
            if not layer.is_initialized:
                layer.lazy_initialization(k[None], v[None])
            layer.ensure(k[None], slot + 1, n)
            layer.kbuf[slot, :, :n] = k
            layer.vbuf[slot, :, :n] = v
        self.lens[slot] = n

    # ---- passes ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def _forward(self, first: int, lens: np.ndarray, tokens: np.ndarray, positions: np.ndarray,
                 allow: np.ndarray, counts: np.ndarray | None = None, last_only: bool = False,
                 rows: np.ndarray | None = None) -> torch.Tensor:
        """Padded: ``tokens``/``positions`` ``[B, W]``, logits ``[B, W, V]``. Ragged (``counts``): packed
        ``[1, T]``, logits ``[1, T, V]``. ``allow`` is the padded ``[B, W, K]`` attention mask either way.
        The LM head runs on the last position alone with ``last_only`` (logits ``[B, 1, V]``; a prefill), on
        the packed rows ``rows`` alone when they are given (ragged)."""
        self.current = p = _Pass(first, lens, allow.shape[1], self.device, counts)
        if self.attention == "invariant":
            p.rows = Rows.padded(allow, first) if counts is None else Rows.packed(allow, counts, first)
            layers = self.cache.layers
            p.buffers = lambda i: (layers[i].kbuf, layers[i].vbuf)
        mask = torch.zeros(allow.shape, dtype=self.dtype).masked_fill_(torch.from_numpy(~allow),
                                                                       torch.finfo(self.dtype).min)
        p.mask = mask = mask.to(self.device)[:, None]
        try:
            if counts is not None and rows is None and not last_only and self._compiled is not None:
                bucket = bucket_for(tokens.shape[1], self.compile_tokens)
                if bucket is not None:
                    self.compiled_passes += 1
                    return run_compiled(self, self._compiled, bucket, tokens[0], positions[0])[None]
            out = self.model(input_ids=torch.from_numpy(tokens).to(self.device),
                             position_ids=torch.from_numpy(positions).to(self.device),
                             attention_mask=mask, cache=self.cache, use_cache=True,
                             aded_pass=p, logits_to_keep=1 if last_only else (
                                 0 if rows is None else torch.from_numpy(rows).to(self.device)))
        finally:
            self.current = None
        return out.logits

    def _chunk_len(self, max_tokens: int | None) -> int:
        """Prompt tokens one prefill chunk takes: at most ``prefill_chunk`` and ``max_tokens``, at least one."""
        return self.prefill_chunk if max_tokens is None else max(1, min(self.prefill_chunk, max_tokens))

    def prefill(self, slot: int, ids, start: int = 0, max_tokens: int | None = None) -> torch.Tensor | None:
        """Run the next chunk (at most ``prefill_chunk`` and ``max_tokens`` tokens) of the prompt ``ids``, from
        ``start`` (the slot's length), into ``slot``; returns the ``[V]`` logits after the last prompt token
        once the prompt is complete."""
        L = int(self.lens[slot])
        if L != start:
            raise ValueError(f"slot {slot} holds {L} tokens, prefill resumes at {start}")
        chunk = np.asarray(ids[start:start + self._chunk_len(max_tokens)], np.int64)
        w = len(chunk)
        allow = np.zeros((1, w, L + w), bool)
        allow[0, :, :L] = True
        allow[0, :, L:] = np.tril(np.ones((w, w), bool))
        logits = self._forward(slot, self.lens[slot:slot + 1], chunk[None], (L + np.arange(w))[None], allow,
                               last_only=True)
        self.lens[slot] += w
        return logits[0, -1].float() if start + w >= len(ids) else None

    def forward_trees(self, roots, trees: list[DraftTree], width: int | None = None,
                      prefill: PrefillChunk | None = None) -> torch.Tensor:
        """Logits ``[T, V]`` (float32, on the device) of the real rows of slots ``0 .. B-1``, packed: request
        r's rows start at ``sum(len(trees[q]) + 1 for q < r)``; its row 0 is its root, row i + 1 its node i.
        ``width`` pads every request to that many tokens (padded layout only).

        ``prefill`` (ragged layout): the next chunk of a newcomer's prompt, in slot B, rides in the same pass
        (the weights are read once for both: a decoding pass alone is bound by reading them). Its entries are
        committed at once; its logits are not among the returned rows (see :class:`PrefillChunk`)."""
        B = len(trees)
        n = np.array([len(t) + 1 for t in trees])
        if prefill is not None:
            if self.layout != "ragged":
                raise ValueError(f"a prompt chunk rides only in a ragged pass, layout is {self.layout!r}")
            return self._forward_ragged(roots, trees, self.lens[:B], n, prefill)
        W = int(n.max()) if width is None else int(width)
        if self.widths:
            W = next((w for w in self.widths if w >= W), W)
        if W < n.max():
            raise ValueError(f"width {W} < the largest pass {n.max()}")
        lens = self.lens[:B]
        if self.layout == "ragged":
            return self._forward_ragged(roots, trees, lens, n)
        K = int(lens.max()) + W
        tokens = np.repeat(np.asarray(roots, np.int64)[:, None], W, 1)
        positions = np.repeat(lens[:, None], W, 1)
        allow = np.zeros((B, W, K), bool)
        for r, t in enumerate(trees):
            L, k = int(lens[r]), int(n[r])
            tokens[r, 1:k] = t.tokens
            positions[r, 1:k] += t.depths()
            allow[r, :, :L] = True
            allow[r, :k, L:L + k] = ancestor_mask(t.parents, include_root=True)
            pad = np.arange(k, W)
            allow[r, pad, L + pad] = True
        logits = self._forward(0, lens, tokens, positions, allow)
        real = torch.from_numpy(np.flatnonzero((np.arange(W)[None] < n[:, None]).ravel())).to(self.device)
        return logits.reshape(B * W, -1)[real].float()

    def _forward_ragged(self, roots, trees: list[DraftTree], lens: np.ndarray, n: np.ndarray,
                        chunk: PrefillChunk | None = None) -> torch.Tensor:
        B = len(trees)
        tokens = [np.r_[int(root), t.tokens].astype(np.int64) for root, t in zip(roots, trees)]
        positions = [lens[r] + np.r_[0, t.depths()] for r, t in enumerate(trees)]
        masks = [ancestor_mask(t.parents, include_root=True) for t in trees]
        rows = None
        if chunk is not None:                  # slot B: a causal run of prompt tokens after its prefix
            L = int(self.lens[B])
            if L != chunk.start:
                raise ValueError(f"slot {B} holds {L} tokens, the prompt chunk starts at {chunk.start}")
            ids = np.asarray(chunk.ids[L:L + self._chunk_len(chunk.max_tokens)], np.int64)
            c = len(ids)
            tokens.append(ids)
            positions.append(L + np.arange(c))
            masks.append(np.tril(np.ones((c, c), bool)))
            lens, n = self.lens[:B + 1], np.r_[n, c]
            T = int(n[:B].sum())
            done = L + c >= len(chunk.ids)
            rows = np.r_[np.arange(T), T + c - 1] if done else np.arange(T)   # the LM head: trees + last token
        W = int(n.max())
        K = int(lens.max()) + W
        allow = np.zeros((len(n), W, K), bool)
        for r, m in enumerate(masks):
            L, k = int(lens[r]), int(n[r])
            allow[r, :, :L] = True
            allow[r, :k, L:L + k] = m
            pad = np.arange(k, W)
            allow[r, pad, L + pad] = True          # a padding query's row stays finite; it is dropped
        logits = self._forward(0, lens, np.concatenate(tokens)[None],
                               np.concatenate(positions).astype(np.int64)[None], allow, counts=n, rows=rows)[0]
        if chunk is None:
            return logits.float()
        self.lens[B] += c
        chunk.ran = c
        chunk.logits = logits[T].float() if done else None
        return logits[:T].float()

    def warm_up(self) -> None:
        """Run a pass of every compile bucket (compiling it) on a scratch slot, then drop it: the first
        requests do not wait for the compiler. Only before any request holds a slot."""
        if self.used:
            raise ValueError(f"warm_up runs before requests hold slots ({self.used} do)")
        s = self.add_slot()
        try:
            self.prefill(s, [0])
            for t in self.compile_tokens:
                self.forward_trees([0], [DraftTree(np.zeros(t - 1, np.int32), np.arange(-1, t - 2))])
        finally:
            self.drop_last()

    @torch.inference_mode()
    def commit(self, keeps: list[list[int]]) -> None:
        """Request r keeps its pass entries ``keeps[r]`` (0 = root, i + 1 = node i, in path order)."""
        B = len(keeps)
        lens = self.lens[:B]
        k = max(len(x) for x in keeps)
        src = np.repeat((lens[:, None] + np.arange(k)[None]), 1, 0)     # identity where nothing moves
        for r, keep in enumerate(keeps):
            src[r, : len(keep)] = lens[r] + np.asarray(keep, np.int64)
        dst = lens[:, None] + np.arange(k)[None]
        if not np.array_equal(src, dst):
            rows = torch.arange(B, device=self.device)[:, None]
            s, d = torch.from_numpy(src).to(self.device), torch.from_numpy(dst).to(self.device)
            for layer in self.cache.layers:
                for buf in (layer.kbuf, layer.vbuf):
                    moved = buf[rows, :, s]                    # [B, k, H, D]
                    buf[rows, :, d] = moved
        self.lens[:B] += np.array([len(x) for x in keeps])


class SerialKV:
    """The :class:`BatchKV` interface over one single-request verifier per slot (``max_batch`` 1, the compiled
    static verifier, a tensor-parallel group's single-request verifier): a "batched" pass runs the requests
    one after the other. Correct everywhere, batched nowhere."""

    layout = "ragged"         # nothing pads: each request's pass carries its own tokens only
    fuses_prefill = False     # a prompt is prefilled by its own verifier, in a pass of its own

    def __init__(self, make_verifier):
        self.make_verifier = make_verifier
        self.verifiers = []
        self.prefill_chunk = 1 << 30

    @property
    def lens(self) -> np.ndarray:
        return np.array([v.length for v in self.verifiers], np.int64)

    @property
    def used(self) -> int:
        return len(self.verifiers)

    def add_slot(self) -> int:
        self.verifiers.append(self.make_verifier())
        return len(self.verifiers) - 1

    def move_slot(self, src: int, dst: int) -> None:
        self.verifiers[dst] = self.verifiers[src]

    def drop_last(self) -> None:
        self.verifiers.pop()

    def prefill(self, slot: int, ids, start: int = 0, max_tokens: int | None = None):
        if start:
            raise ValueError("a serial verifier prefills a prompt in one pass")
        return self.verifiers[slot].prefill(ids)

    def forward_trees(self, roots, trees: list[DraftTree], width: int | None = None) -> torch.Tensor:
        """Packed logits ``[T, V]``, as :meth:`BatchKV.forward_trees` (``width`` is ignored: nothing pads)."""
        return torch.cat([self.verifiers[r].forward_tree(int(root), t)
                          for r, (root, t) in enumerate(zip(roots, trees))])

    def commit(self, keeps: list[list[int]]) -> None:
        for v, keep in zip(self.verifiers, keeps):
            v.commit(keep)
