"""Connecting to Ray: a cluster by address, or a local instance of this process's own. The only place
that calls ray.init."""

from __future__ import annotations

import os
import socket

import ray
import torch

from pipeline.config import Config, ConfigError

# Tune trial drivers hold this custom resource instead of a CPU (pipeline/orchestrate/tune.py).
TRIAL_DRIVER_RESOURCE = "trial_driver"
# The dashboard of the local instance this process started, if any (see init_ray).
_local_dashboard: dict[str, str] = {}


def init_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Connect to a cluster (address / RAY_ADDRESS) or start a local instance; quiet, fast settings."""
    if ray.is_initialized():
        return
    for key, value in {
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
        # Train V2's controller takes one report per health check (every 2 s by default) and a worker's
        # next report blocks until then: epochs shorter than 2 s each waited for it (a digits epoch is
        # 0.5 s). Measured: 8 epochs in 30.7 s -> 17.8 s. Inherited by a local instance's processes.
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
    }.items():
        os.environ.setdefault(key, value)
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        # An earlier local instance's dashboard (set below) is not this cluster's: it must not leak into it.
        if "url" in _local_dashboard and os.environ.get("RAY_API_SERVER_ADDRESS") == _local_dashboard["url"]:
            del os.environ["RAY_API_SERVER_ADDRESS"]
        ray.init(address=address, log_to_driver=True)
    else:
        # Every process of this instance must know that it is its cluster: Ray Train's placement-group
        # cleaner (a detached actor) asks the state API, which otherwise resolves the cluster as "auto"
        # and, with a second Ray instance on the machine, dies ("Found multiple active Ray instances")
        # or follows /tmp/ray's pointer to the other one; stopped trials' placement groups then leak and
        # a search waits forever for CPUs. Its processes inherit this environment at start.
        dashboard_port = _free_port()
        _local_dashboard["url"] = os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard_port}"
        # Loopback only: a local instance has no business on the machine's network interfaces. The
        # dashboard is what lets Ray free stopped runs' placement groups (shared/NOTES).
        ray.init(
            dashboard_port=dashboard_port,
            # "local": a new instance even when a `ray start` cluster on this machine (or a stale pointer
            # to one in /tmp/ray) exists; clusters are joined only through an explicit address.
            address="local",
            num_cpus=num_cpus,
            # Tune trial drivers hold this instead of a CPU (pipeline/orchestrate/tune.py): a trial that only waits on
            # its TorchTrainer must not take a CPU its own workers need.
            resources={TRIAL_DRIVER_RESOURCE: 1000},
            include_dashboard=True,
            log_to_driver=True,
            _node_ip_address="127.0.0.1",
        )


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def capacity() -> dict[str, float]:
    """What the connected cluster can offer: its resources now, or more where an autoscaler may add nodes
    (the largest its node groups can grow to, which Ray's autoscaler v2 publishes: KubeRay's GPU group
    scales from zero, so "no GPU now" is no reason to refuse)."""
    resources = dict(ray.cluster_resources())
    try:
        # Private, and the only place Ray exposes the autoscaler's limits; any failure means "none".
        from ray._private.state import state

        most = state.get_max_resources_from_cluster_config() or {}
    except (ImportError, AttributeError, RuntimeError, ValueError, ray.exceptions.RayError):
        most = {}
    for key, value in most.items():
        resources[key] = max(resources.get(key, 0.0), float(value))
    return resources


def check_gpus(config: Config, address: str | None = None) -> None:
    """scaling.use_gpu asks one GPU per worker: refuse a cluster that cannot ever offer that many, before
    anything is recorded (Ray Train would otherwise wait for the workers until it times out). Before Ray
    starts, a local instance's GPUs are this machine's; a cluster at an address is checked once connected."""
    if not config.scaling.use_gpu:
        return
    if ray.is_initialized():
        have = capacity().get("GPU", 0.0)
    elif address or os.environ.get("RAY_ADDRESS"):
        return
    else:
        have = float(torch.cuda.device_count())
    need = config.scaling.num_workers
    if have >= need:
        return
    fix = f"set scaling.num_workers = {int(have)}" if have >= 1 else "set scaling.use_gpu = false"
    raise ConfigError(
        f"scaling.use_gpu = true with scaling.num_workers = {need} needs {need} GPUs (one per worker), but this "
        f"Ray cluster has {have:g} and no autoscaler that adds more: {fix}, or connect to a cluster with GPU "
        "nodes (--ray-address / RAY_ADDRESS)"
    )


def check_ray_data_cpus(config: Config) -> None:
    total = ray.cluster_resources().get("CPU", 0)
    used = config.scaling.num_workers * config.scaling.cpus_per_worker
    if used > total - 0.5:
        raise ConfigError(
            f"data.loader 'ray_data' needs CPU left for Ray Data's read tasks, but {config.scaling.num_workers} "
            f"workers x {config.scaling.cpus_per_worker} CPU use {used} of the cluster's {total}: lower "
            "scaling.cpus_per_worker (e.g. 0.5) or use data.loader = 'memory'"
        )
