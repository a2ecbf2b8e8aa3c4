"""The Redis-shared adaptive state: every process's tri-gram deltas, merged across the fleet.

Layout under one namespace ``aded:{<tenant>/<store id>}`` (a hash tag: the keys live in one cluster slot).
The tenant (default ``default``; a Serve deployment passes its application name, or its ``namespace`` arg)
keeps deployments from sharing drafting state unless they are configured with the same namespace:

- ``...:counts`` a hash ``field -> count``; a field is 12 bytes, the context key ``a*V+b`` (int64) and the
  successor (int32), little-endian. The merged state: what a new process warm-starts from.
- ``...:log`` a stream of delta batches ``{w: writer id, d: packed arrays}`` (int64 keys, int32 successors,
  int32 counts: numbers only, decoded with numpy, never unpickled or evaluated), trimmed to a bounded length.
- ``...:meta`` a hash naming the model the state belongs to (tokenizer fingerprint, vocabulary size, model,
  recycle width, combiner features): a process whose own differ refuses the namespace
  (:class:`StoreMismatch`) instead of drafting from another model's state.
- ``...:rec``, ``...:rlog``, ``...:comb``: the model's recycled predictions and the learned combiner weights
  (:mod:`aded_ray.store.model_state`, merge rules there).
- ``...:hist`` a stream of finished requests' token ids ``{w, t: int32 array}``, trimmed to ``hist_maxlen``
  entries and ``retention_s`` seconds: the fleet's shared history, which a drafter with a ``remember`` method
  (the best-first drafter) matches. ``share_history=False`` neither writes nor reads it.

Retention: both streams drop entries older than ``retention_s`` (``XTRIM MINID``) and expire when nobody
writes for that long; the merged counts expire after ``state_ttl_s`` without writes (0: never).

One Lua script (``register_script``: EVALSHA, reloaded on NOSCRIPT) merges a batch atomically: HINCRBY of
every field, clamped at ``max_count`` (counts past the point where the weight cap binds change nothing), and
the XADD of the same batch. Integer increments commute, so any interleaving of writers gives the same totals.

Process side (:class:`SharedStore`): the decode thread only touches local memory. ``record`` appends the
step's own bumps to an outbox; ``drain`` applies batches that the background thread pulled from the log.
The background thread flushes the outbox in bounded batches every ``flush_interval_s`` and pulls the others'
batches every ``pull_interval_s``. When Redis is down or slow, decoding goes on with local state; the outbox
keeps up to ``max_buffer`` entries (older ones are dropped and counted) and is flushed after reconnection.
The merged state is loaded by the background thread too: a process starts while Redis is down (only a wrong
password fails the constructor, after one bounded attempt), decodes on its local state, and catches up
(loads the merged counts, then flushes what it learnt meanwhile) once Redis answers.
"""
from __future__ import annotations

import collections
import logging
import os
import re
import threading
import time
import uuid

import numpy as np

log = logging.getLogger(__name__)


class StoreMismatch(ValueError):
    """The namespace holds the state of another model (tokenizer, vocabulary, model or table shapes)."""


# KEYS: meta. ARGV: ttl ms, field1, value1, ...: set once (the first process), then returned as it is
_META_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('HSET', KEYS[1], unpack(ARGV, 2)) end
if tonumber(ARGV[1]) > 0 then redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1])) end
return redis.call('HGETALL', KEYS[1])
"""
_TENANT = re.compile(r"[A-Za-z0-9_.-]{1,64}")

# KEYS: counts, log, applied (writer -> last applied batch number)
# ARGV: writer, batch number, max_count, max_fields, stream_maxlen, state ttl ms, log ttl ms,
#       field1, count1, ..., fieldN, countN, packed batch
# A batch whose number is not above the writer's last applied one was applied already (its reply was lost):
# it is acknowledged without applying it again, so a retried batch counts exactly once.
_FLUSH_LUA = """
local last = tonumber(redis.call('HGET', KEYS[3], ARGV[1]) or '0')
if tonumber(ARGV[2]) <= last then return -2 end
if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[4]) then return -1 end
local maxc = tonumber(ARGV[3])
for i = 8, #ARGV - 1, 2 do
  local v = redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1])
  if v > maxc then redis.call('HSET', KEYS[1], ARGV[i], maxc) end
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'w', ARGV[1], 'd', ARGV[#ARGV])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
local ttl = tonumber(ARGV[6])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('PEXPIRE', KEYS[3], ttl)
end
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[7]))
return (#ARGV - 8) / 2
"""


def pack(keys: np.ndarray, toks: np.ndarray, counts: np.ndarray) -> bytes:
    n = np.array([keys.shape[0]], "<i8")
    return n.tobytes() + keys.astype("<i8").tobytes() + toks.astype("<i4").tobytes() + counts.astype("<i4").tobytes()


def unpack(blob: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode a packed batch; raises ``ValueError`` on a malformed blob (never trusted blindly)."""
    if len(blob) < 8:
        raise ValueError("delta batch shorter than its header")
    n = int(np.frombuffer(blob[:8], "<i8")[0])
    if n < 0 or len(blob) != 8 + 16 * n:
        raise ValueError(f"delta batch of {len(blob)} bytes does not hold {n} entries")
    keys = np.frombuffer(blob, "<i8", n, 8).astype(np.int64)
    toks = np.frombuffer(blob, "<i4", n, 8 + 8 * n).astype(np.int32)
    counts = np.frombuffer(blob, "<i4", n, 8 + 12 * n).astype(np.int64)
    return keys, toks, counts


def fields(keys: np.ndarray, toks: np.ndarray) -> list[bytes]:
    rec = np.empty(keys.shape[0], dtype=[("k", "<i8"), ("t", "<i4")])
    rec["k"], rec["t"] = keys, toks
    raw = rec.tobytes()
    return [raw[12 * i:12 * i + 12] for i in range(keys.shape[0])]


def aggregate(keys, toks, counts, vocab_size: int):
    """Sum duplicate (key, successor) entries."""
    if keys.shape[0] == 0:
        return keys, toks, counts
    code = keys.astype(np.int64) * vocab_size + toks
    uniq, inv = np.unique(code, return_inverse=True)
    summed = np.bincount(inv, weights=counts, minlength=uniq.shape[0]).astype(np.int64)
    return uniq // vocab_size, (uniq % vocab_size).astype(np.int32), summed


class SharedStore:
    """Connects one process's :class:`TrigramMatrix` to the fleet's shared deltas in Redis."""

    def __init__(self, matrix, url: str | None = None, *, drafter=None, namespace: str | None = None,
                 tenant: str = "default", share_history: bool = True,
                 hist_maxlen: int = 1000, hist_warm: int = 500, max_request_tokens: int = 65536,
                 retention_s: float = 3600.0, state_ttl_s: float = 7 * 86400.0,
                 flush_interval_s: float = 0.2, pull_interval_s: float = 0.2, batch_max: int = 8192,
                 max_buffer: int = 1_000_000, stream_maxlen: int = 100_000, max_fields: int = 20_000_000,
                 socket_timeout_s: float = 0.5, start: bool = True, share_model: bool = True,
                 share_combiner: bool = True, combiner_interval_s: float = 1.0, model: str | None = None,
                 max_recycle_fields: int = 500_000):
        import redis
        from redis.backoff import ExponentialBackoff
        from redis.retry import Retry

        url = url or os.environ.get("ADED_REDIS_URL")
        if not url:
            raise ValueError("no Redis URL: pass url= or set ADED_REDIS_URL (redis://, rediss:// for TLS)")
        if not _TENANT.fullmatch(tenant):
            raise ValueError(f"tenant {tenant!r}: 1 to 64 of A-Z a-z 0-9 _ . -")
        password = os.environ.get("ADED_REDIS_PASSWORD")
        self.matrix = matrix
        self.V = matrix.vocab_size
        store_id = namespace or f"{matrix.meta.get('tokenizer', 'tok')}-{matrix.meta.get('corpus_id', '')}" \
            f"{matrix.n_contexts}-{matrix.n_entries}-{self.V}"
        self.tenant = tenant
        self.ns = f"aded:{{{tenant}/{store_id}}}"
        self.k_counts, self.k_log, self.k_hist = f"{self.ns}:counts", f"{self.ns}:log", f"{self.ns}:hist"
        self.k_applied, self.k_meta = f"{self.ns}:applied", f"{self.ns}:meta"
        self.refused: str | None = None
        self.share_history = share_history
        self.hist_maxlen, self.hist_warm, self.max_request_tokens = hist_maxlen, hist_warm, max_request_tokens
        self.retention_ms, self.state_ttl_ms = int(retention_s * 1000), int(state_ttl_s * 1000)
        self._hist_out: collections.deque = collections.deque(maxlen=1000)
        self._hist_in: collections.deque = collections.deque(maxlen=hist_warm + 1000)
        self.last_hist_id = b"0-0"
        self.writer = uuid.uuid4().hex[:12].encode()
        self.flush_interval_s, self.pull_interval_s = flush_interval_s, pull_interval_s
        self.batch_max, self.max_buffer, self.stream_maxlen = batch_max, max_buffer, stream_maxlen
        self.max_fields = max_fields
        self.max_count = int(np.ceil(matrix.prm[2] / matrix.prm[1]))   # cap / increment: more changes nothing
        kw = dict(socket_timeout=socket_timeout_s, socket_connect_timeout=socket_timeout_s,
                  retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 2), health_check_interval=10)
        if password:
            kw["password"] = password
        self.redis = redis.Redis.from_url(url, **kw)
        self._flush = self.redis.register_script(_FLUSH_LUA)
        self._meta_script = self.redis.register_script(_META_LUA)
        self.model_sync = None
        if share_model and hasattr(drafter, "recycle") and hasattr(drafter, "combiner"):
            from aded_ray.store.model_state import ModelStateSync

            self.model_sync = ModelStateSync(self, drafter, share_combiner=share_combiner,
                                             combiner_interval_s=combiner_interval_s, max_fields=max_recycle_fields)
        self.meta = {"format": "1", "tokenizer": str(matrix.meta.get("tokenizer", "")), "vocab_size": str(self.V),
                     "model": str(model or matrix.meta.get("model", "")),
                     "recycle_k": str(self.model_sync.k) if self.model_sync else "",
                     "n_feat": str(drafter.combiner.w.shape[0]) if self.model_sync else ""}
        self._outbox: collections.deque = collections.deque()
        self._outbox_n = 0
        self._inbox: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.stats = {"redis_up": 0, "flushed_entries": 0, "dropped_entries": 0, "applied_entries": 0,
                      "errors": 0, "outages": 0, "resyncs": 0, "full_rejections": 0, "bad_batches": 0,
                      "warm_starts": 0, "recorded_counts": 0, "flushed_counts": 0, "duplicates_skipped": 0}
        self._seq = 0
        self._retry = None             # (args, entries, counts) of the batch whose send failed
        self.last_id = b"0-0"
        self._down_since: float | None = None
        self.synced = False            # the merged state has been loaded
        self._collect: list | None = None   # own entries recorded since a reset was queued (see _load_merged)
        self._reset_gen = 0
        self._next_retain = 0.0
        if start:
            self._check_credentials()
        else:
            self._connect_and_warm_start()
        matrix.journal = self
        self.drafter = drafter if share_history and hasattr(drafter, "remember") else None
        if self.drafter is not None:
            self.drafter.journal = self
        self._thread = threading.Thread(target=self._loop, name="aded-redis-store", daemon=True)
        if start:
            self._thread.start()

    # ---- decode-thread side (local memory only) ------------------------------------------------
    def record(self, keys: np.ndarray, toks: np.ndarray, counts: np.ndarray | None = None) -> None:
        """The process's own bumps (already applied locally): one count each unless ``counts`` is given."""
        if keys.shape[0] == 0:
            return
        counts = np.ones(keys.shape[0], np.int64) if counts is None else np.asarray(counts, np.int64)
        with self._lock:
            self.stats["recorded_counts"] += int(counts.sum())
            part = (np.asarray(keys, np.int64).copy(), np.asarray(toks, np.int32).copy(), counts)
            self._outbox.append(part)
            if self._collect is not None:
                self._collect.append(part)
            self._outbox_n += keys.shape[0]
            while self._outbox_n > self.max_buffer:
                k, _, _ = self._outbox.popleft()
                self._outbox_n -= k.shape[0]
                self.stats["dropped_entries"] += k.shape[0]

    def publish(self, keys, toks, counts) -> None:
        """Apply deltas locally and share them (for deltas that do not come from an adaptive update)."""
        self.matrix.apply_deltas(keys, toks, counts)
        self.record(np.asarray(keys, np.int64), np.asarray(toks, np.int32), counts)

    def record_request(self, tokens) -> None:
        """A finished request of this process (its tokens), to share as history."""
        if not self.share_history:
            return
        t = np.asarray(tokens, np.int32)[-self.max_request_tokens:]
        if t.shape[0]:
            self._hist_out.append(t.copy())

    def drain_history(self, drafter) -> None:
        """Give the other processes' finished requests to the drafter's history (decode thread)."""
        while self._hist_in:
            drafter.remember(self._hist_in.popleft(), share=False)

    def drain(self) -> None:
        """Apply the other processes' batches pulled so far (called before each adaptive update)."""
        while self._inbox:
            keys, toks, counts = self._inbox.popleft()
            if isinstance(keys, str):
                # "reset": the merged state (queued next) replaces the local one, plus this process's own
                # entries that the merged snapshot lacks: those unsent when it was taken (``toks``) and those
                # recorded since
                with self._lock:
                    if counts != self._reset_gen:
                        continue       # a newer reset was queued after this one: it replaces this one
                    pending = list(toks) + (self._collect or [])
                    self._collect = None
                self.matrix.reset_deltas()
                for k, t, c in pending:
                    self.matrix.apply_deltas(k, t, c)
                continue
            self.matrix.apply_deltas(keys, toks, np.minimum(counts, self.max_count))
            self.stats["applied_entries"] += keys.shape[0]
        if self.model_sync is not None and self.synced:
            self.model_sync.drain()

    # ---- background side ------------------------------------------------------------------------
    def _credential_error(self, e) -> ValueError | None:
        import redis

        if isinstance(e, redis.AuthenticationError) or (
                isinstance(e, redis.ResponseError) and ("NOAUTH" in str(e) or "WRONGPASS" in str(e))):
            return ValueError(f"Redis rejected the credentials for the shared store: {e}")
        return None

    def _check_credentials(self) -> None:
        """One bounded PING: a wrong password fails now; an unreachable server is an outage to ride out."""
        try:
            self.redis.ping()
            self.stats["redis_up"] = 1
        except Exception as e:  # noqa: BLE001
            bad = self._credential_error(e)
            if bad is not None:
                raise bad from e
            self._outage(e, "at start: serving on local state until it answers")
            return
        try:
            self._check_model()
        except StoreMismatch:
            raise
        except Exception as e:  # noqa: BLE001
            bad = self._credential_error(e)
            if bad is not None:
                raise bad from e
            self._outage(e, "at start: serving on local state until it answers")

    def _connect_and_warm_start(self) -> None:
        """Load the merged state now; raises on a wrong password or an unreachable server."""
        try:
            self._load_merged()
        except Exception as e:
            bad = self._credential_error(e)
            if bad is not None:
                raise bad from e
            raise

    def _check_model(self) -> None:
        """Claim the namespace for this model, or raise :class:`StoreMismatch` if it holds another's state."""
        args = [max(self.state_ttl_ms, self.retention_ms)]
        for k, v in self.meta.items():
            args += [k, v]
        got = self._meta_script(keys=[self.k_meta], args=args)
        theirs = {got[i].decode(errors="replace"): got[i + 1].decode(errors="replace") for i in range(0, len(got) - 1, 2)}
        diff = [f"{k} {theirs[k]!r} (this process: {v!r})" for k, v in self.meta.items()
                if v and theirs.get(k) and theirs[k] != v]
        if diff:
            raise StoreMismatch(f"shared store {self.ns} holds the state of another model: " + ", ".join(diff)
                                + "; refusing it (configure another namespace, or delete that one)")

    def _outage(self, e, what: str = "") -> None:
        self.stats["errors"] += 1
        self.stats["redis_up"] = 0
        if self._down_since is None:
            self._down_since = time.monotonic()
            self.stats["outages"] += 1
            log.warning("Redis shared store %s unavailable %s(%s: %s): decoding continues on local state",
                        self.ns, what + " " if what else "", type(e).__name__, e)

    def _load_merged(self, reset: bool = False) -> None:
        """Queue the merged hash (atomically with the log position it corresponds to)."""
        if not self.synced:
            self._check_model()
        with self.redis.pipeline(transaction=True) as p:
            p.hgetall(self.k_counts)
            p.xrevrange(self.k_log, count=1)
            merged, last = p.execute()
        good = []
        for f, v in merged.items():
            try:
                if len(f) == 12:
                    good.append((f, int(v)))
            except ValueError:
                pass
        self.stats["bad_batches"] += len(merged) - len(good)
        if reset:   # (flushes run on this thread too: nothing is sent between the snapshot and this)
            with self._lock:
                unsent = list(self._outbox) + (list(self._retry[3]) if self._retry is not None else [])
                self._reset_gen += 1
                self._inbox.clear()
                self._inbox.append(("reset", unsent, self._reset_gen))
                self._collect = []
        if good:
            rec = np.frombuffer(b"".join(f for f, _ in good), dtype=[("k", "<i8"), ("t", "<i4")])
            counts = np.array([c for _, c in good], np.int64)
            self._inbox.append((rec["k"].astype(np.int64), rec["t"].astype(np.int32), counts))
        self.last_id = last[0][0] if last else b"0-0"
        if not self.synced and self.share_history:   # first load: the most recent shared requests become history
            recent = self.redis.xrevrange(self.k_hist, count=self.hist_warm)
            for eid, data in reversed(recent):
                self._queue_history(data)
            self.last_hist_id = recent[0][0] if recent else b"0-0"
        if not self.synced and self.model_sync is not None:
            self.model_sync.load()
        if not self.synced:
            self.stats["warm_starts"] += 1
        self.synced = True
        self.stats["redis_up"] = 1

    def _loop(self) -> None:
        next_flush = next_pull = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            talked = False  # only a completed round trip proves Redis is up
            try:
                if not self.synced:
                    # started while Redis was down (or not yet loaded): the merged state replaces the local
                    # deltas, then the outbox (what this process learnt meanwhile) is re-applied and flushed
                    self._load_merged(reset=True)
                    log.info("Redis shared store %s: merged state loaded", self.ns)
                    talked = True
                if now >= next_flush:
                    self.flush()
                    next_flush, talked = now + self.flush_interval_s, True
                if now >= next_pull:
                    self.pull()
                    next_pull, talked = now + self.pull_interval_s, True
                if now >= self._next_retain:
                    self.retain()
                    self._next_retain = now + 10.0
                if talked:
                    if self._down_since is not None:
                        log.warning("Redis shared store %s is back after %.1f s", self.ns,
                                    time.monotonic() - self._down_since)
                        self._down_since = None
                    self.stats["redis_up"] = 1
            except StoreMismatch as e:
                log.error("%s: this process decodes on its local state and shares nothing", e)
                self.refused, self.stats["redis_up"] = str(e), 0
                return
            except Exception as e:  # noqa: BLE001 - any failure: stay local, retry later
                bad = self._credential_error(e)
                if bad is not None and self._down_since is None:
                    log.error("%s: sharing stops until the credentials are fixed", bad)
                self._outage(e)
                next_flush = next_pull = time.monotonic() + min(1.0, self.flush_interval_s * 4)
            self._stop.wait(min(self.flush_interval_s, self.pull_interval_s) / 2)

    def retain(self) -> None:
        """Drop stream entries older than the retention; let idle keys expire."""
        min_id = f"{max(0, int(time.time() * 1000) - self.retention_ms)}-0"
        with self.redis.pipeline(transaction=False) as p:
            p.xtrim(self.k_log, minid=min_id, approximate=False)
            p.xtrim(self.k_hist, minid=min_id, approximate=False)
            p.execute()

    def _queue_history(self, data) -> None:
        if data.get(b"w") == self.writer:
            return
        raw = data.get(b"t", b"")
        if len(raw) % 4 or len(raw) > 4 * self.max_request_tokens:
            self.stats["bad_batches"] += 1
            return
        t = np.frombuffer(raw, "<i4").astype(np.int32)
        if t.shape[0] and (t.min() < 0 or t.max() >= self.V):
            self.stats["bad_batches"] += 1
            return
        self._hist_in.append(t)

    def flush(self) -> int:
        """Send the outbox in bounded batches, each exactly once: a batch whose send failed is retried as it
        was (same number) before any other, and the script skips one that Redis had applied already."""
        while self._hist_out:
            t = self._hist_out[0]
            with self.redis.pipeline(transaction=False) as p:
                p.xadd(self.k_hist, {"w": self.writer, "t": t.astype("<i4").tobytes()},
                       maxlen=self.hist_maxlen, approximate=True)
                p.pexpire(self.k_hist, self.retention_ms)
                p.execute()
            self._hist_out.popleft()
        if self.model_sync is not None:
            self.model_sync.flush()
        sent = 0
        while True:
            if self._retry is None:
                with self._lock:
                    if not self._outbox:
                        return sent
                    parts, n = [], 0
                    while self._outbox and n < self.batch_max:
                        part = self._outbox.popleft()
                        parts.append(part)
                        n += part[0].shape[0]
                    self._outbox_n -= n
                k2, t2, c2 = aggregate(np.concatenate([p[0] for p in parts]),
                                       np.concatenate([p[1] for p in parts]),
                                       np.concatenate([p[2] for p in parts]), self.V)
                self._seq += 1
                args = [self.writer, self._seq, self.max_count, self.max_fields, self.stream_maxlen,
                        self.state_ttl_ms, self.retention_ms]
                for f, c in zip(fields(k2, t2), c2.tolist()):
                    args += [f, c]
                args.append(pack(k2, t2, c2))
                self._retry = (args, n, int(c2.sum()), parts)
            args, n, total, _ = self._retry
            r = self._flush(keys=[self.k_counts, self.k_log, self.k_applied], args=args)  # raises: kept for retry
            self._retry = None
            if r == -1:
                self.stats["full_rejections"] += 1
                self.stats["dropped_entries"] += n
            else:
                self.stats["flushed_entries"] += n
                self.stats["flushed_counts"] += total
                if r == -2:
                    self.stats["duplicates_skipped"] += 1
            sent += n

    def pull(self) -> int:
        """Read the log after ``last_id``; queue the other writers' batches for the decode thread."""
        got = 0
        if self.model_sync is not None:
            self.model_sync.pull()
        if self.share_history:
            resp = self.redis.xread({self.k_hist: self.last_hist_id}, count=256)
            for eid, data in (resp[0][1] if resp else []):
                self.last_hist_id = eid
                self._queue_history(data)
        if self.last_id != b"0-0":
            first = self.redis.xrange(self.k_log, count=1)
            if first and self._id_lt(self.last_id, first[0][0]) and self.redis.hlen(self.k_counts):
                # entries after last_id were trimmed away: the merged hash replaces the local deltas
                self.stats["resyncs"] += 1
                self._load_merged(reset=True)
                return got
        while True:
            resp = self.redis.xread({self.k_log: self.last_id}, count=256)
            entries = resp[0][1] if resp else []
            for eid, data in entries:
                self.last_id = eid
                if data.get(b"w") == self.writer:
                    continue
                try:
                    self._inbox.append(unpack(data.get(b"d", b"")))
                    got += 1
                except ValueError:
                    self.stats["bad_batches"] += 1
            if len(entries) < 256:
                return got

    def summary(self) -> dict:
        """The sharing state (numbers only, no text): for /health and the fault tests."""
        keys = ("redis_up", "recorded_counts", "flushed_counts", "flushed_entries", "dropped_entries", "outages",
                "resyncs", "warm_starts", "duplicates_skipped", "errors")
        return {"namespace": self.tenant, "writer": self.writer.decode(), "synced": self.synced,
                "refused": self.refused is not None,
                "outbox": self._outbox_n + (self._retry[1] if self._retry is not None else 0),
                **{k: self.stats[k] for k in keys}}

    @staticmethod
    def _id_lt(a: bytes, b: bytes) -> bool:
        am, an = (int(x) for x in a.split(b"-"))
        bm, bn = (int(x) for x in b.split(b"-"))
        return (am, an) < (bm, bn)

    def close(self, flush: bool = True) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        if flush:
            try:
                self.flush()
            except Exception as e:  # noqa: BLE001
                log.warning("final flush to Redis failed: %s", e)
        self.matrix.journal = None
        if self.model_sync is not None:
            self.model_sync.close()
        self.redis.close()
