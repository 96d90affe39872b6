"""Ray Tune searches on the shared local Ray instance (2 CPUs), tracked on a real `mlflow server`:
trials are distributed runs, ASHA stops weak ones, MLflow holds a parent and one child per trial, the
best config trains as is, and an interrupted search resumes without re-running finished trials."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.orchestrate.train import FINISHED_MARKER, run_training
from pipeline.orchestrate.tune import finished_trial_metrics, run_search
from pipeline.search import load_search
from pipeline.tracking.runs import client_for, metric_history

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
EPOCHS = 4

SEARCH = """
[search]
num_samples = 4
seed = {seed}

[asha]
grace_period = 1
reduction_factor = 2

[space]
"attack.num_steps" = {{ choice = [1, 5] }}
"optim.lr" = {{ loguniform = [1e-4, 3e-3] }}
"method.name" = {{ choice = ["pgd_at", "trades"] }}
"""


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


def test_search_runs_trials_stops_weak_ones_and_writes_a_best_config_that_trains(
    ray_address, digits_path, mlflow_server, tmp_path
):
    overrides = _overrides(digits_path, tmp_path, mlflow_server, "tune-it")
    config = load_config(ROOT / "jobs/configs/digits_demo.toml", overrides)
    search_file = tmp_path / "search.toml"
    # Grid order is trial order: two learnable LRs finish first, then two LRs too small to learn anything,
    # whose objective (robust + 0.5 clean) trails at every rung, so ASHA's cut is certain, not luck.
    search_file.write_text(
        SEARCH.format(seed=0)
        .replace("num_samples = 4", "num_samples = 1\nclean_weight = 0.5")
        .replace('"optim.lr" = { loguniform = [1e-4, 3e-3] }', '"optim.lr" = { grid = [3e-3, 2e-3, 2e-7, 1e-7] }')
    )
    summary = run_search(config, load_search(search_file, config), name="tune-it-search", cwd=tmp_path)

    assert len(summary.rows) == 4
    stopped = {r.params["optim.lr"] for r in summary.rows if r.status.startswith("stopped by ASHA")}
    assert stopped & {2e-7, 1e-7}, [(r.params, r.status) for r in summary.rows]
    assert any(r.status == "completed" for r in summary.rows)
    assert all(r.epochs_run == EPOCHS for r in summary.rows if r.status == "completed")

    client = client_for(mlflow_server)
    parent = client.get_run(summary.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["advtrain.kind"] == "search"
    children = _children(mlflow_server, "tune-it", summary.parent_run_id)
    assert sorted(c.info.run_name for c in children) == sorted(r.run_name for r in summary.rows)
    for row in summary.rows:
        child = next(c for c in children if c.info.run_name == row.run_name)
        for key, value in row.params.items():
            assert child.data.params[key] == str(value), (key, child.data.params[key], value)
        assert child.data.tags["advtrain.stop_reason"] == row.status
        assert child.info.status == ("FINISHED" if row.status == "completed" else "KILLED")
        epochs = [s for s, _ in metric_history(mlflow_server, child.info.run_id, "val/robust_acc")]
        assert epochs == list(range(1, row.epochs_run + 1)), "one value per epoch, as many as the trial ran"
    # A resumed search calls again a trial whose run finished just before the driver died (Tune had not
    # saved it as done): the trial reports what its run recorded, and the run is left as it was.
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

    # The best config is a run file: it loads, carries the best trial's values and trains as is.
    best = load_config(summary.best_config_path)
    for key, value in summary.best.params.items():
        table, name = key.split(".")
        assert getattr(getattr(best, table), name) == value
    assert best.run.name == "" and best.tracking.registered_model == "digits-tuned"
    retrained = run_training(best.model_copy(update={"run": best.run.model_copy(update={"epochs": 1})}), cwd=tmp_path)
    assert retrained.model_version is not None and retrained.epochs == 1


def test_interrupted_search_resumes_without_rerunning_finished_trials(
    ray_address, digits_path, mlflow_server, tmp_path
):
    experiment = "tune-resume"
    overrides = [*_overrides(digits_path, tmp_path, mlflow_server, experiment), "run.epochs=2"]
    search_file = tmp_path / "search.toml"
    # Three trials: two finish before the kill, the third is left for the resumed search.
    search_file.write_text(
        SEARCH.format(seed=1).replace("num_samples = 4", "num_samples = 3").replace("[asha]", "[asha]\nenabled = false")
    )
    name = "tune-resume-search"
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
    log = open(tmp_path / "search.log", "w")  # noqa: SIM115 - closed below
    driver = subprocess.Popen(command, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    client = client_for(mlflow_server)
    finished_names: set[str] = set()
    deadline = time.monotonic() + 600
    try:
        # Killed as soon as a second trial's run writes its finished marker: Tune has most likely not yet
        # saved that trial as done, so the resumed search calls it again (the case CI once hit by chance).
        while time.monotonic() < deadline and len(finished_names) < 2:
            assert driver.poll() is None, (tmp_path / "search.log").read_text()[-3000:]
            finished_names = {p.parent.name for p in (tmp_path / "runs").glob(f"{name}-*/{FINISHED_MARKER}")}
            time.sleep(0.05)
        assert len(finished_names) >= 2, "two trials should finish within the deadline"
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver dies mid-search, as with a lost head node
        driver.wait()
        log.close()
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`advtrain.search` = '{name}'")
    finished_before = {r.info.run_name: r.info.start_time for r in runs if r.info.run_name in finished_names}
    assert finished_before.keys() == finished_names

    config = load_config(ROOT / "jobs/configs/digits_demo.toml", overrides)
    summary = run_search(config, load_search(search_file, config), name=name, resume=True, cwd=tmp_path)
    assert len(summary.rows) == 3 and all(r.status == "completed" for r in summary.rows), summary.rows
    assert set(finished_before) < {r.run_name for r in summary.rows}, "the resumed search had a trial left to run"
    runs = client.search_runs(
        [client.get_experiment_by_name(experiment).experiment_id], filter_string=f"tags.`advtrain.search` = '{name}'"
    )
    names = [r.info.run_name for r in runs]
    assert sorted(names) == sorted({r.run_name for r in summary.rows}), "exactly one MLflow child run per trial"
    for run in runs:
        assert run.data.tags["mlflow.parentRunId"] == summary.parent_run_id
        steps = [s for s, _ in metric_history(mlflow_server, run.info.run_id, "train/loss")]
        assert steps == [1, 2], (run.info.run_name, steps)
        assert run.info.status == "FINISHED", run.info.run_name
        if run.info.run_name in finished_before:
            # Not re-run: the same run, started when it first ran.
            assert run.info.start_time == finished_before[run.info.run_name]
