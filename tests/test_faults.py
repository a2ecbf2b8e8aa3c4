"""Faults with the real service (2 replicas, Ray on loopback, a password-protected Redis with every write on
disk): Redis down when the replicas start, Redis killed and restarted under load, a replica process killed
mid-request; and what the logs say about it. The tests run in order on one service."""
import glob
import json
import os
import signal
import threading
import time
from collections import Counter, defaultdict

import numpy as np
import pytest
import redis
import requests

pytestmark = [pytest.mark.slow, pytest.mark.model]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    from aded_ray.draft.matrix import TrigramMatrix
    from aded_ray.serve.local import LocalService

    d = tmp_path_factory.mktemp("faults")
    TrigramMatrix.empty(49152).save(d / "store.tri")
    # Redis is down when the replicas start: its address is reserved, nothing listens there yet
    s = LocalService(d, redis="later", args={"num_replicas": 2, "num_cpus": 0.5, "store": str(d / "store.tri"),
                                             "max_new_tokens": 256, "flush_interval_s": 0.1, "max_running": 2,
                                             "max_waiting": 8, "compile": False})   # eager: replacements start fast
    s.start()
    yield s
    s.stop()


def healths(svc, want=2, tries=20):
    """Each replica's /health body, asked of every replica actor directly: over HTTP, Serve's router sends each
    call to the less busy replica, so under uneven load one replica can go unseen for many calls."""
    seen = {}
    for _ in range(tries):
        seen = svc.replica_healths()
        if len(seen) >= want:
            break
        time.sleep(0.5)
    assert len(seen) >= want, seen.keys()
    return seen


def wait_for(cond, timeout, what):
    t_end = time.time() + timeout
    while time.time() < t_end:
        got = cond()
        if got:
            return got
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def complete(svc, i=0, n=16, timeout=120):
    return requests.post(svc.base + "/v1/completions", timeout=timeout,
                         json={"prompt": f"Story {i}: once upon a time", "max_tokens": n, "temperature": 0.8,
                               "seed": i})


def all_flushed(svc):
    hs = healths(svc)
    ok = all(h["store"]["synced"] and h["redis_up"] and h["store"]["outbox"] == 0
             and h["store"]["flushed_counts"] == h["store"]["recorded_counts"] for h in hs.values())
    return hs if ok else None


def check_exact(svc, hs):
    """Every writer's contributions are in the log exactly once, and the merged counts are their clamped sum."""
    from aded_ray.store.redis_store import unpack

    r = redis.Redis.from_url(svc.redis.url)
    (k_counts,) = r.keys("aded:*:counts")
    k_log = k_counts.replace(b":counts", b":log")
    per_writer, total = Counter(), defaultdict(int)
    for _, data in r.xrange(k_log):
        keys, toks, counts = unpack(data[b"d"])
        per_writer[data[b"w"].decode()] += int(counts.sum())
        for k, t, c in zip(keys.tolist(), toks.tolist(), counts.tolist()):
            total[(k, t)] += c
    for h in hs.values():
        st = h["store"]
        assert st["recorded_counts"] > 0 and st["dropped_entries"] == 0, st
        assert per_writer[st["writer"]] == st["recorded_counts"], (st, per_writer)
    maxc = 75
    merged = {}
    for f, v in r.hgetall(k_counts).items():
        rec = np.frombuffer(f, dtype=[("k", "<i8"), ("t", "<i4")])[0]
        merged[(int(rec["k"]), int(rec["t"]))] = int(v)
    assert merged == {k: min(c, maxc) for k, c in total.items()}
    return sum(per_writer.values())


def test_replicas_start_and_serve_while_redis_is_down_then_sync(fleet):
    hs = healths(fleet)
    assert all(h["redis_up"] is False and h["store"]["synced"] is False for h in hs.values()), hs
    for i in range(6):                                    # they serve (and learn, locally) without Redis
        r = complete(fleet, i)
        assert r.status_code == 200, r.text
    learnt = sum(h["store"]["recorded_counts"] for h in healths(fleet).values())
    assert learnt > 0
    fleet.start_redis()                                   # Redis comes up: the replicas load and flush
    hs = wait_for(lambda: all_flushed(fleet), 30, "both replicas to sync with Redis")
    assert all(h["store"]["warm_starts"] == 1 for h in hs.values())
    assert check_exact(fleet, hs) >= learnt               # what they learnt while Redis was down is merged


def test_redis_killed_and_restarted_mid_load_loses_nothing(fleet):
    codes, stop = [], threading.Event()

    def load(w):
        i = 0
        while not stop.is_set():
            codes.append(complete(fleet, 1000 * w + i, n=12).status_code)
            i += 1

    workers = [threading.Thread(target=load, args=(w,)) for w in range(4)]
    for t in workers:
        t.start()
    restarted = False
    try:
        time.sleep(4)
        fleet.redis.stop(kill=True)                       # SIGKILL: no shutdown save
        wait_for(lambda: all(not h["redis_up"] for h in healths(fleet).values()), 20, "the outage to be seen")
        time.sleep(3)
        fleet.start_redis()                               # same address, same append-only file
        restarted = True
        time.sleep(4)
    finally:
        if not restarted:                                 # the later tests need Redis whatever happened here
            fleet.start_redis()
        stop.set()
        for t in workers:
            t.join()
    assert codes and set(codes) == {200}, Counter(codes)  # zero failed requests
    hs = wait_for(lambda: all_flushed(fleet), 30, "both replicas to flush after the restart")
    assert all(h["store"]["outages"] >= 1 for h in hs.values())
    check_exact(fleet, hs)


def replica_pid(fleet, replica_id):
    import ray

    for actor in fleet.replica_actors():
        name = ray.get(actor.__ray_call__.remote(lambda self: (os.getpid(), ray.get_runtime_context().get_actor_name())),
                       timeout=10)
        if name[1].endswith(replica_id):
            return name[0]
    raise AssertionError(f"no actor for replica {replica_id}")


def test_replica_killed_mid_request_fails_cleanly_and_is_replaced(fleet):
    r = redis.Redis.from_url(fleet.redis.url)
    (k_counts,) = r.keys("aded:*:counts")
    fields_before = r.hlen(k_counts)
    result = {}

    def long_request():
        result["r"] = requests.post(fleet.base + "/v1/completions", timeout=120,
                                    json={"prompt": "1, 2, 3, 4, 5,", "max_tokens": 256, "temperature": 0})

    t = threading.Thread(target=long_request)
    t.start()
    victim = wait_for(lambda: next((h for h in healths(fleet).values() if h["requests"]["running"]), None), 30,
                      "the request to start")["replica"]
    survivor = next(k for k in healths(fleet) if k != victim)
    os.kill(replica_pid(fleet, victim), signal.SIGKILL)
    t0 = time.time()
    t.join(60)
    assert not t.is_alive(), "the request hung after its replica died"
    resp = result["r"]
    assert resp.status_code == 502 and time.time() - t0 < 30, (resp.status_code, resp.text)
    err = resp.json()["error"]
    assert err["code"] == 502 and err["type"] == "server_error" and resp.headers.get("retry-after") == "1"
    # the service goes on: the survivor answers; Serve starts a replacement, which loads the shared state
    wait_for(lambda: complete(fleet, 7, n=4, timeout=30).status_code == 200, 60, "a request to succeed again")

    def replaced():
        try:
            h = healths(fleet, tries=40)
        except (AssertionError, requests.RequestException):
            return None
        return h if victim not in h and all(x["store"]["synced"] for x in h.values()) else None

    hs = wait_for(replaced, 180, "a replacement replica")
    assert survivor in hs
    assert r.hlen(k_counts) >= fields_before              # the store is intact


def test_logs_are_levelled_json_naming_routes_without_secrets_or_unretrieved_task_errors(fleet):
    import ray

    logs = ray._private.worker._global_node.get_session_dir_path() + "/logs"
    lines = []
    for f in glob.glob(logs + "/serve/replica_aded_ADEDServer_*.log"):
        lines += [json.loads(ln) for ln in open(f) if ln.startswith("{")]
    outage = [x for x in lines if "unavailable" in x["message"] and "Redis shared store" in x["message"]]
    assert outage and all(x["levelname"] == "WARNING" and x["asctime"] for x in outage)
    assert any(x["message"].startswith("POST /v1/completions 200") for x in lines)
    assert any(x["message"].startswith("GET /health 200") for x in lines)
    assert not any(x["message"].startswith("POST / ") for x in lines)
    assert fleet.password and len(fleet.password) >= 32
    for f in glob.glob(logs + "/**/*", recursive=True):
        if os.path.isfile(f):
            with open(f, errors="replace") as fh:
                text = fh.read()
            assert "Task exception was never retrieved" not in text, f
            assert fleet.password not in text, f"the Redis password is in {f}"
