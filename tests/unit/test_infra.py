"""Deployment files are checked, not just shipped: every Kubernetes manifest parses and has what
KubeRay / Kubernetes require, every job entrypoint names a real jobs/ script and a config that loads,
token auth is on, and no secret is inlined."""

from __future__ import annotations

import re
import shlex
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
