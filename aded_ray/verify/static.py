"""A single-request verifier with a static KV cache, fixed pass widths and (optionally) a compiled pass.

Every tensor a pass touches has a shape known before decoding starts: the KV cache is preallocated to
``max_len`` positions per layer (transformers' ``StaticCache``, written in place), and every pass after the
prefill is padded to the smallest of a few fixed ``widths`` (tokens per pass), its additive attention mask
always ``[1, 1, width, max_len]`` (columns past the committed prefix and the pass's own block are blocked, so
stale entries left behind by earlier passes are never read). A pass is then one of ``len(widths)`` shapes,
which is what ``torch.compile`` needs to specialise once per shape (inductor on CPUs; on CUDA
``compile_mode="reduce-overhead"`` also captures a CUDA graph per shape). The prompt runs in chunks of the
largest width through the same shapes (causal mask inside the chunk; its last chunk padded).

KV compaction after a step is a gather inside the same buffers (the accepted entries moved right after the
prefix), and the cache's length is reset in place: no buffer is ever reallocated, so a captured graph's
addresses stay valid.

Exactness: a compiled pass fuses operations and picks its own matrix kernels per shape, so its rows differ
from the eager pass's by rounding (~1e-5 in fp32) and a 1-token pass's rows from a 64-token pass's by as
much: the same tolerance as the eager fp32 modes (:mod:`aded_ray.verify.exactness` checks it on the shapes
used). Greedy outputs equal the eager path's on the lossless test prompts (``tests/test_static.py``).

Measured on the 2-core test machine (``aded bench-compile``, README): the compiled pass is the cheapest at
1 token (the pass is bound by reading the weights, and inductor's fused kernels around MKL's matrix-vector
products beat oneDNN's pre-packed kernels there) and no faster than ``fp32-packed`` at 8-16 tokens.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from aded_ray.draft.tree import DraftTree, ancestor_mask, pass_inputs

_COMPILED_ATTR = "_aded_compiled"     # on the model: {(mode, dynamic): compiled forward}
MIN_WINDOW = 256          # the smallest key window a pass attends over


def compiled_forward(model: torch.nn.Module, compile_mode: str | None = None, dynamic: bool | None = False):
    """``model.forward`` compiled once per model, mode and dynamism (shared by every verifier of the model).

    On CPUs the weights are frozen into the graph (inductor's ``freezing``: constant weights, laid out for
    oneDNN by the compiler; measured 43 against 55 ms for an 8-token pass without it). The switch is
    inductor's global configuration (it is read when a shape compiles, which happens lazily, so a
    per-call option would not hold): it is set here, for the process.

    The compiled function is kept on the model (``model._aded_compiled``), not in a weak-keyed table: the
    function refers to the model, so a table entry would have kept every compiled model alive. Compiled
    graphs hold frozen copies of the weights: measured, a process's RSS grows by ~2 GB when SmolLM2 is
    compiled for two widths, and does not shrink after ``torch._dynamo.reset()``."""
    per_model = model.__dict__.setdefault(_COMPILED_ATTR, {})
    key = (compile_mode, dynamic)
    if key not in per_model:
        if next(model.parameters()).device.type == "cpu":
            import torch._inductor.config as inductor_config

            inductor_config.freezing = True
        per_model[key] = torch.compile(model.forward, dynamic=dynamic, mode=compile_mode)
    return per_model[key]


def window_for(n: int, max_len: int) -> int:
    """Keys a pass reaching position ``n`` attends over: the smallest power of two >= n (at least
    ``MIN_WINDOW``), at most ``max_len`` (a pass reads its window, not the whole preallocated cache).

    >>> window_for(100, 2048), window_for(257, 2048), window_for(1500, 2048), window_for(1500, 1536)
    (256, 512, 2048, 1536)
    """
    return min(max(MIN_WINDOW, 1 << (max(n, 1) - 1).bit_length()), max_len)


@functools.cache
def _windowed_layer_class():
    from transformers.cache_utils import StaticLayer

    class WindowedStaticLayer(StaticLayer):
        """A static layer (preallocated, written in place) whose attention reads only its first ``window``
        entries: a view of the same buffers, so shapes stay fixed per window and addresses never change."""

        window = MIN_WINDOW

        def update(self, key_states, value_states, *args, **kwargs):
            keys, values = super().update(key_states, value_states, *args, **kwargs)
            return keys[:, :, : self.window], values[:, :, : self.window]

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.window, 0

    return WindowedStaticLayer


class StaticTreeVerifier:
    """The :class:`~aded_ray.interfaces.Verifier` interface over a preallocated KV cache and fixed widths.

    ``compile``: run passes through ``torch.compile`` (one specialisation per width; the first pass of each
    width compiles it, ~30 s each for SmolLM2 on 2 CPU cores: :meth:`warm_up` does it at start-up).
    """

    def __init__(self, model, widths=(1, 8, 16, 64), max_len: int = 2048, compile: bool = False,
                 compile_mode: str | None = None, dynamic: bool | None = False):
        from transformers import StaticCache

        self.model = model
        self.widths = tuple(sorted({int(w) for w in widths}))
        if not self.widths or self.widths[0] < 1:
            raise ValueError(f"widths {tuple(widths)} must be one or more positive token counts")
        if max_len < 2 * self.widths[-1]:
            raise ValueError(f"max_len {max_len} must hold at least two passes of the largest width "
                             f"{self.widths[-1]}")
        self.max_len = int(max_len)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.compiled = bool(compile)
        self._fn = compiled_forward(model, compile_mode, dynamic) if compile else model.forward
        cfg = model.config
        self.cache = StaticCache(config=cfg, max_cache_len=self.max_len)
        layer = _windowed_layer_class()
        heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        # the buffers are inference tensors whoever builds the verifier (inside inference mode or not): a
        # compiled pass guards on its inputs' dispatch keys, and a second verifier built outside inference mode
        # recompiled every width (measured on SmolLM2: ~80 s at an engine's start-up)
        with torch.inference_mode():
            self.cache.layers = [layer(self.max_len) for _ in self.cache.layers]
            self.cache.early_initialization(1, heads, head_dim, self.dtype, self.device)
        if compile and compile_mode != "reduce-overhead":
            # transformers marks the buffers as static addresses (for CUDA graphs). Without graphs that only
            # hurts: after a recompile, inductor (freezing) kept the first verifier's buffers in the graph,
            # and a second verifier's passes read and wrote them (logits off by 13, measured): plain inputs
            for layer in self.cache.layers:
                for t in (layer.keys, layer.values, layer.cumulative_length):
                    if hasattr(t, "_dynamo_static_input_type"):
                        del t._dynamo_static_input_type
        self._blocked = torch.finfo(self.dtype).min
        self._masks: dict[tuple[int, int], torch.Tensor] = {}
        self.length = 0

    # ---- bookkeeping ----------------------------------------------------------------------------
    def width_for(self, n: int) -> int:
        for w in self.widths:
            if w >= n:
                return w
        raise ValueError(f"a pass of {n} tokens exceeds the largest fixed width {self.widths[-1]}")

    @torch.inference_mode()
    def _set_length(self, n: int) -> None:
        for layer in self.cache.layers:
            layer.cumulative_length.fill_(n)
        self.length = n

    def reset(self) -> None:
        self._set_length(0)

    def _room(self, w: int) -> None:
        if self.length + w > self.max_len:
            raise ValueError(f"the static KV cache holds max_len={self.max_len} tokens: {self.length} committed "
                             f"plus a pass of {w} do not fit")

    @torch.inference_mode()
    def _pass(self, tokens: np.ndarray, positions: np.ndarray, block: np.ndarray) -> torch.Tensor:
        """One pass of ``len(tokens)`` (a fixed width) at the committed length: every row sees the prefix,
        ``block`` (``[w, w]`` bool) says which of the pass's own entries it sees. Logits ``[w, V]``."""
        L, w = self.length, len(tokens)
        self._room(w)
        window = window_for(L + w, self.max_len)
        for layer in self.cache.layers:
            layer.window = window
        mask = self._masks.get((w, window))
        if mask is None:
            mask = self._masks[(w, window)] = torch.empty((1, 1, w, window), dtype=self.dtype, device=self.device)
        mask.fill_(self._blocked)
        mask[0, 0, :, :L] = 0
        mask[0, 0, :, L:L + w].masked_fill_(torch.from_numpy(block).to(self.device), 0)
        x = torch.from_numpy(tokens.astype(np.int64)).to(self.device)[None]
        pos = torch.from_numpy(positions.astype(np.int64)).to(self.device)[None]
        out = self._fn(input_ids=x, position_ids=pos, attention_mask=mask, cache=self.cache, use_cache=True)
        return out.logits[0]

    # ---- the Verifier interface -----------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, ids) -> torch.Tensor:
        """Run the prompt in chunks of the largest width; ``[V]`` float32 logits after its last token."""
        if len(ids) == 0:
            raise ValueError("prefill needs at least one token")
        ids = np.asarray(ids, np.int64)
        W = self.widths[-1]
        if len(ids) + W > self.max_len:
            raise ValueError(f"a prompt of {len(ids)} tokens does not fit the static KV cache "
                             f"(max_len={self.max_len}, passes of up to {W} tokens)")
        self.reset()
        causal = np.tril(np.ones((W, W), bool))
        logits = None
        for start in range(0, len(ids), W):
            chunk = ids[start:start + W]
            c = len(chunk)
            w = self.width_for(c)
            tokens = np.r_[chunk, np.full(w - c, chunk[-1])]
            block = causal[:w, :w].copy()
            block[c:, :c] = False                       # padding rows see the prefix and themselves only
            L = self.length
            logits = self._pass(tokens, L + np.arange(w), block)[c - 1]
            self._set_length(L + c)
        return logits.float()

    @torch.inference_mode()
    def forward_tree(self, root: int, tree: DraftTree) -> torch.Tensor:
        """Logits ``[N + 1, V]`` (float32) for root + tree; the pass's entries stay until :meth:`commit`."""
        L, n = self.length, len(tree) + 1
        w = self.width_for(n)
        tokens, pos = pass_inputs(root, tree, L, w)
        block = np.eye(w, dtype=bool)
        block[:n, :n] = ancestor_mask(tree.parents, include_root=True)
        return self._pass(tokens, pos, block)[:n].float()     # its entries are pending until commit

    @torch.inference_mode()
    def commit(self, keep) -> None:
        """Keep step entries ``keep`` (0 = root, i + 1 = node i, in path order), moved right after the
        prefix inside the same buffers; the rest are dropped (left behind, masked from every later pass)."""
        L = self.length
        keep = [int(k) for k in keep]
        if keep != list(range(len(keep))):
            idx = torch.tensor([L + k for k in keep], device=self.device)
            for layer in self.cache.layers:
                layer.keys[:, :, L:L + len(keep)] = layer.keys.index_select(2, idx)
                layer.values[:, :, L:L + len(keep)] = layer.values.index_select(2, idx)
        self._set_length(L + len(keep))

    def warm_up(self) -> None:
        """Run (and so compile) a pass of every width, then forget it."""
        self.prefill([0])
        for w in self.widths:
            self.forward_tree(0, DraftTree(np.zeros(w - 1, np.int32), np.arange(-1, w - 2)))
            self.commit([])
        self.reset()
