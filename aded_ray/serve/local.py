"""Run the service on this machine, as ``aded serve`` does, from a Python process: Ray on loopback, the proxy
guard, a password-protected local Redis, and ``deployments/aded.yaml`` with some args overridden. Used by the
end-to-end tests (one service per test module) and by ``aded soak``.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import yaml

from aded_ray.serve.proxy import CALLBACK

ROOT = Path(__file__).resolve().parents[2]

# The environment Ray must start in: the guard in front of Serve's proxy, no usage reporting, no hub access.
RAY_ENV = {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": CALLBACK, "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S": "1.0"}


def serve_config(args: dict | None = None, *, port: int, http: dict | None = None, config: Path | None = None,
                 logs_dir: str | None = None) -> dict:
    cfg = yaml.safe_load((config or ROOT / "deployments" / "aded.yaml").read_text())
    cfg["http_options"]["port"] = port
    cfg["http_options"].update(http or {})
    if logs_dir:
        cfg.setdefault("logging_config", {})["logs_dir"] = logs_dir
    cfg["applications"][0]["args"].update(args or {})
    return cfg


class LocalService:
    """``with LocalService(workdir, args={...}) as s: requests.get(s.base + "/health")``."""

    def __init__(self, workdir: str | Path, *, args: dict | None = None, redis: bool | str = True,
                 redis_password: bool = True, http: dict | None = None, num_cpus: int = 4, env: dict | None = None,
                 wait_s: float = 300.0, appendonly: bool = True):
        """``redis``: True starts a local Redis now; ``"later"`` only reserves its address (the replicas start
        with Redis down; :meth:`start_redis` brings it up); False: no shared store."""
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.args, self.http, self.num_cpus, self.env = dict(args or {}), http, num_cpus, env or {}
        self.redis_wanted, self.wait_s, self.appendonly = redis, wait_s, appendonly
        self.password = None
        if redis and redis_password:
            from aded_ray.store.server import load_or_create_password

            self.password = load_or_create_password(self.workdir / "redis-password")
        self.redis_port: int | None = None
        self.redis = None
        self.base = ""

    def start_redis(self):
        from aded_ray.store.server import RedisServer

        self.redis = RedisServer(self.workdir / "redis", port=self.redis_port, password=self.password,
                                 appendonly=self.appendonly, appendfsync="always")
        return self.redis

    def start(self) -> "LocalService":
        try:
            return self._start()
        except BaseException:
            self.stop()          # no Ray or Redis left behind by a service that did not come up
            raise

    def _start(self) -> "LocalService":
        import ray
        import requests
        from ray.serve._private import api as serve_api
        from ray.serve.schema import ServeDeploySchema

        from aded_ray.store.server import free_port

        args = dict(self.args)
        ray_env = {**RAY_ENV, **self.env}
        if self.redis_wanted:
            self.redis_port = free_port()
            if self.redis_wanted is True:
                self.start_redis()
            # the password reaches the replicas through their environment, never through the app's args
            # (which Serve logs)
            args.setdefault("redis_url", f"redis://127.0.0.1:{self.redis_port}/0")
            if self.password:
                ray_env["ADED_REDIS_PASSWORD"] = self.password
        args.setdefault("redis_url", "off")
        port = free_port()
        cfg = serve_config(args, port=port, http=self.http)
        schema = ServeDeploySchema.model_validate(cfg)
        saved = dict(os.environ)
        os.environ.update(ray_env)        # what Ray's processes (the proxy, the replicas) start with
        try:
            ray.init(num_cpus=self.num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                     runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
        finally:
            os.environ.clear()
            os.environ.update(saved)
        client = serve_api.serve_start(http_options=schema.http_options.model_dump(),
                                       proxy_location=schema.proxy_location)
        client.deploy_apps(schema, _blocking=False)
        self.base = f"http://127.0.0.1:{port}"
        deadline = time.time() + self.wait_s
        want = args.get("num_replicas", 1)
        seen: set = set()
        while time.time() < deadline:
            try:
                r = requests.get(f"{self.base}/health", timeout=5)
                if r.status_code == 200:
                    seen.add(r.json().get("replica"))
                    if len(seen) >= (want if isinstance(want, int) else 1):
                        return self
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"the service did not answer /health from {want} replicas within {self.wait_s} s")

    def replica_actors(self) -> list:
        """Handles of this app's replica actors (to find their processes)."""
        import ray

        names = [a for a in ray.util.list_named_actors(all_namespaces=True)
                 if "SERVE_REPLICA" in a["name"] and "ADEDServer" in a["name"]]
        return [ray.get_actor(a["name"], namespace=a["namespace"]) for a in names]

    def replica_pids(self) -> list[int]:
        import ray

        out = []
        for actor in self.replica_actors():
            try:
                out.append(ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=10))
            except Exception:  # noqa: BLE001 - a replica that is going away
                pass
        return out

    def replica_healths(self) -> dict[str, dict]:
        """Each running replica's ``/health`` body, asked of its actor directly (HTTP goes through Serve's router,
        which under load keeps choosing the less busy replica). Replicas still starting or going away are left
        out. Reaches into Serve's replica actor (``ray==2.60``): for tests and local tools only."""
        import ray

        def ask(actor_self):
            user = actor_self._replica_impl._user_callable_wrapper.user_callable
            rep = getattr(user, "replica", None)
            return None if rep is None else rep.health()

        out = {}
        for actor in self.replica_actors():
            try:
                h = ray.get(actor.__ray_call__.remote(ask), timeout=10)
            except Exception:  # noqa: BLE001 - a replica that is starting or going away
                continue
            if h is not None:
                out[h["replica"]] = h
        return out

    def stop(self) -> None:
        import ray
        from ray import serve

        try:
            if ray.is_initialized():
                serve.shutdown()
        finally:
            ray.shutdown()
            if self.redis is not None:
                self.redis.stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise ValueError(f"no VmRSS for pid {pid}")
