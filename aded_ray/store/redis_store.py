"""The Redis-shared adaptive state: every process's tri-gram deltas, merged across the fleet.

Layout under one namespace ``aded:{<store id>}`` (a hash tag: both keys live in one cluster slot):

- ``...:counts`` a hash ``field -> count``; a field is 12 bytes, the context key ``a*V+b`` (int64) and the
  successor (int32), little-endian. The merged state: what a new process warm-starts from.
- ``...:log`` a stream of delta batches ``{w: writer id, d: packed arrays}`` (int64 keys, int32 successors,
  int32 counts: numbers only, decoded with numpy, never unpickled or evaluated), trimmed to a bounded length.
- ``...:hist`` a stream of finished requests' token ids ``{w, t: int32 array}``, trimmed to ``hist_maxlen``:
  the fleet's shared history, which a drafter with a ``remember`` method (the best-first drafter) matches.

One Lua script (``register_script``: EVALSHA, reloaded on NOSCRIPT) merges a batch atomically: HINCRBY of
every field, clamped at ``max_count`` (counts past the point where the weight cap binds change nothing), and
the XADD of the same batch. Integer increments commute, so any interleaving of writers gives the same totals.

Process side (:class:`SharedStore`): the decode thread only touches local memory. ``record`` appends the
step's own bumps to an outbox; ``drain`` applies batches that the background thread pulled from the log.
The background thread flushes the outbox in bounded batches every ``flush_interval_s`` and pulls the others'
batches every ``pull_interval_s``. When Redis is down or slow, decoding goes on with local state; the outbox
keeps up to ``max_buffer`` entries (older ones are dropped and counted) and is flushed after reconnection.
"""
from __future__ import annotations

import collections
import logging
import os
import threading
import time
import uuid

import numpy as np

log = logging.getLogger(__name__)

# ARGV: writer, max_count, max_fields, stream_maxlen, field1, count1, ..., fieldN, countN, packed batch
_FLUSH_LUA = """
if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[3]) then return -1 end
local maxc = tonumber(ARGV[2])
for i = 5, #ARGV - 1, 2 do
  local v = redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1])
  if v > maxc then redis.call('HSET', KEYS[1], ARGV[i], maxc) end
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'w', ARGV[1], 'd', ARGV[#ARGV])
return (#ARGV - 5) / 2
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
                 hist_maxlen: int = 2000, hist_warm: int = 500, max_request_tokens: int = 65536,
                 flush_interval_s: float = 0.2, pull_interval_s: float = 0.2, batch_max: int = 8192,
                 max_buffer: int = 1_000_000, stream_maxlen: int = 100_000, max_fields: int = 20_000_000,
                 socket_timeout_s: float = 0.5, start: bool = True):
        import redis
        from redis.backoff import ExponentialBackoff
        from redis.retry import Retry

        url = url or os.environ.get("ADED_REDIS_URL")
        if not url:
            raise ValueError("no Redis URL: pass url= or set ADED_REDIS_URL (redis://, rediss:// for TLS)")
        password = os.environ.get("ADED_REDIS_PASSWORD")
        self.matrix = matrix
        self.V = matrix.vocab_size
        store_id = namespace or f"{matrix.meta.get('tokenizer', 'tok')}-{matrix.meta.get('corpus_id', '')}" \
            f"{matrix.n_contexts}-{matrix.n_entries}-{self.V}"
        self.ns = f"aded:{{{store_id}}}"
        self.k_counts, self.k_log, self.k_hist = f"{self.ns}:counts", f"{self.ns}:log", f"{self.ns}:hist"
        self.hist_maxlen, self.hist_warm, self.max_request_tokens = hist_maxlen, hist_warm, max_request_tokens
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
        self._outbox: collections.deque = collections.deque()
        self._outbox_n = 0
        self._inbox: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.stats = {"redis_up": 0, "flushed_entries": 0, "dropped_entries": 0, "applied_entries": 0,
                      "errors": 0, "outages": 0, "resyncs": 0, "full_rejections": 0, "bad_batches": 0}
        self.last_id = b"0-0"
        self._down_since: float | None = None
        self._connect_and_warm_start()
        matrix.journal = self
        self.drafter = drafter if hasattr(drafter, "remember") else None
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
            self._outbox.append((np.asarray(keys, np.int64).copy(), np.asarray(toks, np.int32).copy(), counts))
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
            if isinstance(keys, str):  # "reset": the merged state replaces the local one, plus our outbox
                self.matrix.reset_deltas()
                with self._lock:
                    pending = list(self._outbox)
                for k, t, c in pending:
                    self.matrix.apply_deltas(k, t, c)
                continue
            self.matrix.apply_deltas(keys, toks, np.minimum(counts, self.max_count))
            self.stats["applied_entries"] += keys.shape[0]

    # ---- background side ------------------------------------------------------------------------
    def _connect_and_warm_start(self) -> None:
        """Load the merged state; raises on a wrong password or an unreachable server at start-up."""
        import redis

        try:
            self._load_merged()
        except redis.AuthenticationError as e:
            raise ValueError(f"Redis rejected the credentials for the shared store: {e}") from e
        except redis.ResponseError as e:
            if "NOAUTH" in str(e) or "WRONGPASS" in str(e):
                raise ValueError(f"Redis rejected the credentials for the shared store: {e}") from e
            raise

    def _load_merged(self, reset: bool = False) -> None:
        """Queue the merged hash (atomically with the log position it corresponds to)."""
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
        if reset:
            self._inbox.clear()
            self._inbox.append(("reset", None, None))
        if good:
            rec = np.frombuffer(b"".join(f for f, _ in good), dtype=[("k", "<i8"), ("t", "<i4")])
            counts = np.array([c for _, c in good], np.int64)
            self._inbox.append((rec["k"].astype(np.int64), rec["t"].astype(np.int32), counts))
        self.last_id = last[0][0] if last else b"0-0"
        if not reset:  # warm start: the most recent shared requests become history
            recent = self.redis.xrevrange(self.k_hist, count=self.hist_warm)
            for eid, data in reversed(recent):
                self._queue_history(data)
            self.last_hist_id = recent[0][0] if recent else b"0-0"
        self.stats["redis_up"] = 1

    def _loop(self) -> None:
        next_flush = next_pull = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            talked = False  # only a completed round trip proves Redis is up
            try:
                if now >= next_flush:
                    self.flush()
                    next_flush, talked = now + self.flush_interval_s, True
                if now >= next_pull:
                    self.pull()
                    next_pull, talked = now + self.pull_interval_s, True
                if talked:
                    if self._down_since is not None:
                        log.warning("Redis shared store is back after %.1f s", time.monotonic() - self._down_since)
                        self._down_since = None
                    self.stats["redis_up"] = 1
            except Exception as e:  # noqa: BLE001 - any failure: stay local, retry later
                self.stats["errors"] += 1
                self.stats["redis_up"] = 0
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    self.stats["outages"] += 1
                    log.warning("Redis shared store unavailable (%s): decoding continues on local state", e)
                next_flush = next_pull = time.monotonic() + min(1.0, self.flush_interval_s * 4)
            self._stop.wait(min(self.flush_interval_s, self.pull_interval_s) / 2)

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
        """Send the outbox in bounded batches; on failure the batch goes back to the outbox's front."""
        while self._hist_out:
            t = self._hist_out[0]
            self.redis.xadd(self.k_hist, {"w": self.writer, "t": t.astype("<i4").tobytes()},
                            maxlen=self.hist_maxlen, approximate=True)
            self._hist_out.popleft()
        sent = 0
        while True:
            with self._lock:
                if not self._outbox:
                    return sent
                parts, n = [], 0
                while self._outbox and n < self.batch_max:
                    part = self._outbox.popleft()
                    parts.append(part)
                    n += part[0].shape[0]
                self._outbox_n -= n
            k2, t2, c2 = aggregate(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                                   np.concatenate([p[2] for p in parts]), self.V)
            args = [self.writer, self.max_count, self.max_fields, self.stream_maxlen]
            for f, c in zip(fields(k2, t2), c2.tolist()):
                args += [f, c]
            args.append(pack(k2, t2, c2))
            try:
                r = self._flush(keys=[self.k_counts, self.k_log], args=args)
            except Exception:
                with self._lock:
                    for part in reversed(parts):
                        self._outbox.appendleft(part)  # retried after reconnection
                    self._outbox_n += n
                raise
            if r == -1:
                self.stats["full_rejections"] += 1
                self.stats["dropped_entries"] += n
            else:
                self.stats["flushed_entries"] += n
            sent += n

    def pull(self) -> int:
        """Read the log after ``last_id``; queue the other writers' batches for the decode thread."""
        got = 0
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
        self.redis.close()
