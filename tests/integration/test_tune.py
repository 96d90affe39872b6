"""A Ray Tune search on the shared local Ray instance (2 CPUs), tracked on a real `mlflow server`:
trials are distributed runs, ASHA stops weak ones, the driver dies mid-search and the resumed search
re-runs no finished trial, MLflow holds a parent and exactly one child per trial, and the best config
trains as is. One search proves all of it: each trial costs a Ray Train start-up (~10 s here)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.orchestrate.train import FINISHED_MARKER
from pipeline.orchestrate.tune import finished_trial_metrics, run_search
from pipeline.search import load_search
from pipeline.tracking.runs import client_for, metric_history
from pipeline.training import fit_in_process

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
EPOCHS = 4

# Grid order is trial order, two trials at a time; ASHA's one rung is epoch 3. Trials 0 and 1 learn; 2
# and 3 have learning rates too small to learn anything, so at the rung their objective (robust + 0.5
# clean) trails 0's and 1's and ASHA's cut is certain, not luck. 4 learns, starts last and ends last: the
# driver is killed as soon as its run finishes.
SEARCH = """
[search]
num_samples = 1
seed = 0
clean_weight = 0.5

[asha]
grace_period = 3
reduction_factor = 2

[space]
"attack.num_steps" = { choice = [1, 5] }
"optim.lr" = { grid = [3e-3, 2e-3, 2e-7, 1e-7, 2.5e-3] }
"method.name" = { choice = ["pgd_at", "trades"] }
"""
WEAK_LRS = {2e-7, 1e-7}


def _overrides(digits_path, tmp_path, mlflow_uri, experiment):
    return [
        f'data.path="{digits_path}"',
        f'run.storage_path="{tmp_path / "runs"}"',
        f'tracking.uri="{mlflow_uri}"',
        f'tracking.experiment="{experiment}"',
        'tracking.registered_model="digits-tuned"',
        f"run.epochs={EPOCHS}",
        "schedule.eps_ramp_epochs=1",
        "validation.num_examples=128",
        # Two trials at a time on the 2-CPU test instance (2 workers x 0.5 CPU each): concurrent trials
        # are what a real search runs, and the suite waits for half as many worker start-ups.
        "scaling.cpus_per_worker=0.5",
    ]


def _children(mlflow_uri, experiment, parent_run_id):
    client = client_for(mlflow_uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")


def _kill_when_the_last_trial_finishes(command, tmp_path, name) -> set[str]:
    """Run the search's CLI driver until the last trial's run writes its finished marker, then SIGKILL
    it (as with a lost head node); the names of the runs finished by then. Tune has most likely not yet
    saved that trial as done, so the resumed search calls it again (the case CI once hit by chance)."""
    log = open(tmp_path / "search.log", "w")  # noqa: SIM115 - closed below
    driver = subprocess.Popen(command, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    runs = tmp_path / "runs"
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline:
            assert driver.poll() is None, (tmp_path / "search.log").read_text()[-3000:]
            finished = {p.parent.name for p in runs.glob(f"{name}-*/{FINISHED_MARKER}")}
            if any(n.endswith("_00004") for n in finished):
                return finished
            time.sleep(0.05)
        raise AssertionError("the last trial should finish within the deadline")
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
        log.close()


def test_search_stops_weak_trials_resumes_after_its_driver_dies_and_writes_a_best_config_that_trains(
    ray_address, digits_path, mlflow_server, tmp_path
):
    experiment, name = "tune-it", "tune-it-search"
    overrides = _overrides(digits_path, tmp_path, mlflow_server, experiment)
    search_file = tmp_path / "search.toml"
    search_file.write_text(SEARCH)
    command = [
        str(Path(sys.executable).with_name("advtrain")),
        "tune",
        "--config",
        str(ROOT / "jobs/configs/digits_demo.toml"),
        "--search",
        str(search_file),
        "--name",
        name,
        "--ray-address",
        ray_address,
        *[arg for o in overrides for arg in ("--set", o)],
    ]
    finished_names = _kill_when_the_last_trial_finishes(command, tmp_path, name)
    client = client_for(mlflow_server)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`advtrain.search` = '{name}'")
    finished_before = {r.info.run_name: r.info.start_time for r in runs if r.info.run_name in finished_names}
    assert finished_before.keys() == finished_names

    config = load_config(ROOT / "jobs/configs/digits_demo.toml", overrides)
    summary = run_search(config, load_search(search_file, config), name=name, resume=True, cwd=tmp_path)

    assert len(summary.rows) == 5
    by_lr = {r.params["optim.lr"]: r for r in summary.rows}
    stopped = {lr for lr, r in by_lr.items() if r.status.startswith("stopped by ASHA")}
    assert stopped >= WEAK_LRS, [(r.params, r.status) for r in summary.rows]
    assert all(by_lr[lr].epochs_run < EPOCHS for lr in WEAK_LRS)
    assert all(r.status == "completed" or r.status.startswith("stopped by ASHA") for r in summary.rows)
    assert all(r.epochs_run == EPOCHS for r in summary.rows if r.status == "completed")
    assert {r.run_name for r in summary.rows if r.status == "completed"} >= finished_names

    parent = client.get_run(summary.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["advtrain.kind"] == "search"
    children = _children(mlflow_server, experiment, summary.parent_run_id)
    assert sorted(c.info.run_name for c in children) == sorted(r.run_name for r in summary.rows), (
        "exactly one MLflow child run per trial, under the one parent"
    )
    for row in summary.rows:
        child = next(c for c in children if c.info.run_name == row.run_name)
        for key, value in row.params.items():
            assert child.data.params[key] == str(value), (key, child.data.params[key], value)
        assert child.data.tags["advtrain.stop_reason"] == row.status
        assert child.info.status == ("FINISHED" if row.status == "completed" else "KILLED")
        for metric in ("val/robust_acc", "train/loss"):
            epochs = [s for s, _ in metric_history(mlflow_server, child.info.run_id, metric)]
            assert epochs == list(range(1, row.epochs_run + 1)), ("one value per epoch", row.run_name, metric)
        if row.run_name in finished_before:
            # Not re-run: the same run, started when it first ran.
            assert child.info.start_time == finished_before[row.run_name]
    # What a trial called again reports when its run had already finished: its run's record, the run
    # left as it was.
    for row in summary.rows:
        child = next(c for c in children if c.info.run_name == row.run_name)
        recorded = finished_trial_metrics(
            config.model_copy(update={"run": config.run.model_copy(update={"name": row.run_name})})
        )
        if row.status != "completed":
            assert recorded is None, row
            continue
        assert recorded["epoch"] == EPOCHS and recorded["val/robust_acc"] == pytest.approx(row.robust)
        assert recorded["objective"] == pytest.approx(
            metric_history(mlflow_server, child.info.run_id, "objective")[-1][1]
        )
        assert not any(key.startswith(("test/", "registered/")) for key in recorded)
        again = client.get_run(child.info.run_id).info
        assert (again.status, again.end_time) == ("FINISHED", child.info.end_time)
    artifacts = {a.path for a in client.list_artifacts(summary.parent_run_id, "search")}
    assert {"search/best_config.toml", "search/clean_vs_robust.png", "search/trials.json"} <= artifacts

    # The best config is a run file: it loads, carries the best trial's values and trains as is (the one
    # Trainer, in this process: Ray runs of ordinary configs are proven in test_train_ray.py).
    best = load_config(summary.best_config_path)
    for key, value in summary.best.params.items():
        table, field = key.split(".")
        assert getattr(getattr(best, table), field) == value
    assert best.run.name == "" and best.tracking.registered_model == "digits-tuned"
    _, _, reporter = fit_in_process(best.model_copy(update={"run": best.run.model_copy(update={"epochs": 1})}))
    assert sorted(reporter.metrics) == [1] and reporter.model is not None
