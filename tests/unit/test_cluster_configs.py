"""Cluster YAMLs: Ray's own schema and validate_config, worker bounds Ray does not check, every key of
the AWS YAML commented, and the KubeRay manifest's shape. Offline: nothing is launched."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_TYPE
from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.serve.schema import ServeDeploySchema

from raytron.config import load_config
from raytron.serve.settings import load_serve_config

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
AWS = CLUSTER / "aws-gpu.yaml"
FAKE = CLUSTER / "local-fake.yaml"
KUBERAY = CLUSTER / "kuberay-raycluster.yaml"
RAYJOB = CLUSTER / "kuberay-rayjob.yaml"
RAYSERVICE = CLUSTER / "kuberay-rayservice.yaml"
IMAGE_REPO = "/home/ray/raytron"  # where the manifests' image holds this repository
LAUNCHER_YAMLS = (AWS, FAKE)
RAY_SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def worker_bound_problems(config: dict) -> list[str]:
    """min_workers <= max_workers per node type and max_workers <= the global one (Ray checks neither)."""
    problems = []
    for name, node_type in config["available_node_types"].items():
        low, high = node_type.get("min_workers", 0), node_type.get("max_workers", config["max_workers"])
        if low > high:
            problems.append(f"{name}: min_workers {low} > max_workers {high}")
        if high > config["max_workers"]:
            problems.append(f"{name}: max_workers {high} > global max_workers {config['max_workers']}")
    return problems


def uncommented_keys(text: str) -> list[str]:
    """Lines holding a mapping key with no `#` comment on them or on the line just above."""
    key_lines = set()
    tokens = list(yaml.scan(text))
    for token, following in zip(tokens, tokens[1:]):
        if isinstance(token, yaml.KeyToken) and isinstance(following, yaml.ScalarToken):
            key_lines.add(following.start_mark.line)
    lines = text.splitlines()

    def has_comment(line: str) -> bool:
        unquoted = re.sub(r"\"[^\"]*\"|'[^']*'", "", line)
        return re.search(r"(^|\s)#", unquoted) is not None

    def above_is_comment(index: int) -> bool:
        return index > 0 and lines[index - 1].lstrip().startswith("#")

    return [f"line {i + 1}: {lines[i].strip()}" for i in sorted(key_lines)
            if not has_comment(lines[i]) and not above_is_comment(i)]


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda path: path.name)
def test_launcher_yaml_matches_rays_schema_and_validate_config(path):
    config = load(path)
    jsonschema.validate(config, json.loads(RAY_SCHEMA.read_text()))
    validate_config(config)


def test_aws_yaml_survives_what_ray_up_does_before_launching():
    # `ray up` merges the provider's defaults, then validates (commands._bootstrap_config).
    prepared = prepare_config(copy.deepcopy(load(AWS)))
    validate_config(prepared)
    assert prepared["available_node_types"]["gpu"]["node_config"]["InstanceType"] == "p4d.24xlarge"


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda path: path.name)
def test_worker_bounds_are_consistent(path):
    assert worker_bound_problems(load(path)) == []


def test_worker_bound_check_catches_min_above_max():
    config = copy.deepcopy(load(AWS))
    config["available_node_types"]["gpu"]["min_workers"] = config["available_node_types"]["gpu"]["max_workers"] + 1
    assert any("min_workers" in problem for problem in worker_bound_problems(config))


def test_every_key_in_the_aws_yaml_is_commented():
    assert uncommented_keys(AWS.read_text()) == []


def test_comment_check_finds_an_uncommented_key():
    text = "# why\ncluster_name: x\nprovider:\n  # why\n  type: aws\n  region: us-west-2  # why\nmax_workers: 1\n"
    assert uncommented_keys(text) == ["line 3: provider:", "line 7: max_workers: 1"]


def test_aws_yaml_node_types_and_commands():
    config = load(AWS)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert "GPU" not in head["resources"], "the head runs MLflow/dashboard, not training"
    gpu = [t for name, t in types.items() if t["resources"].get("GPU", 0) > 0]
    cpu = [t for name, t in types.items() if name != config["head_node_type"] and "GPU" not in t["resources"]]
    assert gpu and all(t["resources"]["GPU"] == 8 for t in gpu)
    assert cpu, "a CPU worker type for Ray Data tokenization"
    assert config["idle_timeout_minutes"] > 0

    setup = config["setup_commands"]
    order = [next(i for i, cmd in enumerate(setup) if needle in cmd)
             for needle in ("install \"torch", "--no-build-isolation \"deepspeed", "install -e /home/ubuntu/raytron")]
    assert order == sorted(order), "torch, then deepspeed without build isolation, then the repo"
    assert config["file_mounts"] == {"/home/ubuntu/raytron": "."}

    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host 127.0.0.1" in head_start
    assert f"--num-cpus={head['resources']['CPU']}" in head_start
    port = re.search(r"--metrics-export-port=(\d+)", head_start)[1]
    assert f"--metrics-export-port={port}" in " ".join(config["worker_start_ray_commands"])
    # files the head's commands use from the synced repository exist in it
    for remote in re.findall(r"/home/ubuntu/raytron/(\S+)", head_start):
        assert (REPO / remote).is_file(), remote


def test_fake_cluster_has_a_custom_resource_worker_type():
    config = load(FAKE)
    assert config["provider"]["type"] == "fake_multinode"
    assert config["head_node_type"] == FAKE_HEAD_NODE_TYPE  # the fake provider hard-codes the head's name
    custom = [name for name, t in config["available_node_types"].items()
              if set(t["resources"]) - {"CPU", "GPU", "memory", "object_store_memory"}]
    assert custom and all(config["available_node_types"][name]["max_workers"] > 0 for name in custom)


def test_kuberay_manifest():
    manifest = load(KUBERAY)
    assert manifest["apiVersion"] == "ray.io/v1"
    assert manifest["kind"] == "RayCluster"
    spec = manifest["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    # a RayJob's submitter pod reaches the dashboard through the head Service: 127.0.0.1 refuses it
    assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    groups = {group["groupName"]: group for group in spec["workerGroupSpecs"]}
    for group in groups.values():
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]
    assert int(gpu["requests"]["nvidia.com/gpu"]) == int(gpu["limits"]["nvidia.com/gpu"]) == 8


def ray_cluster_specs() -> dict[str, dict]:
    """Every RayCluster spec we ship: the RayCluster itself and the one inside the RayService."""
    return {"RayCluster": load(KUBERAY)["spec"], "RayService": load(RAYSERVICE)["spec"]["rayClusterConfig"]}


def operator_rule_problems(spec: dict) -> list[str]:
    """Rules the KubeRay operator enforces (or that its pods need) which Ray's translator does not check:
    0 <= minReplicas <= replicas <= maxReplicas, at least one container per pod template, and restartPolicy
    Never on Ray pods (KubeRay recreates them itself)."""
    problems = []
    templates = {"headGroupSpec": spec["headGroupSpec"]["template"]}
    for group in spec.get("workerGroupSpecs", []):
        name = group.get("groupName", "?")
        low, high = group.get("minReplicas", 0), group.get("maxReplicas", 2**31 - 1)
        if not 0 <= low <= group.get("replicas", low) <= high:
            problems.append(f"{name}: replicas {group.get('replicas')} not within min {low} .. max {high}")
        templates[name] = group["template"]
    for name, template in templates.items():
        pod = template.get("spec", {})
        if not pod.get("containers"):
            problems.append(f"{name}: no containers")
        if pod.get("restartPolicy") != "Never":
            problems.append(f"{name}: restartPolicy {pod.get('restartPolicy')!r}, want 'Never'")
    return problems


@pytest.mark.parametrize("kind", ["RayCluster", "RayService"])
def test_kuberay_cluster_spec_translates_and_validates(kind):
    spec = ray_cluster_specs()[kind]
    # Ray's own offline translator (what the autoscaler sidecar runs) needs the namespace KubeRay would set
    config = _derive_autoscaling_config_from_ray_cr({"metadata": {"name": "raytron", "namespace": "default"},
                                                     "spec": spec})
    validate_config(config)
    assert worker_bound_problems(config) == []
    assert operator_rule_problems(spec) == []
    assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    gpu = config["available_node_types"]["gpu"]
    assert gpu["resources"]["GPU"] >= 1 and gpu["max_workers"] >= 1


def test_operator_rules_catch_broken_specs():
    spec = copy.deepcopy(ray_cluster_specs()["RayCluster"])
    spec["workerGroupSpecs"][0]["minReplicas"] = spec["workerGroupSpecs"][0]["maxReplicas"] + 1
    spec["workerGroupSpecs"][1]["template"]["spec"]["containers"] = []
    del spec["headGroupSpec"]["template"]["spec"]["restartPolicy"]
    problems = operator_rule_problems(spec)
    assert len(problems) == 3, problems
    assert problems[0].startswith("gpu: replicas 0 not within min 36")
    assert problems[1] == "headGroupSpec: restartPolicy None, want 'Never'"
    assert problems[2] == "cpu: no containers"


def image_path_in_repo(path: str) -> Path:
    assert path.startswith(IMAGE_REPO + "/"), f"{path} is not inside the image's repository {IMAGE_REPO}"
    return REPO / path[len(IMAGE_REPO) + 1:]


def test_rayjob_submits_jobs_train_to_the_raycluster():
    job = load(RAYJOB)
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert spec["clusterSelector"] == {"ray.io/cluster": load(KUBERAY)["metadata"]["name"]}
    # a shared cluster must outlive the job: KubeRay allows shutdown only for clusters the RayJob creates
    assert spec["shutdownAfterJobFinishes"] is False
    assert spec["submitterPodTemplate"]["spec"]["restartPolicy"] == "Never"
    assert spec["submitterPodTemplate"]["spec"]["containers"]
    command = spec["entrypoint"].split()
    assert command[:2] == ["python", f"{IMAGE_REPO}/jobs/train.py"]
    assert image_path_in_repo(command[1]).is_file()
    config = load_config(image_path_in_repo(command[command.index("--config") + 1]))
    assert config.resources.gpus_per_worker > 0
    assert "MLFLOW_TRACKING_URI" in yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]


def test_rayservice_serve_config_is_our_serve_app():
    service = load(RAYSERVICE)
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)
    assert serve_config["http_options"]["host"] == "0.0.0.0", "the serve Service must reach the proxies"
    # the same application as jobs/configs/serve/serve_app.yaml, naming a serve YAML inside the image
    ours = load(REPO / "jobs/configs/serve/serve_app.yaml")["applications"]
    apps = serve_config["applications"]
    assert [{**app, "args": {**app["args"], "config": None}} for app in apps] == \
           [{**app, "args": {**app["args"], "config": None}} for app in ours]
    serve_yaml = load_serve_config(image_path_in_repo(apps[0]["args"]["config"]))
    # every replica the serve YAML may ask for finds a GPU pod
    gpu_group = next(group for group in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
                     if group["groupName"] == "gpu")
    pod_gpus = int(gpu_group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    deployment = serve_yaml.deployment
    assert deployment.ray_actor_options.num_gpus <= pod_gpus
    assert deployment.autoscaling_config.max_replicas <= gpu_group["maxReplicas"] * pod_gpus
