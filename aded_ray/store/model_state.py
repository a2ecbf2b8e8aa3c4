"""The model's own predictions and the learned combiner, shared across the fleet through the store.

**Recycled predictions** (:mod:`aded_ray.draft.recycle`): every row of a replica's recycle table carries a
version ``(ver, writer)``. A replica's own recordings get ``ver`` from a hybrid clock,
``max(now in µs, last version + 1, highest version seen + 1)``, one distinct value per recorded position,
so its own latest recording is also the highest version it knows. **Merge rule: a row holds the entry
with the highest ``(ver, writer)`` among all entries that map to it** (last writer wins, ties broken by
writer id, a direct-mapped pair slot included). The maximum is commutative, associative and idempotent: any
order of arrival, and any retry, gives the same table. Redis keeps the same rule per context in
``...:rec`` (one Lua script compares the 16-byte big-endian ``ver|writer`` prefix); batches also go to the
stream ``...:rlog`` for the other replicas to pull.

**Combiner weights** (:mod:`aded_ray.draft.combine`): each replica publishes ``(seq, seen, w, g2)``
(``seq`` increasing per writer, ``seen`` = judged nodes it learnt from) into ``...:comb`` keyed by writer,
kept only if ``seq`` is above the stored one. The fleet's combiner is the ``seen``-weighted mean of every
writer's latest ``w`` (and AdaGrad ``g2``), summed in writer order: a function of the set of latest
entries, so the same whatever the order of arrival. A replica adopts it every ``combiner_interval_s``
(after publishing its own) and goes on learning from there (federated averaging).

Validation: entries are numbers decoded with numpy (never unpickled); a wrong size or an out-of-vocabulary
token id rejects the entry; probabilities are clamped to [0, 1], weights to ``±W_CLAMP``, ``g2`` to
``[G2_MIN, G2_MAX]``; versions beyond ``MAX_SKEW_US`` in the future are rejected (they would pin a row).
Bounded: at most ``max_fields`` contexts and ``max_writers`` combiner entries in Redis, ``max_buffer``
entries waiting locally.
"""
from __future__ import annotations

import collections
import time

import numpy as np
from numba import njit

from aded_ray.draft import recycle as R

W_CLAMP, G2_MIN, G2_MAX = 30.0, 1e-2, 1e12
MAX_SKEW_US = 60_000_000
MAX_SEEN = 1 << 50

# KEYS: rec, rlog. ARGV: writer, max_fields, maxlen, ttl ms, max prefix, packed batch, field1, value1, ...
_REC_LUA = """
local full = redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[2])
local n = 0
for i = 7, #ARGV - 1, 2 do
  local v = ARGV[i + 1]
  local pre = string.sub(v, 1, 16)
  if pre <= ARGV[5] then
    local cur = redis.call('HGET', KEYS[1], ARGV[i])
    if cur then
      if string.sub(cur, 1, 16) < pre then redis.call('HSET', KEYS[1], ARGV[i], v); n = n + 1 end
    elseif not full then redis.call('HSET', KEYS[1], ARGV[i], v); n = n + 1 end
  end
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'w', ARGV[1], 'd', ARGV[6])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[4]))
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[4]))
return n
"""
# KEYS: comb. ARGV: writer, value (8-byte big-endian seq first), max writers, ttl ms
_COMB_LUA = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then
  if string.sub(cur, 1, 8) >= string.sub(ARGV[2], 1, 8) then return 0 end
elseif redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[3]) then return -1 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[4]))
return 1
"""


@njit(cache=True)
def contexts(n_tokens, prev, inputs):
    """Context keys of the rows a recording touches: ``-(b+1)`` for the last-token row, ``a*V+b`` for the
    pair row; ``src[i]`` is the recorded position each key comes from."""
    ctx = np.empty(2 * inputs.shape[0], np.int64)
    src = np.empty(2 * inputs.shape[0], np.int64)
    n = 0
    for i in range(inputs.shape[0]):
        b = inputs[i]
        if b < 0 or b >= n_tokens:
            continue
        ctx[n], src[n] = -(b + 1), i
        n += 1
        if 0 <= prev[i] < n_tokens:
            ctx[n], src[n] = prev[i] * n_tokens + b, i
            n += 1
    return ctx[:n], src[:n]


@njit(cache=True)
def row_of(n_tokens, slot_bits, c):
    if c < 0:
        return -c - 1
    return R._slot(n_tokens, slot_bits, c // n_tokens, c % n_tokens)


@njit(cache=True)
def rows_of(n_tokens, slot_bits, ctx):
    out = np.empty(ctx.shape[0], np.int64)
    for i in range(ctx.shape[0]):
        out[i] = row_of(n_tokens, slot_bits, ctx[i])
    return out


@njit(cache=True)
def apply_entries(keys, ids, probs, lver, lwid, n_tokens, slot_bits, ctx, ver, wid, eids, eprobs):
    """Merge entries into the table: a row takes an entry whose ``(ver, wid)`` is above its own. Returns the
    highest version among the entries."""
    top = 0
    for i in range(ctx.shape[0]):
        c = ctx[i]
        row = row_of(n_tokens, slot_bits, c)
        top = max(top, ver[i])
        if ver[i] > lver[row] or (ver[i] == lver[row] and wid[i] > lwid[row]):
            keys[row] = -c - 1 if c < 0 else c
            for j in range(ids.shape[1]):
                ids[row, j] = eids[i, j]
                probs[row, j] = R.quantize(eprobs[i, j])
            lver[row], lwid[row] = ver[i], wid[i]
    return top


def pack_rec(ctx, ver, wid, eids, eprobs) -> bytes:
    n, k = eids.shape
    return (np.array([n, k], "<i8").tobytes() + ctx.astype("<i8").tobytes() + ver.astype("<i8").tobytes()
            + wid.astype("<i8").tobytes() + eids.astype("<i4").tobytes() + eprobs.astype("<f4").tobytes())


def unpack_rec(blob: bytes, k: int):
    """Decode a batch of recycled predictions; ``ValueError`` on a malformed one or another table width."""
    if len(blob) < 16:
        raise ValueError("recycle batch shorter than its header")
    n, kk = (int(x) for x in np.frombuffer(blob[:16], "<i8"))
    if kk != k or n < 0 or len(blob) != 16 + n * (24 + 8 * k):
        raise ValueError(f"recycle batch of {len(blob)} bytes does not hold {n} entries of width {k}")
    o = 16
    ctx, o = np.frombuffer(blob, "<i8", n, o).astype(np.int64), o + 8 * n
    ver, o = np.frombuffer(blob, "<i8", n, o).astype(np.int64), o + 8 * n
    wid, o = np.frombuffer(blob, "<i8", n, o).astype(np.int64), o + 8 * n
    eids, o = np.frombuffer(blob, "<i4", n * k, o).reshape(n, k).astype(np.int32), o + 4 * n * k
    eprobs = np.frombuffer(blob, "<f4", n * k, o).reshape(n, k).astype(np.float32)
    return ctx, ver, wid, eids, eprobs


def validate_rec(entries, n_tokens: int, now_us: int):
    """Keep the entries with valid context keys, token ids and versions; clamp probabilities to [0, 1]
    (NaN -> 0). Returns the kept entries and how many were rejected."""
    ctx, ver, wid, eids, eprobs = entries
    ok = ((ctx >= -n_tokens) & (ctx < n_tokens * n_tokens) & (ver > 0) & (ver <= now_us + MAX_SKEW_US)
          & (wid >= 0) & ((eids >= 0) & (eids < n_tokens)).all(1))
    p = np.nan_to_num(eprobs[ok], nan=0.0, posinf=1.0, neginf=0.0)
    return (ctx[ok], ver[ok], wid[ok], eids[ok], np.clip(p, 0.0, 1.0).astype(np.float32)), int((~ok).sum())


def pack_comb(seq: int, seen: int, w, g2) -> bytes:
    return (np.array([seq], ">i8").tobytes() + np.array([seen], "<i8").tobytes()
            + np.asarray(w, "<f8").tobytes() + np.asarray(g2, "<f8").tobytes())


def unpack_comb(blob: bytes, n_feat: int):
    """``(seq, seen, w, g2)``, validated and clamped; ``ValueError`` on a malformed entry."""
    if len(blob) != 16 + 16 * n_feat:
        raise ValueError(f"combiner entry of {len(blob)} bytes, expected {16 + 16 * n_feat}")
    seq = int(np.frombuffer(blob[:8], ">i8")[0])
    seen = int(np.frombuffer(blob[8:16], "<i8")[0])
    w = np.frombuffer(blob, "<f8", n_feat, 16).astype(np.float64)
    g2 = np.frombuffer(blob, "<f8", n_feat, 16 + 8 * n_feat).astype(np.float64)
    if seq <= 0 or not 0 <= seen <= MAX_SEEN or not (np.isfinite(w).all() and np.isfinite(g2).all()):
        raise ValueError("combiner entry with a bad sequence number, count or non-finite weights")
    return seq, seen, np.clip(w, -W_CLAMP, W_CLAMP), np.clip(g2, G2_MIN, G2_MAX)


def merge_combiners(latest: dict):
    """The fleet's combiner from ``{writer: (seq, seen, w, g2)}``: the ``seen``-weighted mean of ``w`` and
    ``g2``, summed in writer order. ``None`` when nobody has learnt anything."""
    total = sum(e[1] for e in latest.values())
    if total <= 0:
        return None
    w = np.zeros_like(next(iter(latest.values()))[2])
    g2 = np.zeros_like(w)
    for writer in sorted(latest):
        _, seen, ew, eg = latest[writer]
        w += (seen / total) * ew
        g2 += (seen / total) * eg
    return w, g2


def offer_combiner(latest: dict, writer: bytes, entry) -> bool:
    """Keep ``entry`` for ``writer`` if its sequence number is above the one held (order-independent)."""
    cur = latest.get(writer)
    if cur is not None and cur[0] >= entry[0]:
        return False
    latest[writer] = entry
    return True


class ModelStateSync:
    """Shares one drafter's recycle table and combiner through a :class:`SharedStore`'s Redis connection.
    Decode-thread side: ``record_recycle`` (the recycle table's hook) and ``drain``; background side:
    ``load``, ``flush``, ``pull`` (called by the store's thread)."""

    def __init__(self, store, drafter, *, share_combiner: bool = True, combiner_interval_s: float = 1.0,
                 max_fields: int = 500_000, max_writers: int = 256, max_buffer: int = 200_000, batch_max: int = 4096):
        self.store, self.drafter = store, drafter
        t = drafter.recycle
        self.table, self.V, self.k = t, t.n_tokens, t.ids.shape[1]
        self.lver = np.zeros(t.keys.shape[0], np.int64)
        self.lwid = np.zeros(t.keys.shape[0], np.int64)
        self.wid = int(store.writer, 16)
        self.clock = 0
        ns = store.ns
        self.k_rec, self.k_rlog, self.k_comb = f"{ns}:rec", f"{ns}:rlog", f"{ns}:comb"
        self._rec = store.redis.register_script(_REC_LUA)
        self._comb = store.redis.register_script(_COMB_LUA)
        self.max_fields, self.max_writers, self.max_buffer, self.batch_max = max_fields, max_writers, max_buffer, batch_max
        self._out: collections.deque = collections.deque()
        self._out_n = 0
        self._in: collections.deque = collections.deque()
        self.last_rid = b"0-0"
        self.share_combiner, self.combiner_interval_s = share_combiner, combiner_interval_s
        self.comb_latest: dict = {}          # writer -> (seq, seen, w, g2): the fleet's latest entries
        self._comb_seq = 0
        self._comb_out = None
        self._next_comb = 0.0
        self.stats = {"rec_recorded": 0, "rec_flushed": 0, "rec_applied": 0, "rec_rejected": 0,
                      "rec_dropped": 0, "comb_published": 0, "comb_adopted": 0, "comb_rejected": 0}
        t.journal = self
        self._warm_up()

    def _warm_up(self) -> None:
        """Compile (or load) the kernels now, not on the decode thread's first step."""
        z = np.zeros(0, np.int64)
        contexts(self.V, z, z)
        rows_of(self.V, self.table.slot_bits, z)
        apply_entries(self.table.keys, self.table.ids, self.table.probs, self.lver, self.lwid, self.V,
                      self.table.slot_bits, z, z, z, np.zeros((0, self.k), np.int32), np.zeros((0, self.k), np.float32))

    # ---- decode thread ----
    def record_recycle(self, prev, inputs, top_ids, top_p) -> None:
        ctx, src = contexts(self.V, np.asarray(prev, np.int64), np.asarray(inputs, np.int64))
        if ctx.shape[0] == 0:
            return
        base = max(time.time_ns() // 1000, self.clock + 1)
        ver = base + src                              # one version per recorded position, later ones higher
        self.clock = int(ver.max())
        k = min(self.k, top_ids.shape[1])
        eids = np.zeros((ctx.shape[0], self.k), np.int32)
        eprobs = np.zeros((ctx.shape[0], self.k), np.float32)
        eids[:, :k], eprobs[:, :k] = top_ids[src, :k], top_p[src, :k]
        rows = rows_of(self.V, self.table.slot_bits, ctx)
        self.lver[rows], self.lwid[rows] = ver, self.wid
        self._out.append((ctx, ver, np.full(ctx.shape[0], self.wid, np.int64), eids, eprobs))
        self._out_n += ctx.shape[0]
        self.stats["rec_recorded"] += ctx.shape[0]
        while self._out_n > self.max_buffer:
            self._out_n -= self._out.popleft()[0].shape[0]
            self.stats["rec_dropped"] += 1

    def apply(self, entries) -> None:
        """Merge validated entries into the table (the merge rule of the module docstring)."""
        t = self.table
        top = apply_entries(t.keys, t.ids, t.probs, self.lver, self.lwid, self.V, t.slot_bits, *entries)
        self.clock = max(self.clock, int(top))
        self.stats["rec_applied"] += entries[0].shape[0]

    def drain(self) -> None:
        while self._in:
            self.apply(self._in.popleft())
        if self.share_combiner and time.monotonic() >= self._next_comb:
            self._next_comb = time.monotonic() + self.combiner_interval_s
            c = self.drafter.combiner
            self._comb_seq += 1
            own = (self._comb_seq, int(c.seen), c.w.copy(), c.g2.copy())
            self._comb_out = own
            latest = dict(self.comb_latest)
            offer_combiner(latest, self.store.writer, own)
            merged = merge_combiners(latest) if len(latest) > 1 else None
            if merged is not None:
                c.w[:], c.g2[:] = merged
                self.stats["comb_adopted"] += 1

    # ---- background thread ----
    def _queue(self, entries) -> None:
        good, bad = validate_rec(entries, self.V, time.time_ns() // 1000)
        self.stats["rec_rejected"] += bad
        if good[0].shape[0]:
            self._in.append(good)

    def load(self) -> None:
        """Warm start: the fleet's merged predictions and combiners."""
        merged = self.store.redis.hgetall(self.k_rec)
        last = self.store.redis.xrevrange(self.k_rlog, count=1)
        self.last_rid = last[0][0] if last else b"0-0"
        width = 16 + 8 * self.k
        good = [(f, v) for f, v in merged.items() if len(f) == 8 and len(v) == width]
        self.stats["rec_rejected"] += len(merged) - len(good)
        if good:
            ctx = np.frombuffer(b"".join(f for f, _ in good), "<i8").astype(np.int64)
            vals = b"".join(v for _, v in good)
            rec = np.frombuffer(vals, dtype=[("v", ">i8"), ("w", ">i8"), ("i", "<i4", self.k), ("p", "<f4", self.k)])
            self._queue((ctx, rec["v"].astype(np.int64), rec["w"].astype(np.int64), rec["i"].astype(np.int32),
                         rec["p"].astype(np.float32)))
        self._pull_comb()

    def flush(self) -> None:
        s = self.store
        while self._out:
            parts, n = [], 0
            while self._out and n < self.batch_max:
                parts.append(self._out.popleft())
                n += parts[-1][0].shape[0]
            self._out_n -= n
            ctx, ver, wid, eids, eprobs = (np.concatenate([p[j] for p in parts]) for j in range(5))
            vals = np.empty(ctx.shape[0], dtype=[("v", ">i8"), ("w", ">i8"), ("i", "<i4", self.k), ("p", "<f4", self.k)])
            vals["v"], vals["w"], vals["i"], vals["p"] = ver, wid, eids, eprobs
            raw, fk = vals.tobytes(), ctx.astype("<i8").tobytes()
            width = vals.dtype.itemsize
            max_pre = np.array([time.time_ns() // 1000 + MAX_SKEW_US, (1 << 63) - 1], ">i8").tobytes()
            args = [s.writer, self.max_fields, s.stream_maxlen, s.retention_ms, max_pre,
                    pack_rec(ctx, ver, wid, eids, eprobs)]
            for i in range(ctx.shape[0]):
                args += [fk[8 * i:8 * i + 8], raw[width * i:width * (i + 1)]]
            try:
                self._rec(keys=[self.k_rec, self.k_rlog], args=args)
            except Exception:
                self._out.appendleft((ctx, ver, wid, eids, eprobs))   # idempotent: retried as it is
                self._out_n += n
                raise
            self.stats["rec_flushed"] += n
        if self._comb_out is not None:
            seq, seen, w, g2 = self._comb_out
            self._comb(keys=[self.k_comb], args=[s.writer, pack_comb(seq, seen, w, g2), self.max_writers,
                                                 max(s.state_ttl_ms, s.retention_ms)])
            self._comb_out = None
            self.stats["comb_published"] += 1

    def pull(self) -> None:
        s = self.store
        if self.last_rid != b"0-0":
            first = s.redis.xrange(self.k_rlog, count=1)
            if first and s._id_lt(self.last_rid, first[0][0]):
                self.load()            # trimmed past us: the merged hash (the merge is idempotent)
                return
        while True:
            resp = s.redis.xread({self.k_rlog: self.last_rid}, count=256)
            entries = resp[0][1] if resp else []
            for eid, data in entries:
                self.last_rid = eid
                if data.get(b"w") == s.writer:
                    continue
                try:
                    self._queue(unpack_rec(data.get(b"d", b""), self.k))
                except ValueError:
                    self.stats["rec_rejected"] += 1
            if len(entries) < 256:
                break
        self._pull_comb()

    def _pull_comb(self) -> None:
        if not self.share_combiner:
            return
        n_feat = self.drafter.combiner.w.shape[0]
        latest = dict(self.comb_latest)
        for writer, blob in self.store.redis.hgetall(self.k_comb).items():
            if writer == self.store.writer:
                continue
            try:
                offer_combiner(latest, writer, unpack_comb(blob, n_feat))
            except ValueError:
                self.stats["comb_rejected"] += 1
        self.comb_latest = latest     # replaced whole: the decode thread reads a consistent dict

    def close(self) -> None:
        if self.table.journal is self:
            self.table.journal = None
