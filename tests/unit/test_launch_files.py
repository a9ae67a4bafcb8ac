"""The cluster launch files (launch/, docker/) cannot be run here (no Docker, Kubernetes or
Slurm), so they are linted and checked against what they must agree with: the linters that ship
as wheels in the dev extra (hadolint, shellcheck, check-jsonschema with the compose-spec
schema), a hand-written schema of the fields of KubeRay's RayJob this project uses, the 16-GPU
cluster config the manifests are sized for, and constraints.txt, whose versions the image must
install (the drift test).
"""

from __future__ import annotations

import copy
import math
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "docker" / "Dockerfile"
DOCKERIGNORE = REPO / "docker" / "Dockerfile.dockerignore"
COMPOSE = REPO / "docker" / "compose.yaml"
RUNTIME_ENV = REPO / "launch" / "runtime_env.yaml"
RAYJOB = REPO / "launch" / "kuberay" / "rayjob.yaml"
SBATCH = REPO / "launch" / "slurm" / "prefopt.sbatch"
LAUNCH_README = REPO / "launch" / "README.md"
CLUSTER_CONFIG = REPO / "configs" / "cluster" / "llama3-8b-dpo-16gpu.yaml"

# `pip freeze` leaves these out of constraints.txt; the image pins them on its own.
BUILD_TOOLS = {"pip", "setuptools", "wheel"}
# A pin: name, optional extras, ==, a version starting with a digit ("torch==2.13.0+cu130").
PIN = re.compile(r"(?<![\w.\-])([A-Za-z0-9][\w.\-]*)(?:\[[^\]]*\])?==([0-9][^\s\"'\\,]*)")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonical(name)] = version.strip()
    return pins


def pin_drift(text: str, pinned: dict[str, str]) -> list[str]:
    """Every `name==version` in text against constraints.txt (local labels such as +cu130 aside):
    one line per pin that differs or that constraints.txt does not have."""
    problems = []
    for name, version in PIN.findall(text):
        key = canonical(name)
        if key in BUILD_TOOLS:
            continue
        if key not in pinned:
            problems.append(f"{name}=={version}: not in constraints.txt")
        elif version.split("+")[0] != pinned[key]:
            problems.append(f"{name}=={version}: constraints.txt has {pinned[key]}")
    return problems


def venv_tool(name: str) -> Path:
    """A linter's binary from the dev extra, beside this interpreter."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        pytest.skip(f"{name} is not in {path.parent}: install the dev extra (make install)")
    return path


def run(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=60, cwd=REPO)


def load(path: Path):
    return yaml.safe_load(path.read_text())


def cpu_quantity(value: str | int) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


# --- every manifest --------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted([*REPO.glob("launch/**/*.yaml"), *REPO.glob("docker/**/*.yaml")]),
                         ids=lambda p: str(p.relative_to(REPO)))
def test_every_yaml_file_parses_to_one_mapping(path):
    documents = list(yaml.safe_load_all(path.read_text()))
    assert len(documents) == 1 and isinstance(documents[0], dict), path


# --- docker/Dockerfile -----------------------------------------------------------------------


def test_hadolint_passes_the_dockerfile():
    out = run(venv_tool("hadolint"), "--no-color", DOCKERFILE)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_versions_equal_constraints():
    text = DOCKERFILE.read_text()
    assert pin_drift(text, constraints()) == []
    pinned = {canonical(name) for name, _ in PIN.findall(text)}
    assert {"torch", "deepspeed", "ray", "transformers", "accelerate", "mlflow"} <= pinned


def test_drift_check_fails_when_a_version_drifts():
    pinned = constraints()
    text = DOCKERFILE.read_text()
    drifted = text.replace(f"deepspeed=={pinned['deepspeed']}", f"deepspeed=={pinned['deepspeed']}.1")
    assert drifted != text
    assert [p for p in pin_drift(drifted, pinned) if p.startswith("deepspeed==")]
    assert pin_drift(text + "RUN pip install --no-cache-dir unheard-of==1.0\n", pinned) == [
        "unheard-of==1.0: not in constraints.txt"]


def test_cuda_of_base_image_torch_wheel_and_index_agree():
    text = DOCKERFILE.read_text()
    base = re.search(r"^FROM nvidia/cuda:(\d+)\.(\d+)\.\d+-devel-ubuntu[\d.]+\s*$", text, re.M)
    assert base, "FROM must be an nvidia/cuda devel image with a full version tag (nvcc builds the ops)"
    cuda = f"cu{base[1]}{base[2]}"
    torch_local = re.search(r"\btorch==[\d.]+\+(cu\d+)", text)
    index = re.search(r"https://download\.pytorch\.org/whl/(cu\d+)", text)
    assert torch_local and index, "torch must be the CUDA wheel from the PyTorch index"
    assert torch_local[1] == index[1] == cuda


def test_dockerfile_prebuilds_the_deepspeed_ops_prefopt_uses():
    text = DOCKERFILE.read_text()
    for setting in ("DS_BUILD_FUSED_ADAM=1", "DS_BUILD_CPU_ADAM=1", "TORCH_CUDA_ARCH_LIST=", "DS_ACCELERATOR=cuda",
                    "--no-build-isolation"):
        assert setting in text, setting
    assert "constraints.txt" in text and "grep -v '^torch=='" in text


def test_dockerfile_copies_only_what_exists_and_the_dockerignore_lets_through():
    allowed = {line[1:].rstrip("/") for line in DOCKERIGNORE.read_text().splitlines() if line.startswith("!")}
    copies = re.findall(r"^COPY (?!--from)(.+) \S+$", DOCKERFILE.read_text(), re.M)
    sources = [s for line in copies for s in line.split()]
    assert sources
    for source in sources:
        assert (REPO / source).exists(), source
        assert source.split("/")[0] in allowed, f"{source} is not let through by {DOCKERIGNORE.name}"


# --- docker/compose.yaml ---------------------------------------------------------------------


def test_compose_file_is_valid_against_the_compose_spec(tmp_path):
    checker = venv_tool("check-jsonschema")
    out = run(checker, "--builtin-schema", "vendor.compose-spec", COMPOSE)
    assert out.returncode == 0, out.stdout + out.stderr
    broken = tmp_path / "compose.yaml"  # the schema catches a misspelt key, so the check above means something
    broken.write_text(COMPOSE.read_text().replace("shm_size:", "shm_sise:"))
    assert run(checker, "--builtin-schema", "vendor.compose-spec", broken).returncode != 0


def test_compose_cluster_is_wired_together():
    services = load(COMPOSE)["services"]
    assert {"ray-head", "ray-worker", "mlflow", "minio", "minio-init"} <= set(services)
    for name, service in services.items():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image tag"
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: publish {port} on 127.0.0.1 only"
    head, worker = services["ray-head"], services["ray-worker"]
    gcs_port = next(a.split("=")[1] for a in head["command"] if a.startswith("--port="))
    assert f"--address=ray-head:{gcs_port}" in worker["command"]
    for node in (head, worker):
        assert "shared:/shared" in node["volumes"]
        assert node["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    mlflow_command = " ".join(services["mlflow"]["command"])
    allowed_hosts = re.search(r"--allowed-hosts (\S+)", mlflow_command)[1].split(",")
    assert "mlflow:5000" in allowed_hosts  # the Host header the Ray nodes send
    bucket = re.search(r"--artifacts-destination s3://([\w.-]+)", mlflow_command)[1]
    assert f"mc mb --ignore-existing local/{bucket}" in " ".join(services["minio-init"]["command"])
    assert services["mlflow"]["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"


# --- launch/runtime_env.yaml -----------------------------------------------------------------


def test_runtime_env_is_accepted_by_ray():
    from ray.runtime_env import RuntimeEnv

    env = load(RUNTIME_ENV)
    RuntimeEnv(**env)
    assert env["working_dir"] == "."
    assert all(isinstance(v, str) for v in env["env_vars"].values())
    assert "MLFLOW_TRACKING_URI" in env["env_vars"]


def test_runtime_env_excludes_what_gitignore_ignores():
    ignored = {line.strip() for line in (REPO / ".gitignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert ignored <= set(load(RUNTIME_ENV)["excludes"])


def test_runtime_env_versions_equal_constraints():
    assert pin_drift(RUNTIME_ENV.read_text(), constraints()) == []  # the commented pip list too


# --- launch/kuberay/rayjob.yaml --------------------------------------------------------------

_STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
_POD_TEMPLATE = {
    "type": "object",
    "required": ["spec"],
    "properties": {"spec": {
        "type": "object",
        "required": ["containers"],
        "properties": {
            "containers": {"type": "array", "minItems": 1, "items": {
                "type": "object",
                "required": ["name", "image"],
                "properties": {
                    "name": {"type": "string"},
                    "image": {"type": "string", "pattern": r"^[^\s:]+(:[\w.-]+)$"},
                    "env": {"type": "array", "items": {"type": "object", "required": ["name"]}},
                    "resources": {"type": "object", "properties": {
                        "requests": {"type": "object"}, "limits": {"type": "object"}}},
                    "volumeMounts": {"type": "array", "items": {
                        "type": "object", "required": ["name", "mountPath"]}},
                },
            }},
            "volumes": {"type": "array", "items": {"type": "object", "required": ["name"]}},
        },
    }},
}
_GROUP = {"rayStartParams": _STRINGS, "template": _POD_TEMPLATE}
# The RayJob fields of KubeRay's ray.io/v1 API that this project may use, with their types;
# a field not listed (a typo) is refused.
RAYJOB_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayJob"},
        "metadata": {"type": "object", "required": ["name"],
                     "properties": {"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"}}},
        "spec": {
            "type": "object",
            "required": ["entrypoint", "rayClusterSpec", "shutdownAfterJobFinishes", "ttlSecondsAfterFinished",
                         "activeDeadlineSeconds", "submissionMode"],
            "additionalProperties": False,
            "properties": {
                "entrypoint": {"type": "string", "minLength": 1},
                "runtimeEnvYAML": {"type": "string"},
                "shutdownAfterJobFinishes": {"type": "boolean"},
                "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
                "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
                "backoffLimit": {"type": "integer", "minimum": 0},
                "suspend": {"type": "boolean"},
                "jobId": {"type": "string"},
                "metadata": _STRINGS,
                "clusterSelector": _STRINGS,
                "entrypointNumCpus": {"type": "number"},
                "entrypointNumGpus": {"type": "number"},
                "entrypointResources": {"type": "string"},
                "submitterPodTemplate": _POD_TEMPLATE,
                "submitterConfig": {"type": "object"},
                "deletionStrategy": {"type": "object"},
                "managedBy": {"type": "string"},
                "rayClusterSpec": {
                    "type": "object",
                    "required": ["rayVersion", "headGroupSpec", "workerGroupSpecs"],
                    "additionalProperties": False,
                    "properties": {
                        "rayVersion": {"type": "string"},
                        "authOptions": {"type": "object", "properties": {"mode": {"enum": ["disabled", "token"]}}},
                        "enableInTreeAutoscaling": {"type": "boolean"},
                        "headGroupSpec": {
                            "type": "object", "required": ["template"], "additionalProperties": False,
                            "properties": {**_GROUP, "serviceType": {"type": "string"}}},
                        "workerGroupSpecs": {"type": "array", "minItems": 1, "items": {
                            "type": "object",
                            "required": ["groupName", "replicas", "template"],
                            "additionalProperties": False,
                            "properties": {
                                **_GROUP,
                                "groupName": {"type": "string"},
                                "replicas": {"type": "integer", "minimum": 1},
                                "minReplicas": {"type": "integer", "minimum": 0},
                                "maxReplicas": {"type": "integer", "minimum": 1},
                                "numOfHosts": {"type": "integer", "minimum": 1},
                            },
                        }},
                    },
                },
            },
        },
    },
}


def test_rayjob_matches_the_schema():
    jsonschema.Draft202012Validator.check_schema(RAYJOB_SCHEMA)
    jsonschema.validate(load(RAYJOB), RAYJOB_SCHEMA)


def _workers(job):
    return job["spec"]["rayClusterSpec"]["workerGroupSpecs"]


@pytest.mark.parametrize("break_it", [
    lambda job: job["spec"].pop("entrypoint"),
    lambda job: job["spec"].update(submissionMode="Http"),
    lambda job: job["spec"].update(shutdownAfterJobFinish=True),
    lambda job: job["spec"].update(ttlSecondsAfterFinished="600"),
    lambda job: _workers(job)[0]["rayStartParams"].update({"num-cpus": 72}),
    lambda job: _workers(job)[0].update(replicas="2"),
    lambda job: _workers(job)[0]["template"]["spec"]["containers"][0].update(image="prefopt"),
], ids=["no-entrypoint", "bad-mode", "misspelt-field", "ttl-as-string", "int-start-param", "replicas-as-string",
        "untagged-image"])
def test_rayjob_schema_refuses_a_broken_manifest(break_it):
    job = copy.deepcopy(load(RAYJOB))
    break_it(job)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(job, RAYJOB_SCHEMA)


def test_rayjob_holds_the_16_gpu_config():
    job, config = load(RAYJOB), load(CLUSTER_CONFIG)
    spec, cluster = job["spec"], job["spec"]["rayClusterSpec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert cluster["rayVersion"] == constraints()["ray"]
    policy = config["policy"]

    (group,) = _workers(job)
    (container,) = group["template"]["spec"]["containers"]
    limits = container["resources"]["limits"]
    gpus_per_pod = int(limits["nvidia.com/gpu"])
    assert group["replicas"] * gpus_per_pod == policy["num_workers"] * policy["gpus_per_worker"]
    ranks_per_pod = math.ceil(policy["num_workers"] / group["replicas"])
    ray_cpus = cpu_quantity(group["rayStartParams"]["num-cpus"])
    assert ranks_per_pod * policy["cpus_per_worker"] <= ray_cpus <= cpu_quantity(limits["cpu"])
    assert group.get("minReplicas", group["replicas"]) == group["replicas"]  # a gang: all pods or none

    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"  # no rank lands on the head
    (head_container,) = head["template"]["spec"]["containers"]
    assert head_container["image"] == container["image"]


def test_rayjob_entrypoint_reads_the_config_from_its_configmap():
    job = load(RAYJOB)
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    config_path = re.match(r"^(?:python -m prefopt\.launch\.job_entry|prefopt) train (/\S+\.yaml)\b",
                           job["spec"]["entrypoint"])[1]
    mounts = {m["mountPath"]: m["name"] for m in head["containers"][0]["volumeMounts"]}
    mount_dir = str(Path(config_path).parent)
    volume = next(v for v in head["volumes"] if v["name"] == mounts[mount_dir])
    assert "configMap" in volume
    # `kubectl create configmap --from-file=configs/cluster/X.yaml` names the key X.yaml
    assert (REPO / "configs" / "cluster" / Path(config_path).name).exists()


def test_rayjob_containers_take_mlflow_and_s3_settings_from_a_secret_and_mount_the_run_state():
    job = load(RAYJOB)
    cluster = job["spec"]["rayClusterSpec"]
    output_root = "/" + load(CLUSTER_CONFIG)["output_dir"].strip("/").split("/")[0]
    pod_specs = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in _workers(job)]
    for pod in pod_specs:
        container = pod["containers"][0]
        from_secret = {e["name"] for e in container["env"] if "secretKeyRef" in e.get("valueFrom", {})}
        assert {"MLFLOW_TRACKING_URI", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= from_secret
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volume = next(v for v in pod["volumes"] if v["name"] == mounts[output_root])
        assert "persistentVolumeClaim" in volume  # output_dir on a volume every pod mounts


# --- launch/slurm/prefopt.sbatch -------------------------------------------------------------


def test_sbatch_script_parses_and_passes_shellcheck():
    out = run("bash", "-n", SBATCH)
    assert out.returncode == 0, out.stderr
    out = run(venv_tool("shellcheck"), SBATCH)
    assert out.returncode == 0, out.stdout + out.stderr


def test_sbatch_script_asks_for_the_gpus_of_the_16_gpu_config():
    text = SBATCH.read_text()
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", text, re.M))
    policy = load(CLUSTER_CONFIG)["policy"]
    assert int(directives["nodes"]) * int(directives["gpus-per-node"]) == policy["num_workers"] * policy[
        "gpus_per_worker"]
    ranks_per_node = math.ceil(policy["num_workers"] / int(directives["nodes"]))
    assert ranks_per_node * policy["cpus_per_worker"] <= int(directives["cpus-per-task"])
    for step in ("ray start --head --block", "ray start --block --address=", "prefopt submit \"$config\"",
                 "--wait", "export RAY_AUTH_MODE=token", "export RAY_AUTH_TOKEN"):
        assert step in text, step


# --- launch/README.md ------------------------------------------------------------------------


def test_launch_readme_links_and_config_fields_exist():
    from prefopt.config import ClusterConfig

    text = LAUNCH_README.read_text()
    for link in re.findall(r"\]\(([^)#\s]+)\)", text):
        if not link.startswith("http"):
            assert (LAUNCH_README.parent / link).exists(), link
    for field in set(re.findall(r"`cluster\.(\w+)`", text)):
        assert field in ClusterConfig.model_fields, f"cluster.{field}"
    # The guide sends a cluster without a shared disk to the object store, and says how long a collective waits.
    assert "output_dir: s3://" in text and "../docs/storage.md" in text and "collective_timeout_s" in text
