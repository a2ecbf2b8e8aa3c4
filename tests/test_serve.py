"""End to end: Ray on loopback + a real Redis, the app deployed from deployments/aded.yaml with 2 replicas."""
import concurrent.futures as cf
import json
import os
import time
from pathlib import Path

import pytest
import requests
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.model]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory, corpus_matrix):
    os.environ.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0",
                      RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S="1.0")
    import ray
    from ray import serve
    from ray.serve._private import api as serve_api
    from ray.serve.schema import ServeDeploySchema

    from aded_ray.store.server import RedisServer, free_port

    d = tmp_path_factory.mktemp("serve")
    store = d / "store.tri"
    corpus_matrix.save(store)
    redis_server = RedisServer(d / "redis")
    cfg = yaml.safe_load((ROOT / "deployments" / "aded.yaml").read_text())
    port = free_port()
    cfg["http_options"]["port"] = port
    args = cfg["applications"][0]["args"]
    args.update(num_replicas=2, num_cpus=0.5, store=str(store), redis_url=redis_server.url,
                max_ongoing_requests=2, max_queued_requests=4, max_new_tokens=256)
    schema = ServeDeploySchema.model_validate(cfg)
    ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
    client = serve_api.serve_start(http_options=schema.http_options.model_dump(),
                                   proxy_location=schema.proxy_location)
    client.deploy_apps(schema, _blocking=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while time.time() < deadline:
        try:
            if requests.get(f"{base}/health", timeout=5).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        time.sleep(1)
    yield {"base": base, "serve": serve, "store": store, "redis": redis_server}
    serve.shutdown()
    ray.shutdown()
    redis_server.stop()


@pytest.fixture(scope="module")
def reference(served):
    """Single-process greedy output in the same verify mode, without speculation."""
    from aded_ray.config import EngineConfig, VerifyConfig
    from aded_ray.engine import Engine

    e = Engine(EngineConfig(store=str(served["store"]), verify=VerifyConfig(mode="fp32-packed", budget=0)),
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


def test_32_concurrent_requests_complete_or_get_503(served):
    def one(i):
        r = requests.post(served["base"] + "/v1/completions", timeout=300,
                          json={"prompt": f"Count to {i}:", "max_tokens": 8, "temperature": 0})
        body = r.json() if r.headers.get("content-type", "").startswith("application/json") else r.text
        return r.status_code, r.headers.get("retry-after"), body

    with cf.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32)))
    codes = [c for c, _, _ in results]
    assert set(codes) <= {200, 503}, codes
    assert codes.count(200) >= 4
    for code, retry, body in results:
        if code == 503:
            assert retry == "1" and ("error" in body or "backpressure" in body)
        else:
            assert body["usage"]["completion_tokens"] >= 1
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


def test_client_disconnect_stops_generation(served):
    import socket

    host, port = served["base"].rsplit("/", 1)[-1].split(":")
    body = json.dumps({"messages": [{"role": "user", "content": "Write a long story about a dragon."}],
                       "max_tokens": 250, "temperature": 1.0, "seed": 1, "stream": True}).encode()
    s = socket.create_connection((host, int(port)), timeout=60)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    got = b""
    while b"data: " not in got:                          # generation has started streaming
        chunk = s.recv(65536)
        assert chunk, got
        got += chunk
    deadline = time.time() + 10
    while time.time() < deadline:                        # it is running on one of the replicas
        if any(requests.get(served["base"] + "/health", timeout=10).json()["generating"] for _ in range(4)):
            break
    s.close()                                            # the client goes away mid-stream
    t0 = time.time()
    quiet = 0
    while time.time() - t0 < 3 and quiet < 6:          # 250 sampled tokens would take ~7 s to finish
        quiet = quiet + 1 if not requests.get(served["base"] + "/health", timeout=10).json()["generating"] else 0
        time.sleep(0.1)
    assert quiet >= 6, "generation kept running after the client disconnected"
