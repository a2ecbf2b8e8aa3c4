"""Render ``k8s/ray-service.aded.yaml`` (a KubeRay RayService) from ``deployments/aded.yaml``.

The RayService's ``serveConfigV2`` is the local Serve config with the few settings a cluster needs changed
(``K8S_APP_ARGS`` / ``K8S_DEPLOYMENT``): GPUs per replica, autoscaling, the proxy listening on all
interfaces, no local Redis URL (it comes from the pod environment). ``aded k8s`` rewrites the manifest;
tests/test_k8s.py fails when the committed manifest and a fresh render differ.

Two images: the head (no replicas) and any CPU-only group run the CPU image (``Dockerfile``); a group whose
pods request ``nvidia.com/gpu`` runs the CUDA image (``Dockerfile.cuda``, a CUDA build of the same torch pin).
Pods stop by draining, not by ``ray stop``: see ``DRAIN_S``.
"""
from __future__ import annotations

import copy
from pathlib import Path

import yaml

RAY_VERSION = "2.60.0"
IMAGE = "aded-ray:0.1.0"          # built from the repository's Dockerfile (CPU torch)
IMAGE_CUDA = "aded-ray:0.1.0-cu128"   # built from Dockerfile.cuda (CUDA 12.8 torch), for GPU pods
GPU = "nvidia.com/gpu"
# a GPU replica batches more requests than a CPU one (a pass costs about the same for 1 and 64 tokens there)
K8S_APP_ARGS = {"num_gpus": 1, "num_cpus": 4, "tp_size": 1, "redis_url": None, "num_replicas": "auto",
                "max_running": 16, "max_waiting": 48}
# target_ongoing_requests follows the replica's batch (AppArgs.autoscale_target), filled in by serve_config
K8S_DEPLOYMENT = {"autoscaling_config": {"min_replicas": 1, "max_replicas": 4},
                  "graceful_shutdown_timeout_s": 120}
GRACE_S = 180                      # pod termination grace: longer than the longest generation + drain
# On SIGTERM, `ray start --block` (the container's main process) marks its node draining in the GCS and waits up
# to $RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S (Ray's default: 30 s) before killing its processes. Serve then
# starts replacements elsewhere and stops the node's replicas gracefully (graceful_shutdown_timeout_s), at the
# latest at deadline - graceful_shutdown_timeout_s; so the drain must outlast Serve's graceful shutdown and end
# before the pod's grace period does (then SIGKILL). No preStop hook: `ray stop` there killed the replicas
# before SIGTERM was even sent, and a sleep would only postpone the drain inside the same grace period.
DRAIN_S = GRACE_S - 15


def serve_config(local: dict) -> dict:
    cfg = copy.deepcopy(local)
    cfg["proxy_location"] = "EveryNode"
    cfg["http_options"] = {**cfg.get("http_options", {}), "host": "0.0.0.0", "port": 8000}
    app = cfg["applications"][0]
    app["args"].update(K8S_APP_ARGS)                # num_replicas "auto": replicas come from autoscaling
    app["runtime_env"] = {"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}}
    dep = app.setdefault("deployments", [{"name": "ADEDServer"}])[0]
    dep.update(copy.deepcopy(K8S_DEPLOYMENT))
    from aded_ray.serve.args import AppArgs

    dep["autoscaling_config"]["target_ongoing_requests"] = AppArgs(**app["args"]).autoscale_target
    return cfg


def image_for(resources: dict) -> str:
    """The CUDA image for a container that requests GPUs, the CPU image otherwise."""
    wants_gpu = any(int(r.get(GPU, 0)) > 0 for r in (resources.get("limits", {}), resources.get("requests", {})))
    return IMAGE_CUDA if wants_gpu else IMAGE


def _container(name: str, resources: dict, ports: list, env: list | None = None) -> dict:
    c = {"name": name, "image": image_for(resources), "imagePullPolicy": "IfNotPresent", "resources": resources,
         "ports": ports}
    if env:
        c["env"] = env
    return c


def rayservice(local: dict) -> dict:
    env = [
        {"name": "ADED_REDIS_URL", "value": "redis://aded-redis:6379/0"},
        {"name": "ADED_REDIS_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "aded-redis", "key": "password"}}},
        {"name": "HF_HUB_OFFLINE", "value": "1"},
        {"name": "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "value": str(DRAIN_S)},
        # the guard in front of Serve's HTTP proxy (body/header limits, timeouts, OpenAI error bodies)
        {"name": "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "value": "aded_ray.serve.proxy:middlewares"},
    ]
    metrics = {"containerPort": 8080, "name": "metrics"}
    head = {
        "rayStartParams": {"num-cpus": "0", "num-gpus": "0", "dashboard-host": "0.0.0.0",
                           "metrics-export-port": "8080"},
        "template": {"spec": {
            "terminationGracePeriodSeconds": GRACE_S,
            "containers": [_container("ray-head", {"limits": {"cpu": "2", "memory": "8Gi"},
                                                   "requests": {"cpu": "2", "memory": "8Gi"}},
                                      [{"containerPort": 6379, "name": "gcs"},
                                       {"containerPort": 8265, "name": "dashboard"},
                                       {"containerPort": 10001, "name": "client"},
                                       {"containerPort": 8000, "name": "serve"}, metrics], env)]}},
    }
    tp = serve_config(local)["applications"][0]["args"]["tp_size"]
    worker = {
        "groupName": "gpu-workers", "replicas": 1, "minReplicas": 1, "maxReplicas": 4,
        "rayStartParams": {"num-gpus": str(tp), "metrics-export-port": "8080"},
        "template": {"spec": {
            "terminationGracePeriodSeconds": GRACE_S,
            "tolerations": [{"key": GPU, "operator": "Exists", "effect": "NoSchedule"}],
            "containers": [_container("ray-worker", {"limits": {"cpu": "8", "memory": "32Gi", GPU: str(tp)},
                                                     "requests": {"cpu": "8", "memory": "32Gi", GPU: str(tp)}},
                                      [{"containerPort": 8000, "name": "serve"}, metrics], env)]}},
    }
    return {
        "apiVersion": "ray.io/v1", "kind": "RayService",
        "metadata": {"name": "aded", "labels": {"app.kubernetes.io/name": "aded-ray"}},
        "spec": {
            "serveConfigV2": yaml.safe_dump(serve_config(local), sort_keys=False),
            "rayClusterConfig": {
                "rayVersion": RAY_VERSION,
                "enableInTreeAutoscaling": True,
                "autoscalerOptions": {"idleTimeoutSeconds": 120, "upscalingMode": "Default"},
                "headGroupSpec": head,
                "workerGroupSpecs": [worker],
            },
        },
    }


HEADER = """\
# GENERATED by `aded k8s` from deployments/aded.yaml -- edit that file (or aded_ray/k8s.py) and re-run.
# kubectl apply -f k8s/redis.yaml && kubectl apply --server-side -f k8s/ray-service.aded.yaml
"""


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper, value):
    style = "|" if "\n" in value else None      # serveConfigV2 as a readable block scalar
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render(root: str | Path = ".") -> str:
    root = Path(root)
    local = yaml.safe_load((root / "deployments" / "aded.yaml").read_text())
    return HEADER + yaml.dump(rayservice(local), Dumper=_Dumper, sort_keys=False, width=120)


def write(root: str | Path = ".") -> Path:
    out = Path(root) / "k8s" / "ray-service.aded.yaml"
    out.write_text(render(root))
    return out
