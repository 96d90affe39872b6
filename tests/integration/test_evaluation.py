"""Robust evaluation: gradient masking caught, sharding-invariant, evidence in MLflow, conformance with ART."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.data import load_split
from pipeline.evaluate import evaluate_examples
from pipeline.sanity import sanity_checks
from pipeline.tracking import model_store
from pipeline.tracking import runs as tracking
from pipeline.tracking.runs import client_for

pytestmark = pytest.mark.integration


class RoundInput(nn.Module):
    """Quantises pixels to 4 levels: a non-differentiable front end whose gradient is zero everywhere,
    the classic gradient-masking 'defence' (Athalye et al. 2018 break it with BPDA or black-box)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x * 3) / 3


def _evaluate_with_sanity(model, x, y, protocol="standard"):
    result = evaluate_examples(model, x, y, norm="linf", eps=0.2, protocol=protocol, seed=0, chunk_size=64)
    sanity = sanity_checks(model, x, y, norm="linf", eps=0.2, num_classes=10, result=result, protocol=protocol, seed=0)
    return result, sanity


def test_gradient_masked_model_is_flagged_and_black_box_finds_it(digits_path, undefended):
    masked = nn.Sequential(RoundInput(), undefended).eval()
    x, y = load_split(digits_path, "test", max_examples=100)
    _, sanity = _evaluate_with_sanity(masked, x, y)
    checks = sanity["checks"]
    assert not sanity["passed"]
    assert not checks["gradients_finite_nonzero"]["passed"]
    assert checks["gradients_finite_nonzero"]["fraction_zero_or_nonfinite"] > 0.9
    assert not checks["unbounded_attack"]["passed"]
    # White-box attacks see no gradient; the score-based Square attack still breaks the model.
    assert not checks["black_box_not_stronger"]["passed"]
    assert checks["black_box_not_stronger"]["square_extra_drop"] > 0.2


def test_adversarially_trained_model_passes_every_check(digits_path, adversarially_trained):
    model, _ = adversarially_trained
    x, y = load_split(digits_path, "test", max_examples=120)
    result, sanity = _evaluate_with_sanity(model, x, y)
    failed = {k: v for k, v in sanity["checks"].items() if not v["passed"]}
    assert sanity["passed"], failed
    assert result.robust_after["square"].float().mean() > 0.3


def test_sharded_over_ray_equals_one_process(ray_address, digits_path, adversarially_trained, tmp_path):
    from pipeline.orchestrate.evaluation import run_evaluation

    model, folder = adversarially_trained
    x, y = load_split(digits_path, "test", max_examples=160)
    report = run_evaluation(
        str(folder),
        data_path=str(digits_path),
        norm="linf",
        eps=0.2,
        num_examples=160,
        protocol="fast",
        chunk_size=32,
        out_dir=tmp_path / "report",
        progress=False,
    )
    sharded = json.loads((tmp_path / "report" / "per_example.json").read_text())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the Ray tasks run with one thread each; same numerics here
    try:
        single = evaluate_examples(model, x, y, norm="linf", eps=0.2, protocol="fast", seed=0, chunk_size=32)
    finally:
        torch.set_num_threads(threads)
    assert sharded["robust"] == single.robust_after["apgd_t"].tolist()
    assert sharded["clean_correct"] == single.clean_correct.tolist()
    # A fraction of counts on both sides (a float32 mean would differ in the 8th digit).
    robust_after = single.robust_after["apgd_t"]
    assert report["robust_accuracy"] == pytest.approx(int(robust_after.sum()) / len(robust_after), abs=1e-12)
    assert report["sanity"] is None  # fast protocol: no sanity checks
    # Where it ran and with which numerics (no GPU here: CPU tasks, fp32 without TF32).
    assert report["device"]["type"] == "cpu" and report["device"]["tf32"] is False
    assert report["device"]["deterministic"] is False and report["protocol"]["chunk_size"] == 32


def test_evaluation_of_a_registered_model_logs_evidence(
    ray_address, digits_path, adversarially_trained, mlflow_server, tmp_path
):
    from pipeline.orchestrate.evaluation import run_evaluation

    model, folder = adversarially_trained
    arch = json.loads((folder / "architecture.json").read_text())
    arch.pop("weights_sha256")
    run_id, _ = tracking.start_or_resume_run(
        mlflow_server,
        experiment="eval-it",
        run_name="eval-it",
        params={"data.path": str(digits_path), "attack.norm": "linf", "attack.eps": 0.2},
        config_toml="",
        tags={},
    )
    registered = model_store.log_and_register_model(
        mlflow_server, run_id, model=model, arch=arch, registered_model="eval-it", version_tags={}
    )
    report = run_evaluation(
        f"models:/eval-it/{registered['version']}",
        tracking_uri=mlflow_server,
        num_examples=64,
        protocol="standard",
        out_dir=tmp_path / "report",
        progress=False,
    )
    client = client_for(mlflow_server)
    tags = client.get_model_version("eval-it", str(registered["version"])).tags
    assert float(tags["eval.robust_acc"]) == report["robust_accuracy"]
    assert tags["eval.protocol"] == "standard" and tags["eval.norm"] == "linf" and tags["eval.eps"] == "0.2"
    assert tags["eval.weights_sha256"] == registered["weights_sha256"] == tags["weights_sha256"]
    assert tags["eval.sanity"] == {"passed": "passed", "suspect": "failed"}[report["verdict"]]
    # The tag is the worst case over everything that ran, never above the cascade's own number.
    assert float(tags["eval.robust_acc_protocol"]) == report["robust_accuracy_protocol"] >= report["robust_accuracy"]
    logged = {a.path for a in client.list_artifacts(run_id, "evaluation/standard-linf-eps0.2")}
    assert {
        "evaluation/standard-linf-eps0.2/report.json",
        "evaluation/standard-linf-eps0.2/accuracy_vs_eps.png",
        "evaluation/standard-linf-eps0.2/card.html",
    } <= logged
    card = (tmp_path / "report" / "card.html").read_text()
    # The card lists this registered version with the numbers its tags now hold.
    assert 'data-key="versions.0.robust_acc"' in card and f'data-value="{report["robust_accuracy"]!r}"' in card
    assert report["protocol"]["num_examples"] == 64 and len(report["robust_accuracy_ci95"]) == 2


def test_missing_model_and_alias_say_what_to_change(mlflow_server):
    from pipeline.tracking.model_store import resolve_model
    from pipeline.tracking.runs import TrackingError

    with pytest.raises(TrackingError, match="no alias 'champion'"):
        client = client_for(mlflow_server)
        client.create_registered_model("no-alias-model")
        resolve_model("models:/no-alias-model@champion", tracking_uri=mlflow_server)
    with pytest.raises(TrackingError, match="no version 7"):
        resolve_model("models:/no-alias-model/7", tracking_uri=mlflow_server)


# --------------------------------------------------------------------------- conformance with IBM ART


def _art_classifier(model):
    from art.estimators.classification import PyTorchClassifier

    return PyTorchClassifier(
        model=model, loss=nn.CrossEntropyLoss(), input_shape=(1, 8, 8), nb_classes=10, clip_values=(0.0, 1.0)
    )


def _accuracy(model, x_adv, y):
    with torch.no_grad():
        return float((model(torch.as_tensor(x_adv)).argmax(1) == y).float().mean())


def test_pgd_no_weaker_than_art_pgd(digits_path, adversarially_trained):
    from art.attacks.evasion import ProjectedGradientDescentPyTorch

    from pipeline.attacks import pgd

    model, _ = adversarially_trained
    x, y = load_split(digits_path, "test", max_examples=200)
    # Five random starts on both sides, both seeded: with one start, which of the borderline examples
    # fall depends on the draw (over 4 seeds on this model ART's PGD-50 gave 0.530-0.555 and ours
    # 0.545-0.560), and an unseeded ART made this test fail at random. With five: ART 0.500-0.505,
    # ours 0.500-0.515.
    np.random.seed(0)  # ART draws its random starts from numpy's global generator
    attack = ProjectedGradientDescentPyTorch(
        _art_classifier(model),
        norm=np.inf,
        eps=0.2,
        eps_step=0.01,
        max_iter=50,
        num_random_init=5,
        batch_size=200,
        verbose=False,
    )
    art_acc = _accuracy(model, attack.generate(x.numpy(), y.numpy()), y)
    generator = torch.Generator().manual_seed(0)
    x_ours = pgd(model, x, y, eps=0.2, step_size=0.01, num_steps=50, num_restarts=5, generator=generator)
    ours = _accuracy(model, x_ours, y)
    assert ours <= art_acc + 0.015, (ours, art_acc)  # 3 of 200 examples


def test_standard_ensemble_no_weaker_than_art_autoattack(digits_path, adversarially_trained):
    from art.attacks.evasion import AutoAttack, AutoProjectedGradientDescent, SquareAttack

    model, _ = adversarially_trained
    x, y = load_split(digits_path, "test", max_examples=40)
    classifier = _art_classifier(model)
    common = {"norm": np.inf, "eps": 0.2, "batch_size": 40, "verbose": False}
    # ART's counterparts of our standard protocol (its default list adds 5 random inits and DeepFool, and
    # takes ~4 min for 100 examples here: benchmarks/eval_vs_art.py times that one).
    attacks = [
        AutoProjectedGradientDescent(
            classifier, eps_step=0.05, max_iter=100, nb_random_init=1, loss_type="cross_entropy", **common
        ),
        AutoProjectedGradientDescent(
            classifier, eps_step=0.05, max_iter=100, nb_random_init=1, loss_type="difference_logits_ratio", **common
        ),
        SquareAttack(classifier, max_iter=5000, p_init=0.8, nb_restarts=1, **common),
    ]
    attack = AutoAttack(classifier, norm=np.inf, eps=0.2, eps_step=0.05, batch_size=40, attacks=attacks)
    art_acc = _accuracy(model, attack.generate(x.numpy(), y.numpy()), y)
    ours = evaluate_examples(model, x, y, norm="linf", eps=0.2, protocol="standard", seed=0, chunk_size=40)
    ours_acc = float(ours.robust_after["square"].float().mean())
    assert ours_acc <= art_acc + 0.01, (ours_acc, art_acc)
