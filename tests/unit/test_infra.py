"""Deployment files are checked, not just shipped: every Kubernetes manifest parses and has what
KubeRay / Kubernetes require, every job entrypoint names a real jobs/ script and a config that loads,
token auth is on, and no secret is inlined. GPU groups (docs/cluster.md, "GPU nodes"): declared to Ray,
autoscaled from zero on the long-lived cluster, a memory-backed /dev/shm, NCCL settings, a job's GPUs and
learning rate consistent with its workers, and an image whose torch is a CUDA build."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_config

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = sorted((ROOT / "infra/k8s").glob("*.yaml"))
SECRET_LIKE = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY", re.IGNORECASE)


def _documents():
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield path.name, doc


def _pod_specs(doc):
    spec = doc["spec"]
    match doc["kind"]:
        case "RayCluster":
            yield from _cluster_pods(spec)
        case "RayJob":
            if "rayClusterSpec" in spec:
                yield from _cluster_pods(spec["rayClusterSpec"])
            if "submitterPodTemplate" in spec:
                yield "submitter", spec["submitterPodTemplate"]["spec"]
        case "Deployment" | "StatefulSet":
            yield doc["metadata"]["name"], spec["template"]["spec"]


def _cluster_pods(spec):
    assert spec["rayVersion"] == "2.60.0", "the cluster's Ray must be the version the project pins"
    assert spec["authOptions"]["mode"] == "token", "Ray token authentication stays on"
    yield "head", spec["headGroupSpec"]["template"]["spec"]
    groups = spec["workerGroupSpecs"]
    assert len({g["groupName"] for g in groups}) == len(groups)
    for group in groups:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
        assert "rayStartParams" in group
        yield group["groupName"], group["template"]["spec"]


def test_there_are_manifests_for_the_cluster_jobs_and_tracking():
    kinds = {(name, doc["kind"]) for name, doc in _documents()}
    assert {k for _, k in kinds} >= {
        "RayCluster",
        "RayJob",
        "Deployment",
        "StatefulSet",
        "Service",
        "PersistentVolumeClaim",
    }


@pytest.mark.parametrize(("name", "doc"), list(_documents()), ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_manifest_has_required_fields_and_no_inlined_secret(name, doc):
    assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"] and doc["metadata"]["namespace"]
    for pod, spec in _pod_specs(doc):
        assert spec["containers"], (name, pod)
        for container in spec["containers"]:
            assert container["name"] and container["image"], (name, pod)
            resources = container["resources"]
            assert resources["requests"] and resources["limits"], (name, pod, "resource requests and limits")
            for env in container.get("env", []):
                if SECRET_LIKE.search(env["name"]):
                    assert "value" not in env and "secretKeyRef" in env["valueFrom"], (name, env["name"])
        mounted = {m["name"] for c in spec["containers"] for m in c.get("volumeMounts", [])}
        assert mounted <= {v["name"] for v in spec.get("volumes", [])} | _claim_templates(doc), (name, pod)
    if doc["kind"] in ("Deployment", "StatefulSet"):
        assert doc["spec"]["selector"]["matchLabels"].items() <= doc["spec"]["template"]["metadata"]["labels"].items()


def _claim_templates(doc) -> set[str]:
    return {t["metadata"]["name"] for t in doc["spec"].get("volumeClaimTemplates", [])}


def test_services_select_pods_that_exist():
    docs = [doc for _, doc in _documents()]
    labels = [d["spec"]["template"]["metadata"]["labels"] for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    for service in (d for d in docs if d["kind"] == "Service"):
        assert any(service["spec"]["selector"].items() <= lab.items() for lab in labels), service["metadata"]["name"]


@pytest.mark.parametrize(
    "doc", [d for _, d in _documents() if d["kind"] == "RayJob"], ids=lambda d: d["metadata"]["name"]
)
def test_rayjob_entrypoint_names_a_real_script_and_config(doc):
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[0] == "python" and (ROOT / argv[1]).is_file(), argv[:2]
    assert argv[1].startswith("jobs/")
    config = argv[argv.index("--config") + 1]
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    loaded = load_config(ROOT / config, overrides)
    assert loaded.run.storage_path.startswith("/shared"), "checkpoints on the shared volume survive a node"
    if "--search" in argv:
        from pipeline.orchestrate.tune import load_search

        load_search(ROOT / argv[argv.index("--search") + 1], loaded)
    runtime_env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == "/app"


def test_the_job_driver_stays_off_preemptible_nodes():
    for _, doc in _documents():
        if doc["kind"] == "RayJob" and "rayClusterSpec" in doc["spec"]:
            head = doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
            assert head["nodeSelector"] == {"cloud.google.com/gke-spot": "false"}


def test_local_runtime_env_and_scripts():
    runtime_env = yaml.safe_load((ROOT / "jobs/runtime_env.yaml").read_text())
    assert runtime_env["working_dir"] == "." and ".venv" in runtime_env["excludes"]
    for script in ("start_cluster.sh", "stop_cluster.sh"):
        path = ROOT / "infra/local" / script
        assert path.stat().st_mode & 0o111, f"{script} must be executable"
        assert "ray stop" not in path.read_text().replace("never `ray stop`", "")


# GPU nodes (docs/cluster.md).


def _clusters():
    """(file, cluster spec) for every RayCluster and every RayJob that brings its own cluster."""
    for name, doc in _documents():
        if doc["kind"] == "RayCluster":
            yield name, doc["spec"]
        elif doc["kind"] == "RayJob" and "rayClusterSpec" in doc["spec"]:
            yield name, doc["spec"]["rayClusterSpec"]


def _ray_container(group) -> dict:
    containers = group["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "ray-worker")


def _gpus(group) -> int:
    return int(_ray_container(group)["resources"]["limits"].get("nvidia.com/gpu", 0))


def _gpu_groups():
    for name, cluster in _clusters():
        for group in cluster["workerGroupSpecs"]:
            if _gpus(group):
                yield name, cluster, group


def test_there_are_gpu_groups_to_check():
    assert {name for name, _, _ in _gpu_groups()} >= {"raycluster.yaml", "rayjob-train.yaml"}


def test_gpu_groups_declare_their_gpus_to_ray_and_can_get_a_pod():
    for name, cluster, group in _gpu_groups():
        resources = _ray_container(group)["resources"]
        assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"], name
        assert group["rayStartParams"]["num-gpus"] == str(_gpus(group)), (name, "num-gpus = nvidia.com/gpu")
        # replicas 0 without the autoscaler never gets a pod: a use_gpu run would wait forever.
        assert group["replicas"] >= 1 or cluster.get("enableInTreeAutoscaling") is True, name


def test_the_long_lived_cluster_scales_its_gpu_group_from_zero():
    (cluster,) = [spec for name, spec in _clusters() if name == "raycluster.yaml"]
    assert cluster["enableInTreeAutoscaling"] is True
    options = cluster["autoscalerOptions"]
    # v2 publishes the groups' largest sizes, which the GPU checks read: no GPU pod yet is not "no GPUs".
    assert options["version"] == "v2"
    assert options["upscalingMode"] in ("Default", "Aggressive", "Conservative")
    assert isinstance(options["idleTimeoutSeconds"], int) and options["idleTimeoutSeconds"] > 0
    (gpu,) = [g for g in cluster["workerGroupSpecs"] if _gpus(g)]
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 1


def test_every_worker_pod_has_a_memory_backed_dev_shm():
    for name, cluster in _clusters():
        for group in cluster["workerGroupSpecs"]:
            container = _ray_container(group)
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            assert "/dev/shm" in mounts, (name, group["groupName"], "Kubernetes' default shm is 64 MiB")
            volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
            shm = volumes[mounts["/dev/shm"]]["emptyDir"]
            assert shm["medium"] == "Memory", (name, group["groupName"])
            assert str(shm["sizeLimit"]) == str(container["resources"]["limits"]["memory"]), (name, group["groupName"])


def test_gpu_pods_pass_nccl_settings():
    for name, _, group in _gpu_groups():
        env = {e["name"]: e.get("value") for e in _ray_container(group).get("env", [])}
        assert env.get("NCCL_SOCKET_IFNAME") and env.get("NCCL_DEBUG"), (name, group["groupName"])


def _job_configs():
    """(file, job doc, loaded config, raw recipe TOML) for every RayJob."""
    for name, doc in _documents():
        if doc["kind"] == "RayJob":
            argv = shlex.split(doc["spec"]["entrypoint"])
            recipe = ROOT / argv[argv.index("--config") + 1]
            overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
            yield name, doc, load_config(recipe, overrides), tomllib.loads(recipe.read_text())


def test_a_job_with_its_own_gpu_cluster_uses_every_gpu_once():
    checked = 0
    for name, doc, config, _ in _job_configs():
        cluster = doc["spec"].get("rayClusterSpec")
        gpus = sum(g["replicas"] * _gpus(g) for g in cluster["workerGroupSpecs"]) if cluster else 0
        if gpus:
            assert config.scaling.use_gpu, (name, "a GPU cluster needs --set scaling.use_gpu=true")
            assert config.scaling.num_workers == gpus, (name, "one Ray Train worker per GPU")
            checked += 1
    assert checked >= 1


def test_a_job_scales_the_learning_rate_with_its_global_batch():
    """Linear scaling rule (Goyal et al. 2017): lr / global batch stays the recipe's; data.batch_size is per
    worker, so the global batch is scaling.num_workers x data.batch_size."""
    for name, _, config, recipe in _job_configs():
        recipe_batch = recipe["scaling"]["num_workers"] * recipe["data"]["batch_size"]
        job_batch = config.scaling.num_workers * config.data.batch_size
        expected = recipe["optim"]["lr"] * job_batch / recipe_batch
        assert config.optim.lr == pytest.approx(expected), (name, f"optim.lr should be {expected}")


def test_the_image_installs_a_cuda_torch_and_checks_it():
    dockerfile = (ROOT / "infra/k8s/Dockerfile").read_text().replace("\\\n", "")  # join continued lines
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [d for d in dependencies if d.startswith("torch==")]
    base = re.search(r"^FROM rayproject/ray:2\.60\.0-py\d+-(\S+)$", dockerfile, re.MULTILINE)
    assert base and (base[1] == "gpu" or base[1].startswith("cu12")), "a CUDA 12 Ray image"
    cuda = re.search(r"^ARG TORCH_CUDA=(cu\d+)$", dockerfile, re.MULTILINE)
    assert cuda and cuda[1].startswith("cu12"), "TORCH_CUDA in the image's CUDA major (12)"
    install = dockerfile.find(f"--index-url https://download.pytorch.org/whl/${{TORCH_CUDA}} {pin}")
    assert install >= 0, f"{pin} from PyTorch's CUDA index"
    project = dockerfile.find("-c constraints.txt -e .", install)
    assert project > install, "the project is installed after torch"
    assert dockerfile.find("torch.version.cuda.startswith", project) > project, "torch checked after both"
    constraints = (ROOT / "constraints.txt").read_text().splitlines()
    assert not [c for c in constraints if c.startswith("torch")], "a torch pin would replace the CUDA build"
