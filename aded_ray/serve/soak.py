"""``aded soak``: a long hostile-mix load on the HTTP service, on loopback.

``concurrency`` clients send requests back to back for ``duration_s``: good completions and chats (half of them
streamed) and, with probability ``bad_fraction``, a bad or hostile one drawn from a fixed list (malformed JSON,
wrong types, unknown model or route, a prompt over the limit, an oversized body, a lone surrogate, ...).
Reported: requests by status, 5xx count (must be 0), hangs (a request with no answer within ``hang_s``; must
be 0), good requests that did not succeed, latency percentiles, and the replica processes' RSS: the median of
the samples in the first minute after warm-up against the median of the last minute (growth must stay under
5%). It starts the service itself (like ``make serve``: the proxy guard, a local password-protected Redis)
unless ``url`` names a running one (then RSS is not measured).
"""
from __future__ import annotations

import json
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path

BAD = [
    ("POST", "/v1/completions", b"{not json", 400),
    ("POST", "/v1/completions", json.dumps({"prompt": "x", "max_tokens": "5"}).encode(), 400),
    ("POST", "/v1/completions", json.dumps({"prompt": "x", "max_tokens": 10**7}).encode(), 400),
    ("POST", "/v1/completions", json.dumps({"prompt": [2**63]}).encode(), 400),
    ("POST", "/v1/completions", b'{"prompt": "\\ud800"}', 400),
    ("POST", "/v1/completions", json.dumps({"prompt": "x", "temperature": 5e-324}).encode(), 400),
    ("POST", "/v1/completions", json.dumps({"prompt": "x", "model": "gpt-4"}).encode(), 404),
    ("POST", "/v1/completions", json.dumps({"prompt": "word " * 6000, "stream": True}).encode(), 400),
    ("POST", "/v1/completions", b"[" * 50_000, 400),
    ("POST", "/v1/completions", b"x" * (2 << 20), 413),
    ("POST", "/v1/chat/completions", json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(), 400),
    ("POST", "/v1/chat/completions", json.dumps({"messages": []}).encode(), 400),
    ("POST", "/v1/chat/completions",
     json.dumps({"messages": [{"role": "user", "content": "x" * 200_000}]}).encode(), 400),
    ("GET", "/v1/models/gpt-4", b"", 404),
    ("GET", "/v1/nowhere", b"", 404),
    ("PUT", "/v1/completions", b"", 405),
]
GOOD_PROMPTS = ["Write a haiku about the sea.", "def add(a, b):", "List three prime numbers.",
                "Explain what a hash table is.", "Translate 'good morning' into French.", "1, 2, 3, 4,"]


def _good(rng: random.Random, max_tokens: int) -> tuple[str, dict]:
    chat = rng.random() < 0.5
    body = {"max_tokens": rng.randint(4, max_tokens), "temperature": rng.choice([0, 0.8]), "seed": rng.randint(0, 99),
            "stream": rng.random() < 0.5}
    p = rng.choice(GOOD_PROMPTS)
    if chat:
        body["messages"] = [{"role": "user", "content": p}]
    else:
        body["prompt"] = p
    return ("/v1/chat/completions" if chat else "/v1/completions"), body


def run(*, url: str | None = None, duration_s: float = 600.0, concurrency: int = 16, bad_fraction: float = 0.1,
        replicas: int = 1, warmup_s: float | None = None, max_tokens: int = 32, hang_s: float = 120.0,
        seed: int = 0, out: str | None = None) -> dict:
    import requests

    service = None
    if url is None:
        from aded_ray.serve.local import LocalService

        service = LocalService(Path(tempfile.mkdtemp(prefix="aded-soak-")),
                               args={"num_replicas": replicas, "num_cpus": 1}).start()
        url = service.base
    warmup_s = duration_s * 0.2 if warmup_s is None else warmup_s
    stats = {"status": {}, "good_failed": 0, "bad_unexpected": 0, "hangs": 0, "errors": 0, "latency": []}
    lock = threading.Lock()
    stop_at = time.monotonic() + duration_s
    rss: list[tuple[float, int]] = []
    t0 = time.monotonic()

    def count(key, status=None, lat=None):
        with lock:
            if status is not None:
                stats["status"][str(status)] = stats["status"].get(str(status), 0) + 1
            if key:
                stats[key] += 1
            if lat is not None:
                stats["latency"].append(lat)

    def client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        s = requests.Session()
        while time.monotonic() < stop_at:
            t = time.monotonic()
            try:
                if rng.random() < bad_fraction:
                    method, path, raw, want = rng.choice(BAD)
                    r = s.request(method, url + path, data=raw or None, timeout=hang_s,
                                  headers={"Content-Type": "application/json"})
                    r.content
                    count("bad_unexpected" if r.status_code != want else None, r.status_code)
                else:
                    path, body = _good(rng, max_tokens)
                    r = s.post(url + path, json=body, timeout=hang_s, stream=body["stream"])
                    ok = r.status_code == 200
                    if ok and body["stream"]:
                        lines = [ln for ln in r.iter_lines() if ln]
                        ok = bool(lines) and lines[-1] == b"data: [DONE]" and not any(b'"error"' in ln for ln in lines)
                    else:
                        r.content
                    count(None if ok else "good_failed", r.status_code, time.monotonic() - t)
            except requests.Timeout:
                count("hangs")
            except requests.RequestException:
                count("errors")

    def sample_rss() -> None:
        from aded_ray.serve.local import rss_bytes

        while time.monotonic() < stop_at:
            total = 0
            for pid in pids:
                try:
                    total += rss_bytes(pid)
                except (OSError, ValueError):
                    pass
            rss.append((time.monotonic() - t0, total))
            time.sleep(5)

    pids = service.replica_pids() if service is not None else []
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(concurrency)]
    if pids:
        threads.append(threading.Thread(target=sample_rss, daemon=True))
    for th in threads:
        th.start()
    for th in threads:
        th.join(duration_s + hang_s + 30)
    try:
        health = requests.get(url + "/health", timeout=10).json()
    except Exception as e:  # noqa: BLE001
        health = {"error": str(e)}
    if service is not None:
        service.stop()
    lat = sorted(stats.pop("latency"))
    fivexx = sum(n for code, n in stats["status"].items() if code.startswith("5") and code != "503")
    r = {"duration_s": duration_s, "concurrency": concurrency, "bad_fraction": bad_fraction, "replicas": replicas,
         "requests": sum(stats["status"].values()), **stats, "5xx": fivexx,
         "503": stats["status"].get("503", 0),
         "latency_s": {"p50": _pct(lat, 50), "p95": _pct(lat, 95), "p99": _pct(lat, 99), "max": lat[-1] if lat else None},
         "health_after": health}
    if rss:
        base = [b for t, b in rss if warmup_s <= t < warmup_s + 60] or [rss[0][1]]
        end = [b for t, b in rss if t >= rss[-1][0] - 60]
        r["rss_mb"] = {"after_warmup": statistics.median(base) / 2**20, "end": statistics.median(end) / 2**20,
                       "samples": len(rss)}
        r["rss_growth_pct"] = 100 * (statistics.median(end) / statistics.median(base) - 1)
    r["ok"] = (fivexx == 0 and stats["hangs"] == 0 and stats["errors"] == 0 and stats["good_failed"] == 0
               and stats["bad_unexpected"] == 0 and r.get("rss_growth_pct", 0) < 5)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(r, indent=1))
    return r


def _pct(xs: list, p: float):
    return round(xs[min(len(xs) - 1, int(len(xs) * p / 100))], 3) if xs else None


def markdown(r: dict) -> str:
    rows = [("duration", f"{r['duration_s']:.0f} s at concurrency {r['concurrency']}, {100 * r['bad_fraction']:.0f}% bad"),
            ("requests", f"{r['requests']} ({', '.join(f'{k}: {v}' for k, v in sorted(r['status'].items()))})"),
            ("5xx (503 counted apart)", f"{r['5xx']} (503: {r['503']})"), ("hangs", r["hangs"]),
            ("connection errors", r["errors"]), ("good requests that failed", r["good_failed"]),
            ("bad requests with an unexpected status", r["bad_unexpected"]),
            ("latency of good requests p50 / p95 / max", f"{r['latency_s']['p50']} / {r['latency_s']['p95']} / "
                                                         f"{r['latency_s']['max']} s")]
    if "rss_mb" in r:
        rows.append(("replica RSS after warm-up / at the end", f"{r['rss_mb']['after_warmup']:.0f} MB / "
                                                               f"{r['rss_mb']['end']:.0f} MB "
                                                               f"({r['rss_growth_pct']:+.2f}%)"))
    rows.append(("verdict", "pass" if r["ok"] else "FAIL"))
    return "| measure | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
