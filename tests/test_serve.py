"""End to end: Ray on loopback with the proxy guard + a password-protected Redis, the app deployed from
deployments/aded.yaml with 2 replicas (aded_ray.serve.local, as `make serve` runs it)."""
import concurrent.futures as cf
import json
import time

import numpy as np
import pytest
import requests

pytestmark = [pytest.mark.slow, pytest.mark.model]


@pytest.fixture(scope="module")
def served(serve_with):
    from ray import serve

    with serve_with("serve", num_replicas=2, num_cpus=0.5, max_running=1, max_waiting=2, max_queued_requests=4,
                    max_new_tokens=256) as (svc, store):
        yield {"base": svc.base, "serve": serve, "store": store, "redis": svc.redis, "svc": svc}


@pytest.fixture(scope="module")
def reference(served):
    """Single-process greedy output in the same verify mode (the default), without speculation."""
    from aded_ray.config import EngineConfig, VerifyConfig
    from aded_ray.engine import Engine

    e = Engine(EngineConfig(store=str(served["store"]), verify=VerifyConfig(budget=0)),
               speculate=False)
    return lambda prompt, n, chat=False: "".join(c.text for c in e.generate(prompt, chat=chat, max_new_tokens=n))


PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"


def test_greedy_http_equals_single_process(served, reference):
    r = requests.post(f"{served['base']}/v1/completions",
                      json={"model": "smollm2", "prompt": PROMPT, "max_tokens": 48, "temperature": 0,
                            "return_stats": True}, timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == reference(PROMPT, 48)
    assert body["usage"]["completion_tokens"] == 48 and body["aded_stats"]["steps"] <= 48
    chat = requests.post(f"{served['base']}/v1/chat/completions",
                         json={"messages": [{"role": "user", "content": "Name three colors."}], "max_tokens": 32,
                               "temperature": 0}, timeout=120).json()
    assert chat["choices"][0]["message"]["content"] == reference("Name three colors.", 32, chat=True)


def test_streamed_chat_parses_and_ends_with_done(served):
    r = requests.post(f"{served['base']}/v1/chat/completions", stream=True, timeout=120,
                      json={"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 24,
                            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [line[len("data: "):] for line in r.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    assert any(c["choices"] and c["choices"][0]["finish_reason"] for c in chunks)


def test_python_handles(served, reference):
    h = served["serve"].get_app_handle("aded")
    text = h.remote(PROMPT, max_tokens=24, temperature=0).result()
    assert text == reference(PROMPT, 24)
    streamed = list(h.options(stream=True).remote(PROMPT, max_tokens=24, temperature=0))
    assert len(streamed) >= 1 and "".join(streamed) == text
    body = h.remote({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "temperature": 0}).result()
    assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] <= 8
    from aded_ray.serve.openai_api import CompletionRequest

    assert h.remote(CompletionRequest(prompt=PROMPT, max_tokens=24, temperature=0)).result()["choices"][0]["text"] \
        == text
    with pytest.raises(Exception, match="max_tokens"):
        h.remote(PROMPT, max_tokens=0).result()


BAD = [
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10_000}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": 9}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "top_k": -5}, 400, "top_k"),
    ("/v1/completions", {"prompt": "x", "n": 2}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "logprobs": 3}, 400, "logprobs"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"max_tokens": 5}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "bogus_field": 1}, 400, "bogus_field"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 400, None),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ("/v1/completions", {"prompt": "word " * 6000, "max_tokens": 4}, 400, "prompt"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "messages.0.content"),
    ("/v1/chat/completions", {"messages": "hello"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "presence_penalty": 1}, 400,
     "presence_penalty"),
]


def test_bad_requests_get_openai_errors_and_service_keeps_serving(served):
    for path, body, status, param in BAD:
        r = requests.post(served["base"] + path, json=body, timeout=60)
        assert r.status_code == status, (body, r.status_code, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], err
        if param is not None:
            assert err["param"] == param, (body, err)
    r = requests.post(served["base"] + "/v1/completions", data=b"{not json", timeout=60,
                      headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    ok = requests.post(served["base"] + "/v1/completions", json={"prompt": "Hello", "max_tokens": 4}, timeout=60)
    assert ok.status_code == 200
    assert requests.get(served["base"] + "/v1/models", timeout=10).json()["data"][0]["id"] == "smollm2"


def test_32_concurrent_requests_complete_or_get_503(served, reference):
    def one(i):
        r = requests.post(served["base"] + "/v1/completions", timeout=300,
                          json={"prompt": f"Count to {i}:", "max_tokens": 8, "temperature": 0})
        return i, r.status_code, r.headers.get("retry-after"), r.json()

    with cf.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32)))
    codes = [c for _, c, _, _ in results]
    # 2 replicas x (1 running + 2 waiting) admitted: the rest are told to come back, none fail otherwise
    assert set(codes) <= {200, 503}, codes
    assert codes.count(200) >= 2 and codes.count(503) >= 1, codes
    for i, code, retry, body in results:
        if code == 503:
            assert retry == "1" and body["error"]["type"] == "service_unavailable" and body["error"]["code"] == 503
        else:                                  # each admitted request got its own, correct answer
            assert body["choices"][0]["text"] == reference(f"Count to {i}:", 8), (i, body)
    assert requests.post(served["base"] + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2},
                         timeout=60).status_code == 200


def test_replicas_share_the_redis_store(served):
    import redis

    r = redis.Redis.from_url(served["redis"].url)
    deadline = time.time() + 20
    keys = []
    while time.time() < deadline:
        keys = [k for k in r.keys("aded:*:counts")]
        if keys and r.hlen(keys[0]) > 0:
            break
        time.sleep(0.5)
    assert keys and r.hlen(keys[0]) > 0          # the replicas' adaptive deltas were merged in Redis
    writers = {e[1][b"w"] for e in r.xrange(keys[0].replace(b":counts", b":log"))}
    assert len(writers) == 2                     # both replicas wrote


def health_of(served, replica=None, tries=20):
    """/health of any replica over HTTP, or of ``replica`` asked of its actor directly (Serve's router sends
    HTTP calls to the less busy replica, so a busy one could go unseen)."""
    if replica is None:
        return requests.get(served["base"] + "/health", timeout=10).json()
    for _ in range(tries):
        h = served["svc"].replica_healths().get(replica)
        if h is not None:
            return h
        time.sleep(0.5)
    raise AssertionError(f"no answer from replica {replica}")


def test_client_disconnect_stops_generation(served):
    import socket

    base = served["base"]
    host, port = base.rsplit("/", 1)[-1].split(":")
    body = json.dumps({"messages": [{"role": "user", "content": "Count from 1 to 500, comma separated."}],
                       "max_tokens": 250, "temperature": 0, "stream": True}).encode()
    s = socket.create_connection((host, int(port)), timeout=60)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    got = b""
    while b"data: " not in got:                          # generation has started streaming
        chunk = s.recv(65536)
        assert chunk, got
        got += chunk
    deadline = time.time() + 10
    while True:                                          # the replica that runs it
        h = next((h for h in served["svc"].replica_healths().values() if h["requests"]["running"]), None)
        if h is not None:
            break
        assert time.time() < deadline, "the streaming request runs on no replica"
        time.sleep(0.2)
    rid, before = h["replica"], h["requests"]
    s.close()                                            # the client goes away mid-stream
    t0 = time.time()
    while True:
        now = health_of(served, rid)["requests"]
        if now["running"] == 0:
            break
        assert time.time() - t0 < 3, f"replica {rid} kept generating after the client disconnected: {now}"
        time.sleep(0.1)
    assert now["cancelled_total"] == before["cancelled_total"] + 1 and now["finished_total"] == before["finished_total"]
    assert now["tokens_total"] - before["tokens_total"] < 200      # far from the 250 it was asked for


def test_private_requests_stay_out_of_the_shared_state(served, tokenizer):
    import redis

    from aded_ray.store.redis_store import unpack

    base, V = served["base"], len(tokenizer)
    r = redis.Redis.from_url(served["redis"].url)
    secret, public = "Quagmire zeppelin xylophone marmalade 7731.", "Pelican saxophone tundra 5517 bicycle."
    for text, private in ((secret, True), (public, False), ("Hi", False), ("Hi", False)):
        resp = requests.post(base + "/v1/chat/completions", timeout=120,
                             json={"messages": [{"role": "user", "content": f"Repeat: {text}"}], "max_tokens": 8,
                                   "temperature": 0, "private": private})
        assert resp.status_code == 200, resp.text
    (k_hist,) = r.keys("aded:*:hist")
    assert k_hist.startswith(b"aded:{aded/")                # the application's namespace

    def history():
        return [tokenizer.decode(list(np.frombuffer(d[b"t"], "<i4"))) for _, d in r.xrange(k_hist)]

    deadline = time.time() + 20
    while not any(public in t for t in history()):        # the public request reached the shared history
        assert time.time() < deadline, history()[-3:]
        time.sleep(0.3)
    assert not any(secret in t or "Quagmire" in t for t in history())

    def trigrams(text):
        ids = tokenizer(" " + text)["input_ids"][1:]
        return {(a * V + b, c) for a, b, c in zip(ids, ids[1:], ids[2:])}

    logged = set()
    for _, d in r.xrange(k_hist.replace(b":hist", b":log")):
        keys, toks, _ = unpack(d[b"d"])
        logged |= set(zip(keys.tolist(), toks.tolist()))
    assert trigrams(public) & logged                      # the adaptive counts learnt from the public text ...
    assert not trigrams(secret) & logged                  # ... and nothing from the private one
