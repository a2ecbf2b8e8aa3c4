"""The Redis-shared store against real redis-server processes started by the fixtures."""
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import redis

from aded_ray.draft.matrix import TrigramMatrix
from aded_ray.store.redis_store import SharedStore, aggregate, pack, unpack
from aded_ray.store.server import RedisServer

V = 200
WORKER = Path(__file__).with_name("store_worker.py")


@pytest.fixture
def server(tmp_path):
    s = RedisServer(tmp_path / "redis")
    yield s
    s.stop(kill=True)


@pytest.fixture
def store_file(tmp_path):
    from aded_ray.draft.build import matrix_from_token_docs

    rng = np.random.default_rng(0)
    m = matrix_from_token_docs([rng.integers(0, V, 500).tolist()], V, meta={"tokenizer": "test"})
    m.save(tmp_path / "base.tri")
    return tmp_path / "base.tri"


def wait_until(cond, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


def expected_deltas(seq_sets):
    m = TrigramMatrix.empty(V)
    for seqs in seq_sets:
        for seq in seqs:
            m.update(seq)
    k, t, c = m.deltas()
    order = np.lexsort((t, k))
    return k[order].tolist(), t[order].tolist(), c[order].tolist()


def test_pack_roundtrip_and_malformed_batches():
    k, t, c = np.array([5, 2**40], np.int64), np.array([1, 7], np.int32), np.array([3, 1], np.int64)
    k2, t2, c2 = unpack(pack(k, t, c))
    assert k2.tolist() == k.tolist() and t2.tolist() == t.tolist() and c2.tolist() == c.tolist()
    for bad in (b"", b"\x01" * 7, pack(k, t, c)[:-1], np.array([-1], "<i8").tobytes()):
        with pytest.raises(ValueError):
            unpack(bad)
    ak, at, ac = aggregate(np.array([3, 3, 4]), np.array([1, 1, 1], np.int32), np.array([1, 2, 5]), 10)
    assert (ak.tolist(), at.tolist(), ac.tolist()) == ([3, 4], [1, 1], [3, 5])


def test_three_processes_converge_and_a_fourth_warm_starts(server, store_file, tmp_path):
    rng = np.random.default_rng(1)
    sets = [[rng.integers(0, V, int(rng.integers(5, 40))).tolist() for _ in range(30)] for _ in range(3)]
    procs = []
    for i, seqs in enumerate(sets):
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(store_file), server.url, "3", json.dumps(seqs),
                                       str(tmp_path / f"out{i}.json")]))
    for p in procs:
        assert p.wait(120) == 0
    exp = expected_deltas(sets)
    assert len(exp[0]) > 200
    for i in range(3):
        got = json.loads((tmp_path / f"out{i}.json").read_text())
        assert (got["keys"], got["toks"], got["counts"]) == exp, f"worker {i} did not converge"
        assert got["stats"]["dropped_entries"] == 0 and got["stats"]["errors"] == 0
    # a fresh process warm-starts from the merged hash alone
    fourth = subprocess.run([sys.executable, str(WORKER), str(store_file), server.url, "3", "[]",
                             str(tmp_path / "out3.json")], timeout=120)
    assert fourth.returncode == 0
    got = json.loads((tmp_path / "out3.json").read_text())
    assert (got["keys"], got["toks"], got["counts"]) == exp
    # the merged weights are what a single process seeing all traffic would have
    single = TrigramMatrix.load(store_file)
    shared = TrigramMatrix.load(store_file)
    for seqs in sets:
        for seq in seqs:
            single.update(seq)
    shared.apply_deltas(np.array(got["keys"]), np.array(got["toks"]), np.array(got["counts"]))
    for a in range(0, V, 7):
        for b in range(0, V, 5):
            assert single.successors(a, b)[1].tolist() == shared.successors(a, b)[1].tolist()


def test_outage_buffers_then_flushes_after_reconnect(tmp_path, store_file):
    srv = RedisServer(tmp_path / "r1")
    port = srv.port
    m = TrigramMatrix.load(store_file)
    s = SharedStore(m, srv.url, flush_interval_s=0.02, pull_interval_s=0.02, socket_timeout_s=0.2)
    m.update([1, 2, 3, 4])
    assert wait_until(lambda: s.stats["flushed_entries"] == 2)
    srv.stop(kill=True)
    for i in range(20):                                  # decoding goes on: updates are local
        m.update([5, 6, 7 + i])
    assert wait_until(lambda: s.stats["redis_up"] == 0 and s.stats["outages"] == 1)
    assert m.weight(5, 6, 7) == pytest.approx(0.04)
    srv2 = RedisServer(tmp_path / "r2", port=port)       # back on the same address, empty (no persistence)
    try:
        r = redis.Redis(port=port)
        assert wait_until(lambda: s.stats["redis_up"] == 1 and r.hlen(s.k_counts) == 20, timeout=15)
        assert not s._outbox                             # every buffered delta reached Redis
        assert s.stats["outages"] == 1 and s.stats["dropped_entries"] == 0
    finally:
        s.close()
        srv2.stop(kill=True)


def test_buffer_bound_drops_and_counts(tmp_path, store_file):
    srv = RedisServer(tmp_path / "r")
    m = TrigramMatrix.load(store_file)
    s = SharedStore(m, srv.url, max_buffer=10, start=False)
    srv.stop(kill=True)
    for i in range(10):
        m.update([1, 2, 3, 4])                           # 2 entries per update, never flushed
    assert s.stats["dropped_entries"] == 10 and s._outbox_n == 10
    s.close(flush=False)


def test_append_only_persistence_keeps_the_merged_state(tmp_path, store_file):
    srv = RedisServer(tmp_path / "aof", appendonly=True)
    port = srv.port
    m = TrigramMatrix.load(store_file)
    s = SharedStore(m, srv.url, start=False)
    m.update([9, 8, 7, 6, 5])
    s.flush()
    s.close()
    redis.Redis(port=port).bgrewriteaof()
    time.sleep(0.5)
    srv.stop()                                           # SIGTERM: AOF is fsynced on shutdown
    srv = RedisServer(tmp_path / "aof", port=port, appendonly=True)
    try:
        fresh = TrigramMatrix.load(store_file)
        s2 = SharedStore(fresh, srv.url, start=False)
        s2.drain()
        assert fresh.weight(9, 8, 7) == pytest.approx(m.weight(9, 8, 7)) and fresh.deltas()[2].sum() == 3
        s2.close()
    finally:
        srv.stop(kill=True)


def test_wrong_password_is_a_clear_error(tmp_path, store_file):
    srv = RedisServer(tmp_path / "pw", password="s3cret")
    try:
        with pytest.raises(ValueError, match="credentials"):
            SharedStore(TrigramMatrix.load(store_file), f"redis://:wrong@127.0.0.1:{srv.port}/0")
        with pytest.raises(ValueError, match="credentials"):
            SharedStore(TrigramMatrix.load(store_file), f"redis://127.0.0.1:{srv.port}/0")
        ok = SharedStore(TrigramMatrix.load(store_file), srv.url, start=False)
        ok.close()
    finally:
        srv.stop(kill=True)


def test_hostile_entries_are_rejected_or_bounded(server, store_file):
    m = TrigramMatrix.load(store_file)
    s = SharedStore(m, server.url, start=False)
    r = redis.Redis.from_url(server.url)
    r.xadd(s.k_log, {"w": b"evil", "d": b"not numbers at all"})
    r.xadd(s.k_log, {"w": b"evil", "d": pack(np.array([1 * V + 2]), np.array([3], np.int32), np.array([2**30]))})
    s.pull()
    s.drain()
    assert s.stats["bad_batches"] == 1
    assert m.deltas()[2].max() == s.max_count == 75      # clamped: past 75 bumps the 3.0 cap binds anyway
    assert m.weight(1, 2, 3) == pytest.approx(3.0)
    s.close(flush=False)


@pytest.mark.model
def test_redis_killed_mid_decoding_changes_nothing(tmp_path, model, tokenizer, corpus_matrix):
    import torch

    from aded_ray.bench.traces import chat_ids
    from aded_ray.decode import generate_ids
    from aded_ray.draft.best import BestDrafter
    from aded_ray.verify.target import TreeVerifier

    ids = chat_ids(tokenizer, [{"role": "user", "content": "Write a Python function that reverses a string."}])
    ref = model.generate(torch.tensor([ids]), max_new_tokens=60, do_sample=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)[0, len(ids):].tolist()
    path = tmp_path / "corpus.tri"
    corpus_matrix.save(path)
    m = TrigramMatrix.load(path)
    srv = RedisServer(tmp_path / "r1")
    port = srv.port
    s = SharedStore(m, srv.url, flush_interval_s=0.02, pull_interval_s=0.02, socket_timeout_s=0.2)
    out, srv2 = [], None
    try:
        for i, chunk in enumerate(generate_ids(TreeVerifier(model), BestDrafter(m), ids, max_new_tokens=60,
                                               eos_ids=[tokenizer.eos_token_id])):
            out += chunk
            if i == 3:
                srv.stop(kill=True)                          # Redis dies mid-request
        assert out == ref[:len(out)] and len(out) == len(ref)
        assert wait_until(lambda: s.stats["redis_up"] == 0)
        assert wait_until(lambda: s._outbox_n > 0)         # (a batch being retried is out of the outbox)
        buffered = s._outbox_n
        srv2 = RedisServer(tmp_path / "r2", port=port)
        assert wait_until(lambda: not s._outbox and s.stats["redis_up"] == 1, timeout=15)
        r = redis.Redis(port=port)
        merged = sum(int(v) for v in r.hgetall(s.k_counts).values())
        assert merged >= buffered                            # the buffered deltas reached the new server
    finally:
        s.close(flush=False)
        srv.stop(kill=True)
        if srv2 is not None:
            srv2.stop(kill=True)


def test_finished_requests_are_shared_as_fleet_history(server, store_file):
    from aded_ray.draft.best import BestDrafter

    a_m, b_m = TrigramMatrix.load(store_file), TrigramMatrix.load(store_file)
    a, b = BestDrafter(a_m), BestDrafter(b_m)
    sa = SharedStore(a_m, server.url, drafter=a, flush_interval_s=0.02, pull_interval_s=0.02)
    sb = SharedStore(b_m, server.url, drafter=b, flush_interval_s=0.02, pull_interval_s=0.02)
    try:
        first = [11, 12, 150, 151, 152, 153, 154, 155]
        a.observe(first)
        a.observe([7, 7])                              # a new request: the first joins a's history, shared
        assert wait_until(lambda: len(sb._hist_in) == 1)
        b.observe([9, 9, 151, 152])                     # b takes the fleet history in before it drafts
        assert b.history.n == len(first)
        assert b.draft([9, 9, 151, 152], 3).token_paths()[0][:3] == [153, 154, 155]
        late = TrigramMatrix.load(store_file)           # a replica started later warm-starts the history too
        c = BestDrafter(late)
        sc = SharedStore(late, server.url, drafter=c, start=False)
        c.observe([1, 2])
        assert c.history.n == len(first)
        sc.close(flush=False)
        r = redis.Redis.from_url(server.url)
        r.xadd(sa.k_hist, {"w": b"evil", "t": np.array([10**6], "<i4").tobytes()})   # out-of-vocabulary ids
        sb.pull()
        assert sb.stats["bad_batches"] >= 1
    finally:
        sa.close()
        sb.close()


# ---- privacy, retention, tenants, start-up without Redis, exactly-once ------------------------------------
def test_local_redis_is_private_to_its_owner(tmp_path):
    import os
    import stat

    from aded_ray.store.server import load_or_create_password

    pw_file = tmp_path / "secrets" / "password"
    pw = load_or_create_password(pw_file)
    assert len(pw) >= 32 and load_or_create_password(pw_file) == pw            # generated once, then kept
    assert stat.S_IMODE(os.stat(pw_file).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(pw_file.parent).st_mode) == 0o700
    srv = RedisServer(tmp_path / "data", password=pw, appendonly=True)
    try:
        assert stat.S_IMODE(os.stat(srv.data_dir).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(srv.conf_path).st_mode) == 0o600
        cmdline = open(f"/proc/{srv.proc.pid}/cmdline", "rb").read()
        assert pw.encode() not in cmdline                                    # not visible in `ps`
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=srv.port).ping()                                  # no password: refused
        r = redis.Redis.from_url(srv.url)
        assert r.config_get("protected-mode")["protected-mode"] == "yes"
        assert r.config_get("bind")["bind"] == "127.0.0.1"
        r.set("k", "v")
        r.bgrewriteaof()
        time.sleep(0.5)
        files = [p for p in srv.data_dir.rglob("*") if p.is_file()]
        assert files and all(not stat.S_IMODE(os.stat(p).st_mode) & 0o077 for p in files), \
            [(p, oct(os.stat(p).st_mode)) for p in files]                      # AOF included: owner only
    finally:
        srv.stop(kill=True)


def test_aded_serve_starts_redis_with_a_generated_password(tmp_path, monkeypatch):
    import os
    import stat
    import subprocess

    from aded_ray import cli

    seen = {}
    real_popen = subprocess.Popen

    def popen(cmd, **kw):                               # `serve run` is faked; redis-server really starts
        return FakeServeRun(cmd, **kw) if cmd[0].endswith("serve") else real_popen(cmd, **kw)

    class FakeServeRun:
        def __init__(self, cmd, env, preexec_fn):
            seen["env"] = env
            r = redis.Redis.from_url(env["ADED_REDIS_URL"], password=env["ADED_REDIS_PASSWORD"])
            seen["ping"] = r.ping()
            with pytest.raises(redis.AuthenticationError):
                redis.Redis.from_url(env["ADED_REDIS_URL"]).ping()

        def wait(self, timeout=None):
            return 0

    import signal

    monkeypatch.setattr(signal, "signal", lambda *a: None)  # _serve's SIGTERM handler: not in the test process
    monkeypatch.setenv("ADED_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("ADED_REDIS_URL", raising=False)
    monkeypatch.setattr(subprocess, "Popen", popen)
    assert cli.main(["serve", "deployments/aded.yaml"]) == 0
    env = seen["env"]
    assert seen["ping"] and "@" not in env["ADED_REDIS_URL"] and len(env["ADED_REDIS_PASSWORD"]) >= 32
    assert env["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] == "aded_ray.serve.proxy:middlewares"
    pw_file = tmp_path / "redis" / "password"
    assert pw_file.read_text().strip() == env["ADED_REDIS_PASSWORD"]
    assert stat.S_IMODE(os.stat(pw_file).st_mode) == 0o600


def test_tenants_do_not_share_unless_they_use_the_same_namespace(server, store_file):
    from aded_ray.draft.best import BestDrafter

    ms = [TrigramMatrix.load(store_file) for _ in range(3)]
    ds = [BestDrafter(m) for m in ms]
    a = SharedStore(ms[0], server.url, drafter=ds[0], tenant="alice", flush_interval_s=0.02, pull_interval_s=0.02)
    b = SharedStore(ms[1], server.url, drafter=ds[1], tenant="bob", flush_interval_s=0.02, pull_interval_s=0.02)
    a2 = SharedStore(ms[2], server.url, drafter=ds[2], tenant="alice", flush_interval_s=0.02, pull_interval_s=0.02)
    try:
        secret = [11, 12, 150, 151, 152, 153, 154, 155]
        ds[0].observe(secret)
        ds[0].observe([7, 7])                           # the first request is finished: history + deltas
        assert wait_until(lambda: len(a2._hist_in) == 1 and len(a2._inbox) > 0)   # the same tenant: shared
        time.sleep(0.5)
        b.pull()
        assert not b._hist_in and not [x for x in b._inbox if not isinstance(x[0], str)]  # the other: nothing
        assert b.k_counts != a.k_counts and a.k_counts == a2.k_counts
        r = redis.Redis.from_url(server.url)
        assert not r.exists(b.k_counts)
        with pytest.raises(ValueError, match="tenant"):
            SharedStore(TrigramMatrix.load(store_file), server.url, tenant="a}b", start=False)
    finally:
        for s in (a, b, a2):
            s.close()


def test_history_switch_and_retention(server, store_file):
    from aded_ray.draft.best import BestDrafter

    m = TrigramMatrix.load(store_file)
    d = BestDrafter(m)
    off = SharedStore(m, server.url, drafter=d, share_history=False, start=False)
    d.observe([1, 2, 3, 4, 5])
    d.observe([9, 9])                                   # a finished request, never published
    off.flush()
    r = redis.Redis.from_url(server.url)
    assert not r.exists(off.k_hist) and d.journal is None
    assert r.hlen(off.k_counts) > 0                      # the counts are still shared (redis_url: off stops that)
    off.close(flush=False)

    m2 = TrigramMatrix.load(store_file)
    d2 = BestDrafter(m2)
    on = SharedStore(m2, server.url, drafter=d2, tenant="retention", retention_s=2.0, state_ttl_s=60,
                     hist_maxlen=100, start=False)
    for i in range(3):
        d2.observe([20 + i, 21 + i, 22 + i])            # two finished requests
    on.flush()
    assert r.xlen(on.k_hist) == 2 and r.xlen(on.k_log) == 1
    assert 0 < r.pttl(on.k_hist) <= 2000 and 0 < r.pttl(on.k_log) <= 2000 and 0 < r.pttl(on.k_counts) <= 60_000
    time.sleep(1.2)
    d2.observe([90, 91, 92])                            # one more, 1.2 s later
    on.flush()
    assert r.xlen(on.k_hist) == 3 and r.xlen(on.k_log) == 2
    time.sleep(1.0)
    on.retain()                                         # the first ones are past the 2 s retention now
    assert r.xlen(on.k_hist) == 1 and r.xlen(on.k_log) == 1
    time.sleep(2.1)
    assert not r.exists(on.k_hist) and not r.exists(on.k_log)   # nobody wrote: the streams expired
    assert r.exists(on.k_counts)
    on.close(flush=False)


def test_a_store_started_while_redis_is_down_serves_then_syncs(tmp_path, store_file):
    from aded_ray.store.server import free_port

    port = free_port()
    m = TrigramMatrix.load(store_file)
    t0 = time.time()
    s = SharedStore(m, f"redis://127.0.0.1:{port}/0", flush_interval_s=0.02, pull_interval_s=0.02,
                    socket_timeout_s=0.2)
    assert time.time() - t0 < 2 and s.stats["redis_up"] == 0 and not s.synced   # no wait for Redis
    m.update([1, 2, 3, 4, 5])                           # decoding learns locally meanwhile
    srv = RedisServer(tmp_path / "late", port=port)
    try:
        other = TrigramMatrix.load(store_file)
        o = SharedStore(other, srv.url, start=False)     # someone else's counts were there first
        other.update([7, 8, 9])
        o.flush()
        o.close(flush=False)
        assert wait_until(lambda: s.synced and s.stats["redis_up"] == 1 and not s._outbox_n, timeout=15)
        m.update([1, 2, 3])                              # the next update drains the loaded state
        r = redis.Redis(port=port)
        assert wait_until(lambda: sum(int(v) for v in r.hgetall(s.k_counts).values()) == 3 + 1 + 1, timeout=10)
        # own (3 then 1) + the other's (1): nothing lost or doubled. Eventually: under load a slow reply can
        # make the store resync, and the decode thread applies what it pulled at its next drain
        assert wait_until(lambda: s.drain() or m.deltas()[2].sum() == 3 + 1 + 1, timeout=10), m.deltas()[2].sum()
        assert s.stats["warm_starts"] == 1
    finally:
        s.close()
        srv.stop(kill=True)


def test_a_batch_whose_reply_was_lost_counts_once(server, store_file):
    m = TrigramMatrix.load(store_file)
    s = SharedStore(m, server.url, start=False)
    real = s._flush
    calls = []

    def applied_then_lost(**kw):                        # Redis applies the batch, the reply never arrives
        calls.append(1)
        out = real(**kw)
        if len(calls) == 1:
            raise redis.ConnectionError("connection lost before the reply")
        return out

    s._flush = applied_then_lost
    m.update([1, 2, 3, 4])
    with pytest.raises(redis.ConnectionError):
        s.flush()
    assert s._retry is not None
    s.flush()                                           # the same batch again: skipped by the script
    r = redis.Redis.from_url(server.url)
    assert sum(int(v) for v in r.hgetall(s.k_counts).values()) == 2 and r.xlen(s.k_log) == 1
    assert s.stats["duplicates_skipped"] == 1 and s.stats["flushed_counts"] == s.stats["recorded_counts"] == 2
    s.close(flush=False)
