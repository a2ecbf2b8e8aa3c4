"""``aded bench-serve``: single-stream tokens/s over HTTP against the in-process engine, same run, same prompts.

Both start from the same store with fresh adaptive state and decode the same prompts greedily, one request at
a time; HTTP goes through Ray Serve's proxy to one replica (Redis sharing off, so both see the same state).
The two are interleaved prompt by prompt while the Ray cluster is up, so both run on the same machine state.
"""
from __future__ import annotations

import os
import time

import requests


def run(*, prompts: str = "mtbench", limit: int = 5, max_tokens: int = 128, store: str | None = None,
        port: int = 8123) -> dict:
    from aded_ray.config import EngineConfig, VerifyConfig
    from aded_ray.data import load_prompts
    from aded_ray.engine import Engine

    rows = load_prompts(prompts, limit)
    engine = Engine(EngineConfig(store=store, verify=VerifyConfig(mode="fp32-packed")))
    list(engine.generate("Say hello.", chat=True, max_new_tokens=8))
    engine.matrix.reset_deltas()

    os.environ.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    import ray
    from ray import serve

    from aded_ray.serve.app import build_app

    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    local_s = http_s = 0.0
    n_local = n_http = same = 0
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"store": store, "redis_url": "off", "num_cpus": 2, "mode": "fp32-packed",
                             "max_new_tokens": max(max_tokens, 16)}), name="aded", route_prefix="/")
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        requests.post(url, json={"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8,
                                 "temperature": 0}, timeout=120)
        for p in rows:
            t0 = time.perf_counter()
            chunks = list(engine.generate(p["messages"], max_new_tokens=max_tokens))
            local_s += time.perf_counter() - t0
            n_local += sum(len([t for t in c.token_ids if t not in engine.eos_ids]) for c in chunks)
            t0 = time.perf_counter()
            body = requests.post(url, json={"messages": p["messages"], "max_tokens": max_tokens, "temperature": 0},
                                 timeout=600).json()
            http_s += time.perf_counter() - t0
            n_http += body["usage"]["completion_tokens"]
            same += body["choices"][0]["message"]["content"] == "".join(c.text for c in chunks)
    finally:
        serve.shutdown()
        ray.shutdown()
    local_tps, http_tps = n_local / local_s, n_http / http_s
    return {"prompts": f"{prompts} ({len(rows)})", "in_process_tok_s": round(local_tps, 2),
            "http_tok_s": round(http_tps, 2), "http_over_in_process": round(http_tps / local_tps, 3),
            "identical_texts": f"{same}/{len(rows)}"}
