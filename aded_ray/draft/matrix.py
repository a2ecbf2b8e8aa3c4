"""The tri-gram matrix: a read-only base (compact arrays in one memory-mappable file) plus additive,
integer-counted adaptive deltas applied with the cap at read time.

File layout (``.tri``)::

    8 bytes  magic b"ADEDTRI1"
    8 bytes  little-endian header length H
    H bytes  JSON header: vocab_size, top_k, meta (tokenizer, corpus, ...), arrays {name: dtype, shape, offset}
    arrays   first[V+1] int64, keys[C] int64, offsets[C+1] int64, succ[E] int32, weight[E] float32,
             each 64-byte aligned

``keys`` are ``a * V + b`` sorted ascending; ``weight`` holds per-context probabilities of the top-k
successors (not renormalised after pruning, as in ADED), sorted by weight descending then token id.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from aded_ray.draft import kernels as K

MAGIC = b"ADEDTRI1"
_ALIGN = 64
ADED_INCREMENT = 0.04
ADED_CAP = 3.0
ADED_WINDOW = 16


class TrigramMatrix:
    """Base arrays + delta overlay. Thread-unsafe: one matrix per process, mutated by one thread."""

    def __init__(self, first, keys, offsets, succ, weight, *, vocab_size: int, top_k: int = 12,
                 meta: dict | None = None, increment: float = ADED_INCREMENT, cap: float = ADED_CAP):
        if increment <= 0 or cap <= 0:
            raise ValueError(f"increment {increment} and cap {cap} must be positive")
        self.vocab_size = int(vocab_size)
        self.top_k = int(top_k)
        self.meta = dict(meta or {})
        self.base = (first, keys, offsets, succ, weight, K.build_index(keys, offsets, self.vocab_size))
        self.prm = np.array([self.vocab_size, increment, cap], np.float64)
        self._new_overlay(bits=12, entries=4096)
        # Optional sharing hook (duck-typed, e.g. store.redis_store.SharedStore): ``drain()`` applies other
        # processes' deltas before an update, ``record(keys, successors)`` receives this process's own bumps.
        self.journal = None

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def empty(cls, vocab_size: int, **kw) -> "TrigramMatrix":
        z64 = np.zeros(0, np.int64)
        return cls(np.zeros(vocab_size + 1, np.int64), z64, np.zeros(1, np.int64), np.zeros(0, np.int32),
                   np.zeros(0, np.float32), vocab_size=vocab_size, **kw)

    @classmethod
    def from_counts(cls, codes: np.ndarray, counts: np.ndarray, *, vocab_size: int, top_k: int = 12,
                    meta: dict | None = None, **kw) -> "TrigramMatrix":
        """From unique tri-gram codes ``(a*V + b)*V + c`` (sorted ascending) and their counts."""
        V = np.int64(vocab_size)
        ctx = codes // V
        succ = (codes % V).astype(np.int32)
        counts = counts.astype(np.float64)
        starts = np.flatnonzero(np.r_[True, ctx[1:] != ctx[:-1]])
        totals = np.add.reduceat(counts, starts) if len(starts) else np.zeros(0)
        group = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(ctx)]))
        prob = counts / totals[group] if len(group) else counts
        # order inside each context: probability desc, token asc; then keep the top_k per context
        order = np.lexsort((succ, -prob, group))
        rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(ctx)]))
        keep = order[rank < top_k]
        keys = ctx[starts]
        n_kept = np.minimum(np.diff(np.r_[starts, len(ctx)]), top_k)
        offsets = np.r_[0, np.cumsum(n_kept)].astype(np.int64)
        first = np.searchsorted(keys, np.arange(vocab_size + 1, dtype=np.int64) * V).astype(np.int64)
        return cls(first, keys.astype(np.int64), offsets, succ[keep].copy(), prob[keep].astype(np.float32),
                   vocab_size=vocab_size, top_k=top_k, meta=meta, **kw)

    # ---- file I/O ------------------------------------------------------------------------------
    def save(self, path: str | Path) -> int:
        """Write the base arrays (not the deltas) to one file; returns its size in bytes."""
        names = ("first", "keys", "offsets", "succ", "weight")
        arrays = dict(zip(names, self.base))
        layout, off = {}, 0
        for name in names:
            a = arrays[name]
            layout[name] = {"dtype": a.dtype.str, "shape": list(a.shape), "offset": off}
            off += -(-a.nbytes // _ALIGN) * _ALIGN
        header = json.dumps({"vocab_size": self.vocab_size, "top_k": self.top_k, "meta": self.meta,
                             "arrays": layout}).encode()
        data_start = -(-(16 + len(header)) // _ALIGN) * _ALIGN
        tmp = Path(str(path) + ".tmp")
        with open(tmp, "wb") as fh:
            fh.write(MAGIC + len(header).to_bytes(8, "little") + header)
            for name in names:
                fh.seek(data_start + layout[name]["offset"])
                fh.write(np.ascontiguousarray(arrays[name]).tobytes())
            fh.truncate(data_start + off)
        tmp.replace(path)
        return Path(path).stat().st_size

    @classmethod
    def load(cls, path: str | Path, *, mmap: bool = True, **kw) -> "TrigramMatrix":
        """Open a store file; with ``mmap`` the arrays are memory-mapped read-only (shared page cache)."""
        path = Path(path)
        with open(path, "rb") as fh:
            head = fh.read(16)
            if head[:8] != MAGIC:
                raise ValueError(f"{path} is not an aded_ray tri-gram store (magic {head[:8]!r})")
            hlen = int.from_bytes(head[8:16], "little")
            header = json.loads(fh.read(hlen))
        data_start = -(-(16 + hlen) // _ALIGN) * _ALIGN
        arrs = []
        for name in ("first", "keys", "offsets", "succ", "weight"):
            spec = header["arrays"][name]
            dtype, shape = np.dtype(spec["dtype"]), tuple(spec["shape"])
            if mmap and int(np.prod(shape)) > 0:
                a = np.memmap(path, dtype=dtype, mode="r", offset=data_start + spec["offset"], shape=shape)
            else:
                with open(path, "rb") as fh:
                    fh.seek(data_start + spec["offset"])
                    a = np.frombuffer(fh.read(int(np.prod(shape)) * dtype.itemsize), dtype).reshape(shape)
            arrs.append(np.asarray(a))
        return cls(*arrs, vocab_size=header["vocab_size"], top_k=header["top_k"], meta=header.get("meta"), **kw)

    # ---- overlay (adaptive deltas) -------------------------------------------------------------
    def _new_overlay(self, bits: int, entries: int):
        self.ov = (np.full(1 << bits, -1, np.int64), np.full(1 << bits, -1, np.int32),
                   np.zeros(entries, np.int32), np.zeros(entries, np.int64), np.zeros(entries, np.int32),
                   np.array([bits, 0, 0], np.int64))

    def reserve(self, n: int) -> None:
        """Make room for ``n`` more delta entries (and contexts) before a kernel call."""
        bits, used_slots, used = (int(x) for x in self.ov[5])
        need_bits = bits
        while (used_slots + n) * 2 > (1 << need_bits):  # load factor <= 1/2
            need_bits += 1
        cap = len(self.ov[2])
        need_cap = cap
        while used + n > need_cap:
            need_cap *= 2
        if need_bits == bits and need_cap == cap:
            return
        old = self.ov
        self._new_overlay(need_bits, need_cap)
        K.ov_rehash(old, self.ov)

    def update(self, seq, window: int = ADED_WINDOW) -> None:
        """ADED's adaptive update over the last ``window`` tokens of ``seq`` (committed + root)."""
        seq = np.ascontiguousarray(seq, dtype=np.int32)
        journal = self.journal
        if journal is not None:
            journal.drain()
        self.reserve(max(0, min(len(seq), window) - 2))
        K.adaptive_update(self.ov, self.prm, seq, window)
        if journal is not None:
            w = seq[-window:].astype(np.int64)
            ok = (w[:-2] >= 0) & (w[:-2] < self.vocab_size) & (w[1:-1] >= 0) & (w[1:-1] < self.vocab_size) & \
                (w[2:] >= 0) & (w[2:] < self.vocab_size)
            journal.record((w[:-2] * self.vocab_size + w[1:-1])[ok], w[2:][ok].astype(np.int32))

    def apply_deltas(self, keys, toks, counts) -> None:
        """Merge deltas ``(context key a*V+b, successor, count)`` from anywhere (another process, Redis)."""
        keys = np.ascontiguousarray(keys, np.int64)
        self.reserve(len(keys))
        K.apply_counts(self.ov, keys, np.ascontiguousarray(toks, np.int32), np.ascontiguousarray(counts, np.int64))

    def deltas(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All deltas as ``(keys, successors, counts)`` arrays."""
        n = int(self.ov[5][2])
        k, t, c = np.zeros(n, np.int64), np.zeros(n, np.int32), np.zeros(n, np.int64)
        K.ov_items(self.ov, k, t, c)
        return k, t, c

    def reset_deltas(self) -> None:
        self._new_overlay(bits=12, entries=4096)

    # ---- reads ---------------------------------------------------------------------------------
    def successors(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        """``(tokens, weights)`` of context (a, b), merged and capped, sorted by weight descending."""
        tok, w = np.zeros(K.MAX_SUCC, np.int32), np.zeros(K.MAX_SUCC, np.float64)
        n = K.successors(self.base, self.ov, self.prm, int(a), int(b), tok, w)
        return tok[:n].copy(), w[:n].copy()

    def weight(self, a: int, b: int, c: int) -> float:
        return float(K.weight_of(self.base, self.ov, self.prm, int(a), int(b), int(c)))

    @property
    def n_contexts(self) -> int:
        return int(len(self.base[1]))

    @property
    def n_entries(self) -> int:
        return int(len(self.base[3]))
