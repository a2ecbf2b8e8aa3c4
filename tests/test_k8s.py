"""Kubernetes manifests, validated with no cluster: CRD schema (strict), core resources, serveConfigV2."""
import ast
import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from aded_ray.k8s import DRAIN_S, GPU, GRACE_S, IMAGE, IMAGE_CUDA, RAY_VERSION, image_for, render
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
    assert different <= {"num_gpus", "num_cpus", "num_replicas", "redis_url", "tp_size", "max_running",
                         "max_waiting"}, different
    AppArgs(**app["args"])                      # the builder accepts the cluster's args
    AppArgs(**local_app["args"])


def test_the_built_app_is_the_deployment_the_cluster_configures_and_fits_a_worker(rayservice):
    cfg = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    app = cfg["applications"][0]
    dep_cfg = app["deployments"][0]
    d = build_app(app["args"])._bound_deployment
    # serveConfigV2 overrides the deployment by name: a mismatch fails the deploy on the cluster
    assert d.name == dep_cfg["name"]
    assert d.ray_actor_options == {"num_cpus": app["args"]["num_cpus"], "num_gpus": app["args"]["num_gpus"]}
    assert d.ray_actor_options["num_gpus"] >= 1                     # replicas land on the GPU workers only
    assert d._deployment_config.autoscaling_config is not None      # num_replicas "auto": Serve autoscaling
    assert dep_cfg["autoscaling_config"]["target_ongoing_requests"] <= d.max_ongoing_requests
    # the autoscaling target follows the replica's batch: scale out before requests wait for a place in it
    target = dep_cfg["autoscaling_config"]["target_ongoing_requests"]
    assert app["args"]["max_running"] // 2 <= target <= app["args"]["max_running"]
    assert d._deployment_config.autoscaling_config.target_ongoing_requests == target
    assert d.max_queued_requests == app["args"]["max_queued_requests"]
    (worker,) = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    limits = worker["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert float(limits["cpu"]) >= d.ray_actor_options["num_cpus"]
    assert int(limits[GPU]) >= d.ray_actor_options["num_gpus"] * app["args"]["tp_size"]
    assert float(worker["rayStartParams"]["num-gpus"]) >= d.ray_actor_options["num_gpus"]


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
    # no Secret: applying the file must never overwrite the password Secret the user created
    assert kinds == {"ConfigMap", "PersistentVolumeClaim", "Deployment", "Service"}
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


# --- images: CPU (Dockerfile) for the head and CPU clusters, CUDA (Dockerfile.cuda) for GPU workers -----------

DEV_ONLY = {"pytest", "scipy", "jsonschema", "kubernetes-validate", "matplotlib", "draftretriever"}
TORCH_PIN = "torch==2.13.0"


def _dockerfile(name):
    return (ROOT / name).read_text()


def _logical_lines(text):
    """Dockerfile instructions with their backslash continuations joined, comments dropped."""
    out, cur = [], ""
    for line in text.splitlines():
        if not cur and (not line.strip() or line.lstrip().startswith("#")):
            continue
        cur += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            out.append(cur.strip())
            cur = ""
    return out


def _pip_installs(text):
    """Every pip install command (one `&&` step of a RUN)."""
    return [st.strip() for ln in _logical_lines(text) if ln.startswith("RUN ") for st in ln[4:].split("&&")
            if st.strip().startswith("pip install")]


def _torch_installs(text):
    return [st for st in _pip_installs(text) if re.search(r"\btorch\b", st)]


def _base(text):
    (frm,) = [ln for ln in _logical_lines(text) if ln.startswith("FROM ")]
    return frm.split()[1]


def _requirements(text):
    """{name: line} of a requirements file's text."""
    return {re.split(r"[=<>\[]", ln.strip())[0].lower(): ln.strip() for ln in text.splitlines()
            if ln.strip() and not ln.startswith("#")}


def test_requirements_pin_the_torch_the_images_install():
    assert _requirements((ROOT / "requirements.txt").read_text())["torch"] == TORCH_PIN


def test_cpu_dockerfile_keeps_the_pin_and_installs_the_cpu_build():
    text = _dockerfile("Dockerfile")
    assert _base(text) == f"rayproject/ray:{RAY_VERSION}-py311-cpu"
    (install,) = _torch_installs(text)
    assert install.split()[2:] == [TORCH_PIN, "--index-url", "https://download.pytorch.org/whl/cpu"]
    assert "torch.version.cuda is None" in text                    # the build fails on a CUDA wheel


def test_cuda_dockerfile_pins_a_cuda_build_of_the_same_torch():
    text = _dockerfile("Dockerfile.cuda")
    cuda = IMAGE_CUDA.rsplit("-", 1)[1]                            # cu128
    assert re.fullmatch(r"cu1\d\d", cuda)
    assert _base(text) == f"rayproject/ray:{RAY_VERSION}-py311-{cuda}"
    (install,) = _torch_installs(text)                            # no other torch install (no CPU or PyPI build)
    assert install.split()[2:] == [TORCH_PIN, "--index-url", f"https://download.pytorch.org/whl/{cuda}"]
    assert "/whl/cpu" not in text and "+cpu" not in text
    assert f"torch.version.cuda == '{cuda[2:-1]}.{cuda[-1]}'" in text   # the build fails on a CPU wheel


def test_the_two_dockerfiles_differ_only_in_base_image_and_torch_wheel():
    cpu, gpu = _logical_lines(_dockerfile("Dockerfile")), _logical_lines(_dockerfile("Dockerfile.cuda"))
    assert len(cpu) == len(gpu)
    for a, b in zip(cpu, gpu):
        if a.startswith("FROM "):
            continue
        a = a.replace("/whl/cpu", "/whl/CUDA").replace("torch.version.cuda is None", "CUDA_CHECK")
        b = re.sub(r"/whl/cu1\d\d", "/whl/CUDA", b)
        b = re.sub(r"torch\.version\.cuda == '[\d.]+'", "CUDA_CHECK", b)
        assert a == b


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_images_install_runtime_dependencies_only(name):
    text = _dockerfile(name)
    (arg,) = [ln for ln in _logical_lines(text) if ln.startswith("ARG DEV_ONLY=")]
    dev_only = arg.split("=", 1)[1].strip('"').split()
    reqs = _requirements((ROOT / "requirements.txt").read_text())
    assert set(dev_only) == DEV_ONLY and DEV_ONLY <= set(reqs)
    # run the Dockerfile's own filter on requirements.txt
    ((grep, out),) = re.findall(r"(grep -vE .*? requirements\.txt) > (\S+)", text)
    pips = _pip_installs(text)
    assert f"pip install -r {out}" in pips                         # the filtered list is what gets installed
    assert not any("requirements.txt" in st for st in pips), pips
    kept = subprocess.run(["sh", "-c", grep], cwd=ROOT, env={**os.environ, "DEV_ONLY": " ".join(dev_only)},
                          capture_output=True, text=True, check=True).stdout
    kept = _requirements(kept)
    assert kept == {n: ln for n, ln in reqs.items() if n not in DEV_ONLY}
    assert {"torch", "ray", "transformers", "numba", "redis", "deepspeed"} <= set(kept)


def test_no_module_imports_a_test_or_bench_dependency_at_import_time():
    """What the image leaves out may only be imported inside functions (benchmarks, the authors' index)."""
    banned = {n.replace("-", "_") for n in DEV_ONLY}

    def import_time(node):                      # every node run on import: all but function bodies
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                yield child
                yield from import_time(child)

    for f in (ROOT / "aded_ray").rglob("*.py"):
        for node in import_time(ast.parse(f.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            hit = {n.split(".")[0] for n in names} & banned
            assert not hit, f"{f.relative_to(ROOT)} imports {hit} on import: the image does not have it"


def test_gpu_pods_run_the_cuda_image_and_the_rest_the_cpu_image(rayservice):
    rc = rayservice["spec"]["rayClusterConfig"]
    groups = [rc["headGroupSpec"]] + rc["workerGroupSpecs"]
    containers = [c for g in groups for c in g["template"]["spec"]["containers"]]
    gpu_containers = [c for c in containers if int(c["resources"].get("limits", {}).get(GPU, 0)) > 0]
    assert gpu_containers                                          # the GPU worker group
    for c in containers:
        assert c["image"] == (IMAGE_CUDA if c in gpu_containers else IMAGE), c["name"]
    (head,) = rc["headGroupSpec"]["template"]["spec"]["containers"]
    assert head["image"] == IMAGE and GPU not in head["resources"]["limits"]
    assert image_for({"limits": {"cpu": "8"}}) == IMAGE             # a CPU cluster's workers
    assert image_for({"limits": {"cpu": "8", GPU: "2"}, "requests": {GPU: "2"}}) == IMAGE_CUDA
    assert IMAGE_CUDA != IMAGE and IMAGE_CUDA.startswith(IMAGE + "-")   # same release, CUDA flavour
    # each Dockerfile's build line tags the image that the manifest pulls
    assert f"docker build -t {IMAGE} ." in _dockerfile("Dockerfile")
    assert f"docker build -f Dockerfile.cuda -t {IMAGE_CUDA} ." in _dockerfile("Dockerfile.cuda")


def test_pods_drain_on_sigterm_instead_of_ray_stop(rayservice):
    """`preStop: ray stop` killed the replicas before SIGTERM; Ray's own SIGTERM drain lets Serve drain them."""
    rc = rayservice["spec"]["rayClusterConfig"]
    cfg = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    graceful = cfg["applications"][0]["deployments"][0]["graceful_shutdown_timeout_s"]
    for g in [rc["headGroupSpec"]] + rc["workerGroupSpecs"]:
        spec = g["template"]["spec"]
        for c in spec["containers"]:
            pre = c.get("lifecycle", {}).get("preStop")
            # `ray stop` kills the replicas at once; a sleep only postpones the drain within the same grace period
            assert pre is None, f"{c['name']}: preStop {json.dumps(pre)}"
            env = {e["name"]: e.get("value") for e in c["env"]}
            drain = float(env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"])
            assert drain == DRAIN_S
            assert graceful < drain < spec["terminationGracePeriodSeconds"] == GRACE_S


def test_the_pinned_ray_reads_the_drain_timeout_from_that_variable():
    code = "from ray._private import ray_constants as c; print(c.RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120,
                         env={**os.environ, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": str(DRAIN_S)}).stdout
    assert float(out) == DRAIN_S
