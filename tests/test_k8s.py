"""Kubernetes manifests, validated with no cluster: CRD schema (strict), core resources, serveConfigV2."""
import copy
import json
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from aded_ray.k8s import GRACE_S, render
from aded_ray.serve.app import AppArgs, build_app

ROOT = Path(__file__).resolve().parents[1]
K8S_VERSION = "1.31"


def strict(o):
    """additionalProperties: false on every object schema with properties (kubeconform -strict)."""
    if isinstance(o, dict):
        if "properties" in o and "additionalProperties" not in o:
            o["additionalProperties"] = False
        for v in o.values():
            strict(v)
    elif isinstance(o, list):
        for v in o:
            strict(v)
    return o


def apiserver_prep(schema, obj):
    """Prune non-nullable nulls and apply defaults, as the API server does before validating."""
    if isinstance(obj, dict) and "properties" in schema:
        for k in list(obj):
            sub = schema["properties"].get(k)
            if sub is not None and obj[k] is None and not sub.get("nullable"):
                del obj[k]
        for k, sub in schema["properties"].items():
            if k not in obj and "default" in sub:
                obj[k] = copy.deepcopy(sub["default"])
            if k in obj:
                apiserver_prep(sub, obj[k])
    elif isinstance(obj, list) and "items" in schema:
        for x in obj:
            apiserver_prep(schema["items"], x)
    return obj


@pytest.fixture(scope="module")
def rayservice():
    return yaml.safe_load((ROOT / "k8s" / "ray-service.aded.yaml").read_text())


@pytest.fixture(scope="module")
def validator():
    schema = strict(json.loads((ROOT / "k8s" / "schemas" / "rayservice_v1.json").read_text()))
    jsonschema.Draft7Validator.check_schema(schema)
    return schema, jsonschema.Draft7Validator(schema)


def test_manifest_is_generated_from_the_serve_config():
    assert (ROOT / "k8s" / "ray-service.aded.yaml").read_text() == render(ROOT), "run `aded k8s`"


def test_rayservice_matches_the_crd_schema_strictly(rayservice, validator):
    schema, v = validator
    v.validate(apiserver_prep(schema, copy.deepcopy(rayservice)))


@pytest.mark.parametrize("path, bad_key", [
    (("spec",), "serveConfigv2"),
    (("spec", "rayClusterConfig"), "enableInTreeAutoscalling"),
    (("spec", "rayClusterConfig", "headGroupSpec"), "rayStartParam"),
])
def test_a_misspelled_copy_fails(rayservice, validator, path, bad_key):
    schema, v = validator
    doc = copy.deepcopy(rayservice)
    node = doc
    for p in path:
        node = node[p]
    good = {"serveConfigv2": "serveConfigV2", "enableInTreeAutoscalling": "enableInTreeAutoscaling",
            "rayStartParam": "rayStartParams"}[bad_key]
    node[bad_key] = node.pop(good)
    with pytest.raises(jsonschema.ValidationError):
        v.validate(apiserver_prep(schema, doc))


def test_serve_config_v2_is_a_valid_serve_config_for_the_same_app(rayservice):
    cfg = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(cfg)
    local = yaml.safe_load((ROOT / "deployments" / "aded.yaml").read_text())
    ServeDeploySchema.model_validate(local)
    app, local_app = cfg["applications"][0], local["applications"][0]
    assert app["import_path"] == local_app["import_path"] and app["name"] == local_app["name"]
    different = {k for k in set(app["args"]) | set(local_app["args"])
                 if app["args"].get(k) != local_app["args"].get(k)}
    assert different <= {"num_gpus", "num_cpus", "num_replicas", "redis_url", "tp_size"}, different
    AppArgs(**app["args"])                      # the builder accepts the cluster's args
    AppArgs(**local_app["args"])
    assert build_app(app["args"]) is not None


def test_cluster_shape(rayservice):
    rc = rayservice["spec"]["rayClusterConfig"]
    head = rc["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"          # no replicas on the head
    cfg = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    args = cfg["applications"][0]["args"]
    dep = cfg["applications"][0]["deployments"][0]
    (worker,) = rc["workerGroupSpecs"]
    container = worker["template"]["spec"]["containers"][0]
    gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus >= args["tp_size"] * args["num_gpus"] and gpus % args["tp_size"] == 0
    env = {e["name"]: e for e in container["env"]}
    assert env["ADED_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "aded-redis", "key": "password"}
    assert "password" not in rayservice["spec"]["serveConfigV2"].lower()
    assert worker["template"]["spec"]["terminationGracePeriodSeconds"] == GRACE_S > dep["graceful_shutdown_timeout_s"]
    assert any(p.get("name") == "metrics" and p["containerPort"] == 8080 for p in container["ports"])
    assert rc["enableInTreeAutoscaling"] and dep["autoscaling_config"]["max_replicas"] > 1


def test_redis_manifests_with_kubernetes_validate():
    docs = [d for d in yaml.safe_load_all((ROOT / "k8s" / "redis.yaml").read_text()) if d]
    kinds = {d["kind"] for d in docs}
    assert kinds == {"Secret", "ConfigMap", "PersistentVolumeClaim", "Deployment", "Service"}
    for d in docs:
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)
    conf = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["redis.conf"]
    assert "appendonly yes" in conf
    dep = next(d for d in docs if d["kind"] == "Deployment")
    env = dep["spec"]["template"]["spec"]["containers"][0]["env"]
    assert env[0]["valueFrom"]["secretKeyRef"]["name"] == "aded-redis"
    bad = copy.deepcopy(dep)
    bad["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)
