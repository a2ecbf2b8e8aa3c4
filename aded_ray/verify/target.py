"""The target model over a draft tree: prefill, one forward over root + tree, KV compaction.

The KV cache always holds exactly the committed tokens between steps. A step appends the root and the
tree (T = N + 1 entries), then :meth:`TreeVerifier.commit` keeps the root and the accepted nodes, moved
to the positions right after the committed prefix.

Attention inside the step: every new token sees the whole prefix; inside the block, node i sees the root,
its ancestors and itself (``tree.ancestor_mask(include_root=True)``); position ids are ``L + depth``.
The mask is additive, in the model dtype (0 = attend, dtype-min = blocked), which sdpa and eager both
honour (a bool mask is silently wrong with eager attention).

Fixed widths (``widths``, e.g. ``(64,)``): every pass after the prefill, plain or speculative, is padded to
the smallest width that holds it (pad tokens sit after the real ones, are masked from every real row and
are dropped at commit). The matrix kernels a token meets then depend on the width alone, never on the
tree or on whether the step drafted: on a GPU, where a pass of 1 and of 64 tokens cost the same, this
removes the row-count dependence of half-precision GEMMs and gives the captured-graph issue its fixed
shapes. Without widths a pass has exactly root + tree tokens (the CPU default: there a pass's cost grows
with its tokens).
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from aded_ray.draft.tree import DraftTree, ancestor_mask, pass_inputs
from aded_ray.verify.invariant_attention import ATTENTIONS, Rows


class _InvariantPass:
    """A single-request pass whose attention is the row-invariant kernel over the growable buffers."""

    ragged = False

    def __init__(self, allow: np.ndarray, layers):
        self.rows = Rows.padded(allow)
        self.layers = layers

    def buffers(self, i: int):
        layer = self.layers[i]
        if not hasattr(layer, "_kbuf"):
            raise ValueError(f"attention 'invariant' needs the verifier's growable KV layers, this model's cache "
                             f"has {type(layer).__name__}")
        return layer._kbuf, layer._vbuf


@functools.cache
def _growable_layer_class():
    from transformers.cache_utils import DynamicLayer

    class GrowableLayer(DynamicLayer):
        """A KV layer that writes into a preallocated buffer grown by doubling, instead of concatenating the
        whole cache every step; ``keys``/``values`` are views of the filled part."""

        def lazy_initialization(self, key_states, value_states):
            super().lazy_initialization(key_states, value_states)
            self._n = 0
            self._kbuf = self._vbuf = None

        def _ensure(self, k, need):
            if self._kbuf is not None and self._kbuf.shape[-2] >= need:
                return
            cap = max(256, 1 << (need - 1).bit_length())
            shape = (*k.shape[:-2], cap, k.shape[-1])
            kb, vb = k.new_empty(shape), k.new_empty(shape)
            if self._n:
                kb[..., : self._n, :] = self._kbuf[..., : self._n, :]
                vb[..., : self._n, :] = self._vbuf[..., : self._n, :]
            self._kbuf, self._vbuf = kb, vb

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            t = key_states.shape[-2]
            self._ensure(key_states, self._n + t)
            self._kbuf[..., self._n:self._n + t, :] = key_states
            self._vbuf[..., self._n:self._n + t, :] = value_states
            self._n += t
            self.keys, self.values = self._kbuf[..., : self._n, :], self._vbuf[..., : self._n, :]
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self._n if self.is_initialized else 0

        def crop(self, tokens_to_remove: int) -> None:
            if tokens_to_remove > 0:
                raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
            if tokens_to_remove == 0 or not self.is_initialized:
                return
            self._n -= abs(tokens_to_remove)
            self.keys, self.values = self._kbuf[..., : self._n, :], self._vbuf[..., : self._n, :]

        def reset(self) -> None:
            self._n = 0
            super().reset()

    return GrowableLayer


class TreeVerifier:
    """One request's view of a causal LM: its KV cache and the committed length."""

    def __init__(self, model, widths=(), attention: str = "sdpa"):
        """``attention``: ``"sdpa"`` (the model's own) or ``"invariant"`` (a row's result depends on its own
        keys only, so a tree pass's rows equal plain decoding's bit for bit where the linears are
        row-invariant: :mod:`aded_ray.verify.invariant_attention`; float32 on CPUs)."""
        from transformers import DynamicCache

        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        self.attention = attention
        if attention == "invariant":
            from aded_ray.verify.batch import RAGGED, _register_ragged_attention

            p = next(model.parameters())
            if p.dtype != torch.float32 or p.device.type != "cpu":
                raise ValueError(f"attention 'invariant' runs float32 on a CPU, not {p.dtype} on {p.device.type}")
            if model.config._attn_implementation != RAGGED:
                model.set_attn_implementation(_register_ragged_attention())
        self.model = model
        self.widths = tuple(sorted(int(w) for w in widths))
        if any(w < 1 for w in self.widths):
            raise ValueError(f"widths {widths} must be positive token counts")
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self._cache_cls = DynamicCache
        self._layer_cls = _growable_layer_class()
        self.cache = None
        self.length = 0

    def reset(self) -> None:
        self.cache = self._cache_cls(config=self.model.config)
        if all(type(layer).__name__ == "DynamicLayer" for layer in self.cache.layers):
            self.cache.layers = [self._layer_cls() for _ in self.cache.layers]
        self.length = 0

    @torch.inference_mode()
    def prefill(self, ids) -> torch.Tensor:
        """Run the prompt; returns ``[V]`` float32 logits for the position after it."""
        if len(ids) == 0:
            raise ValueError("prefill needs at least one token")
        self.reset()
        x = torch.as_tensor(np.asarray(ids, np.int64), device=self.device)[None]
        kwargs = {}
        if self.attention == "invariant":
            kwargs["aded_pass"] = _InvariantPass(np.tril(np.ones((len(ids), len(ids)), bool))[None],
                                                 self.cache.layers)
        # only the last position's logits are used: the LM head runs on that row alone (on a 100-token
        # prompt it is a fifth of the prefill's multiply-adds otherwise)
        out = self.model(input_ids=x, cache=self.cache, use_cache=True, logits_to_keep=1, **kwargs)
        self.length = len(ids)
        return out.logits[0, -1].float()

    def width_for(self, n: int) -> int:
        """Tokens in the pass that carries ``n`` real tokens (``n`` itself without fixed widths)."""
        if not self.widths:
            return n
        for w in self.widths:
            if w >= n:
                return w
        raise ValueError(f"a pass of {n} tokens exceeds the largest fixed width {self.widths[-1]}")

    @torch.inference_mode()
    def forward_tree(self, root: int, tree: DraftTree) -> torch.Tensor:
        """Logits ``[N + 1, V]`` (float32, on the model's device) for root + tree nodes; appends the pass's
        entries to the KV cache (N + 1, plus padding under fixed widths; :meth:`commit` drops the rest)."""
        L, n = self.length, len(tree) + 1
        w = self.width_for(n)
        tokens, pos = pass_inputs(root, tree, L, w)
        x = torch.from_numpy(tokens).to(self.device)[None]
        position_ids = torch.from_numpy(pos).to(self.device)[None]
        kwargs = {}
        if w > 1 or self.attention == "invariant":
            allow = np.zeros((w, L + w), bool)
            allow[:, :L] = True                                       # everyone sees the committed prefix
            allow[:n, L:L + n] = ancestor_mask(tree.parents, include_root=True)
            pad = np.arange(n, w)
            allow[pad, L + pad] = True                                # padding rows see the prefix and themselves
            if self.attention == "invariant":
                kwargs["aded_pass"] = _InvariantPass(allow[None], self.cache.layers)
            else:
                mask = torch.zeros(allow.shape, dtype=self.dtype).masked_fill_(torch.from_numpy(~allow),
                                                                               torch.finfo(self.dtype).min)
                kwargs["attention_mask"] = mask.to(self.device)[None, None]
        out = self.model(input_ids=x, position_ids=position_ids, cache=self.cache, use_cache=True,
                         **kwargs)
        return out.logits[0, :n].float()

    @torch.inference_mode()
    def commit(self, keep) -> None:
        """Keep step entries ``keep`` (indices into root + tree, root = 0, in path order) and drop the rest."""
        L = self.length
        keep = list(keep)
        n_new = self.cache.get_seq_length() - L
        if keep != list(range(len(keep))):  # not already in place: move the accepted entries down
            idx = torch.tensor([L + k for k in keep], device=self.device)
            for layer in self.cache.layers:
                layer.keys[:, :, L:L + len(keep)] = layer.keys.index_select(2, idx)
                layer.values[:, :, L:L + len(keep)] = layer.values.index_select(2, idx)
        drop = n_new - len(keep)
        if drop:
            self.cache.crop(-drop)
        self.length = L + len(keep)
        assert self.cache.get_seq_length() == self.length, (self.cache.get_seq_length(), self.length)
