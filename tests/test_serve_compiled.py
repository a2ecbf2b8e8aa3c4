"""A Serve replica with compiled batched passes (`compile: auto` as deployments/aded.yaml sets it, which on a CPU
with MKL compiles; one token bucket to keep the compile short), as `make serve` runs it: concurrent greedy HTTP requests equal single-process plain
decoding by the same model in the same mode (the mode compiling resolves to: fp32-mkl where torch has MKL)."""
import concurrent.futures as cf

import pytest
import requests

pytestmark = [pytest.mark.slow, pytest.mark.model]

PROMPTS = ["def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
           "The three primary colors are", "import numpy as np\n\ndef mean(xs):\n"]


@pytest.fixture(scope="module")
def served(serve_with):
    with serve_with("serve-compiled", num_replicas=1, num_cpus=0.5, max_running=3, compile="auto",
                    compile_tokens=[8], max_new_tokens=64) as (svc, store):
        yield {"base": svc.base, "store": store}


def test_compiled_replica_serves_concurrent_requests_exactly(served):
    from aded_ray.config import EngineConfig, VerifyConfig
    from aded_ray.engine import Engine

    def ask(prompt):
        r = requests.post(f"{served['base']}/v1/completions", timeout=300, json={
            "model": "smollm2", "prompt": prompt, "max_tokens": 40, "temperature": 0, "return_stats": True})
        assert r.status_code == 200, r.text
        return r.json()

    with cf.ThreadPoolExecutor(len(PROMPTS)) as pool:
        bodies = list(pool.map(ask, PROMPTS))
    mode = VerifyConfig().resolved_mode()       # the replica's mode (compile "auto" does not change it)
    e = Engine(EngineConfig(store=str(served["store"]), verify=VerifyConfig(mode=mode, budget=0)), speculate=False)
    try:
        for prompt, body in zip(PROMPTS, bodies):
            want = "".join(c.text for c in e.generate(prompt, chat=False, max_new_tokens=40))
            assert body["choices"][0]["text"] == want
    finally:
        e.shutdown()
    assert sum(b["aded_stats"]["draft_tokens"] for b in bodies) > 0      # the replica speculated
    compiled = requests.get(f"{served['base']}/health", timeout=30).json()["compiled"]
    if EngineConfig(verify=VerifyConfig(compile="auto"), max_batch=3).compiled_batched:    # fp32-mkl here
        assert compiled["token_buckets"] == [8] and compiled["passes"] > 0   # and its passes ran compiled
    else:
        assert compiled is None
