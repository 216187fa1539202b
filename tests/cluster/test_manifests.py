"""The deployment configs: KubeRay manifests against the KubeRay v1.7.0 CRD schemas (strictly: an
unknown or misspelt key is an error, as with `kubectl apply --validate=strict`), the Serve config
against Ray Serve's schema and the app's own config model, `ray_cluster.yaml` against Ray's
launcher schema; and every import path and entry point they name exists in this repository."""

from __future__ import annotations

import ast
import copy
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CRDS = REPO.parent / "shared" / "data" / "kuberay-crds"
K8S = REPO / "cluster" / "k8s"
CRD_FILES = {"RayService": "ray.io_rayservices.yaml", "RayJob": "ray.io_rayjobs.yaml"}
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.load_all(path.read_text(), Loader=Loader) if doc]


def manifests() -> list[tuple[str, dict]]:
    return [(f"{path.name}:{doc['kind']}", doc) for path in sorted(K8S.glob("*.yaml")) for doc in documents(path)]


def strict(schema):
    """The CRD schema (changed in place) with ``additionalProperties: false`` wherever it lists
    properties and does not allow unknown fields: the API server prunes (or, strict, rejects) them;
    jsonschema would let them pass."""

    def visit(node):
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(schema)
    return schema


@pytest.fixture(scope="module")
def validators():
    import jsonschema

    if not CRDS.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {CRDS}")
    found = {}
    for kind, name in CRD_FILES.items():
        crd = yaml.load((CRDS / name).read_text(), Loader=Loader)
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        found[kind] = jsonschema.Draft7Validator(strict(v1["schema"]["openAPIV3Schema"]))
    return found


def errors(validator, doc) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(doc)]


def test_kuberay_manifests_validate_against_the_crd_schemas(validators):
    found = manifests()
    kinds = {doc["kind"] for _, doc in found}
    assert {"RayService", "RayJob"} <= kinds
    for name, doc in found:
        if doc["kind"] not in validators:
            assert doc["apiVersion"] == "v1" and doc["kind"] == "ConfigMap", name
            continue
        assert doc["apiVersion"] == "ray.io/v1", name
        problems = errors(validators[doc["kind"]], doc)
        assert not problems, f"{name}: {problems}"


@pytest.mark.parametrize("kind, path, wrong", [
    ("RayService", ["spec"], ("serveConfigV2", "serveConfigv2")),
    ("RayService", ["spec", "rayClusterConfig"], ("enableInTreeAutoscaling", "enableInTreeAutoScaling")),
    ("RayJob", ["spec", "rayClusterSpec", "workerGroupSpecs", 0], ("maxReplicas", "maxReplica")),
])
def test_a_misspelt_key_is_caught(validators, kind, path, wrong):
    (doc,) = [copy.deepcopy(d) for _, d in manifests() if d["kind"] == kind]
    node = doc
    for part in path:
        node = node[part]
    node[wrong[1]] = node.pop(wrong[0])
    assert any(wrong[1] in problem for problem in errors(validators[kind], doc))


# ---------------------------------------------------------------- what the manifests name


def module_file(module: str) -> Path:
    base = REPO / Path(*module.split("."))
    path = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
    assert path.is_file(), f"module {module} not found in the repository"
    return path


def top_level_names(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return names


def assert_import_path(spec: str) -> None:
    module, _, attribute = spec.partition(":")
    assert attribute, f"{spec!r} is not 'module:attribute'"
    assert attribute in top_level_names(module_file(module)), f"{module} defines no {attribute!r}"


def serve_config() -> dict:
    (service,) = [doc for _, doc in manifests() if doc["kind"] == "RayService"]
    return yaml.safe_load(service["spec"]["serveConfigV2"])


def test_the_serve_config_is_valid_and_names_existing_code():
    from ray.serve.schema import ServeDeploySchema

    from serve.config import ServeConfig

    config = serve_config()
    ServeDeploySchema.model_validate(config)
    app_source = (REPO / "serve" / "app.py").read_text()
    for application in config["applications"]:
        assert_import_path(application["import_path"])
        args = ServeConfig.from_args(application["args"])  # every arg is a ServeConfig field
        if args.erasure_backend:
            assert_import_path(args.erasure_backend)
        for deployment in application.get("deployments", []):
            assert re.search(rf'= "{deployment["name"]}"', app_source), f"no deployment {deployment['name']!r}"
        assert application["args"]["autoscaling"]["max_replicas"] > application["args"]["autoscaling"]["min_replicas"]


def test_the_ray_job_runs_the_batch_entry_with_valid_arguments():
    from cluster.batch import build_parser

    (job,) = [doc for _, doc in manifests() if doc["kind"] == "RayJob"]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "cluster.batch"]
    source = module_file("cluster.batch").read_text()
    assert 'if __name__ == "__main__":' in source
    args = build_parser().parse_args(argv[3:])
    assert args.requests.startswith("s3://")
    assert job["spec"]["shutdownAfterJobFinishes"] is True


def test_clusters_autoscale_gpu_workers_and_run_the_pinned_image():
    pinned = re.search(r'"ray\[[^]]*\]==([0-9.]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    images = set()
    for name, doc in manifests():
        if doc["kind"] not in ("RayService", "RayJob"):
            continue
        cluster = doc["spec"].get("rayClusterConfig") or doc["spec"]["rayClusterSpec"]
        assert cluster["rayVersion"] == pinned and cluster["enableInTreeAutoscaling"] is True, name
        for group in cluster["workerGroupSpecs"]:
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], name
            (container,) = group["template"]["spec"]["containers"]
            assert container["resources"]["limits"]["nvidia.com/gpu"] == "1", name
            images.add(container["image"])
        images |= {c["image"] for c in cluster["headGroupSpec"]["template"]["spec"]["containers"]}
    assert len(images) == 1, images
    dockerfile = (K8S / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{pinned}-py311-gpu" in dockerfile and '".[gpu]"' in dockerfile
    packages = re.search(r"include = \[([^]]*)\]", (REPO / "pyproject.toml").read_text()).group(1)
    for package in re.findall(r'"(\w+)\*"', packages):
        assert f"COPY --chown=ray:users {package} {package}" in dockerfile, f"Dockerfile does not copy {package}/"


def test_ray_cluster_yaml_is_a_valid_launcher_config_with_an_autoscaling_gpu_worker():
    import jsonschema
    import ray

    config = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.Draft7Validator(schema).validate(config)
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    gpu = [t for t in types.values() if re.match(r"(g|p)\d", t["node_config"]["InstanceType"])]
    assert gpu, "no GPU worker type"
    for worker in gpu:
        assert 0 <= worker["min_workers"] < worker["max_workers"] <= config["max_workers"]
    assert not re.match(r"(g|p)\d", types[config["head_node_type"]]["node_config"]["InstanceType"])
    assert config["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-")
    (mount,) = config["file_mounts"]
    installs = [c for c in config["setup_commands"] if "pip install" in c and "[gpu]" in c]
    assert installs and mount in installs[0], "setup must install the mounted package with the gpu extra"
    imports = [c for c in config["setup_commands"] if "import cluster" in c]
    assert imports


def test_every_cluster_keeps_job_workers_warm():
    """Each cluster definition sets Ray's idle-worker limit on its nodes (cluster.config.IDLE_WORKERS_ENV):
    without it Ray ends a warm job worker once Serve's replicas hold the node's CPUs."""
    from cluster.config import IDLE_JOB_WORKERS, IDLE_WORKERS_ENV

    (config_map,) = [doc for name, doc in manifests() if name == "rayservice.yaml:ConfigMap"]
    assert config_map["data"][IDLE_WORKERS_ENV] == str(IDLE_JOB_WORKERS)
    launcher = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    assert f"--env {IDLE_WORKERS_ENV}={IDLE_JOB_WORKERS}" in launcher["docker"]["run_options"]
