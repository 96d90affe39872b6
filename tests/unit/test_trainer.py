"""The one driver, in-process: `Trainer` with a local world and an in-memory reporter (no Ray, no MLflow)."""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.config import load_config
from pipeline.data import read_metadata
from pipeline.models import build_model
from pipeline.training import SCHEMA_VERSION, InMemoryReporter, LocalWorld, Trainer, TrainState
from pipeline.training.inprocess import dataset_architecture

ROOT = Path(__file__).resolve().parents[2]


def _config(digits_path, *overrides):
    return load_config(
        ROOT / "jobs/configs/digits_demo.toml",
        [
            f'data.path="{digits_path}"',
            "run.epochs=3",
            "validation.num_examples=64",
            "validation.num_steps=3",
            "attack.num_steps=2",
            *overrides,
        ],
    )


def _arch(config):
    return dataset_architecture(config)


def _run(config, world=None, reporter=None):
    world = world or LocalWorld()
    reporter = reporter or InMemoryReporter()
    summary = Trainer(config, world, reporter, architecture=_arch(config)).run()
    return summary, world, reporter


def test_every_epoch_is_reported_once_and_the_best_epoch_is_registered(digits_path):
    config = _config(digits_path, "run.keep_best=true")
    summary, world, reporter = _run(config)
    assert sorted(reporter.metrics) == [1, 2, 3] and len(world.committed) == 3
    robust = {epoch: m["val/robust_acc"] for epoch, m in reporter.metrics.items()}
    best = max(robust, key=lambda e: (robust[e], -e))  # the first epoch reaching the best value
    assert summary["registered_epoch"] == best == reporter.final["registered_epoch"]
    assert summary["val/robust_acc"] == robust[best]
    assert "time/worker_setup_s" in reporter.metrics[1] and "time/worker_setup_s" not in reporter.metrics[2]
    state = world.load_checkpoint()
    assert state["version"] == SCHEMA_VERSION and state["epoch"] == 3 and state["best"]["epoch"] == best
    assert set(state["rng"]) >= {"torch", "numpy", "python"}


class Killed(Exception):
    """Stands for a worker killed right after epoch 2's checkpoint committed, before its metrics were logged."""


class KilledAfterEpoch2(LocalWorld):
    def commit(self, metrics, state):
        super().commit(metrics, state)
        if metrics["epoch"] == 2:
            raise Killed


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(digits_path, tmp_path):
    config = _config(digits_path)
    whole, _, whole_reporter = _run(config)
    reporter = InMemoryReporter()
    with pytest.raises(Killed):
        _run(config, world=KilledAfterEpoch2(checkpoint_dir=tmp_path), reporter=reporter)
    assert sorted(reporter.metrics) == [1]  # epoch 2 is checkpointed but was never logged
    resumed, world, _ = _run(config, world=LocalWorld(checkpoint_dir=tmp_path), reporter=reporter)
    # Epoch 2 re-logged from the checkpoint's history, epoch 3 trained once: one record per epoch.
    assert sorted(reporter.metrics) == [1, 2, 3]
    assert len(world.committed) == 1
    # The same weights, hence the same numbers, as the run that was never interrupted.
    assert resumed["val/robust_acc"] == whole["val/robust_acc"]
    assert resumed["test/clean_acc"] == whole["test/clean_acc"]
    assert reporter.metrics[3]["train/loss"] == whole_reporter.metrics[3]["train/loss"]
    assert all(
        torch.equal(a, b)
        for a, b in zip(reporter.model.state_dict().values(), whole_reporter.model.state_dict().values(), strict=True)
    )


def test_the_weight_average_is_validated_checkpointed_and_shipped(digits_path):
    config = _config(digits_path, "run.weight_average_decay=0.9", "run.keep_best=false")
    _, world, reporter = _run(config)
    state = world.load_checkpoint()
    num_train = read_metadata(config.data.path).num_rows("train")
    assert state["average"]["updates"] == 3 * -(-num_train // config.data.batch_size)
    shipped = reporter.model.state_dict()
    assert all(torch.equal(shipped[k], state["average"]["model"][k]) for k in shipped)
    assert not all(torch.equal(shipped[k], state["model"][k]) for k in shipped)


def test_on_step_sees_every_step_and_stops_the_run_after_that_epoch(digits_path):
    config = _config(digits_path, "data.batch_size=512", "run.keep_best=false")
    steps_per_epoch = -(-read_metadata(config.data.path).num_rows("train") // 512)
    seen: list[tuple[int, int]] = []

    def after_step(epoch: int, step: int, seconds: float, network: torch.nn.Module) -> bool:
        assert seconds > 0 and network.training
        seen.append((epoch, step))
        return (epoch, step) == (2, 1)  # stop in the middle of epoch 2

    reporter = InMemoryReporter()
    Trainer(config, LocalWorld(), reporter, architecture=_arch(config), on_step=after_step).run()
    assert seen == [(1, s) for s in range(steps_per_epoch)] + [(2, 0), (2, 1)]
    # The cut epoch is still validated, committed and reported; no later epoch runs.
    assert sorted(reporter.metrics) == [1, 2] and reporter.final["registered_epoch"] == 2


def test_the_shipped_weight_average_is_the_warmed_up_ema_of_every_step(digits_path):
    config = _config(
        digits_path, "data.batch_size=512", "run.epochs=2", "run.weight_average_decay=0.5", "run.keep_best=false"
    )
    trained: list[dict[str, torch.Tensor]] = []

    def after_step(epoch: int, step: int, seconds: float, network: torch.nn.Module) -> bool:
        trained.append({k: v.detach().clone() for k, v in network.state_dict().items()})
        return False

    torch.manual_seed(config.run.seed)
    expected = {k: v.clone() for k, v in build_model(_arch(config)).state_dict().items()}  # the initial weights
    reporter = InMemoryReporter()
    Trainer(config, LocalWorld(), reporter, architecture=_arch(config), on_step=after_step).run()
    for n, weights in enumerate(trained):  # one optimizer step per minibatch
        d = min(0.5, (1 + n) / (10 + n))  # the warm-up gives way to the decay at n = 8
        expected = {k: d * expected[k] + (1 - d) * weights[k] for k in expected}
    final = reporter.model.state_dict()
    for k in expected:
        torch.testing.assert_close(final[k], expected[k], rtol=1e-5, atol=1e-6)
    assert not all(torch.equal(final[k], trained[-1][k]) for k in final)


def test_a_collapse_restores_the_last_good_epoch_and_falls_back(digits_path):
    """Digits does not collapse under any sane FGSM setting, so the guard is driven by a deliberately unstable
    run (FGSM without random start at a 30x learning rate, whose PGD probe goes up and down between epochs)
    and a threshold below those swings. What is checked is the recovery."""
    epochs = 10
    config = _config(
        digits_path,
        f"run.epochs={epochs}",
        "run.keep_best=false",
        'method.name="fgsm_rs"',
        'attack.name="fgsm"',
        "attack.num_steps=1",
        "attack.step_size_factor=1.25",
        "attack.random_start=false",
        "optim.lr=0.03",
        'optim.lr_schedule="constant"',
        "method.co_drop=0.01",
    )
    summary, world, reporter = _run(config)
    events = reporter.events.get("advtrain.catastrophic_overfitting")
    assert events and len(events) == 1, events
    event = events[0]
    collapsed = event["epoch"]
    assert event["probe_pgd_acc"] < event["best_probe_pgd_acc"] - 0.01
    assert event["fallback"] == "pgd_at with PGD-2" and event["restored_epoch"] == collapsed - 1
    # The collapsed epoch was redone, not logged twice; every later epoch trained with the fallback.
    assert sorted(reporter.metrics) == list(range(1, epochs + 1))
    assert all(reporter.metrics[e]["train/fallback"] == float(e >= collapsed) for e in range(1, epochs + 1))
    assert world.load_checkpoint()["guard"] == {"fallback": True, "events": events}
    assert summary["registered_epoch"] == epochs


def test_load_refuses_another_schema_version(digits_path):
    config = _config(digits_path)
    trainer = Trainer(config, LocalWorld(), InMemoryReporter(), architecture=_arch(config))
    trainer._load_data()
    state: TrainState = trainer._build_state()
    with pytest.raises(ValueError, match="schema version 0"):
        state.load_state_dict({**state.state_dict(), "version": 0})


def _ddp_rank(rank, world_size, port, digits_path, out, overrides=()):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        config = _config(digits_path, "run.epochs=2", *overrides)
        world, reporter = LocalWorld(), InMemoryReporter()
        trainer = Trainer(config, world, reporter, architecture=_arch(config))
        trainer.run()
        # What each rank ends with: the shipped weights (the average where one is kept).
        torch.save({k: v.detach().clone() for k, v in trainer.model.module.state_dict().items()}, f"{out}/{rank}.pt")
        if rank == 0:
            torch.save(
                {"checkpoint": world.load_checkpoint(), "shipped": reporter.model.state_dict()}, f"{out}/rank0.pt"
            )
    finally:
        dist.destroy_process_group()


def _spawn_ddp(digits_path, tmp_path, *overrides):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_rank, args=(2, port, str(digits_path), str(tmp_path), overrides), nprocs=2, join=True)
    return [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in (0, 1)]


def test_two_ddp_ranks_train_identical_replicas(digits_path, tmp_path):
    a, b = _spawn_ddp(digits_path, tmp_path)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_ddp_ranks_keep_identical_averages_and_ship_the_average(digits_path, tmp_path):
    """Each rank keeps its own average, one update per optimizer step of its shard; they stay identical
    (DDP keeps the trained weights identical), and rank 0 checkpoints and ships it."""
    a, b = _spawn_ddp(digits_path, tmp_path, "run.weight_average_decay=0.9", "run.keep_best=false")
    assert all(torch.equal(a[k], b[k]) for k in a)
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    state, shipped = rank0["checkpoint"], rank0["shipped"]
    config = _config(digits_path)
    steps_per_epoch = -(-(read_metadata(config.data.path).num_rows("train") // 2) // config.data.batch_size)
    assert state["average"]["updates"] == 2 * steps_per_epoch
    assert all(torch.equal(shipped[k], state["average"]["model"][k]) for k in shipped)
    assert all(torch.equal(shipped[k], a[k]) for k in shipped)
    assert not all(torch.equal(shipped[k], state["model"][k]) for k in shipped)
