"""Evaluation on real (small) models without Ray: ensemble strength, merging, intervals."""

import itertools
import math

import pytest
import torch

from pipeline.data import load_split
from pipeline.evaluate import (
    ChunkResult,
    evaluate_chunk,
    evaluate_examples,
    mcnemar_disagree,
    merge,
    per_example,
    wilson_interval,
    worst_case,
)
from pipeline.evaluation_report import report
from pipeline.sanity import SanityInputs, extra_broken, minimal_agrees_with_fixed_eps, transfer_not_stronger


def test_standard_ensemble_breaks_undefended_model(digits_path, undefended):
    x, y = load_split(digits_path, "test", max_examples=128)
    result = evaluate_examples(undefended, x, y, norm="linf", eps=0.2, protocol="standard", seed=0, chunk_size=64)
    assert result.clean_correct.float().mean() > 0.85
    assert result.robust_after["square"].float().mean() < 0.05
    # Cumulative: each attack can only lower robust accuracy.
    after = [v.float().mean() for v in result.robust_after.values()]
    assert after == sorted(after, reverse=True)


def test_chunks_merge_in_index_order_whatever_the_arrival(digits_path, undefended):
    x, y = load_split(digits_path, "test", max_examples=96)
    chunks = [
        evaluate_chunk(undefended, x[s : s + 32], y[s : s + 32], start=s, norm="linf", eps=0.1, protocol="fast", seed=1)
        for s in (64, 0, 32)
    ]
    merged = merge(chunks)
    seen = []
    single = evaluate_examples(
        undefended, x, y, norm="linf", eps=0.1, protocol="fast", seed=1, chunk_size=32, on_chunk=seen.append
    )
    # The progress callback sees every chunk once, as it finishes, and the same results that are merged.
    assert [c.start for c in seen] == [0, 32, 64]
    assert torch.equal(torch.cat([c.robust_after["apgd_t"] for c in seen]), single.robust_after["apgd_t"])
    assert torch.equal(merged.robust_after["apgd_t"], single.robust_after["apgd_t"])
    assert torch.equal(merged.clean_correct, single.clean_correct)
    rows = per_example(merged, eps=0.1)
    assert len(rows["broken_by"]) == 96
    assert all(
        (b is None) == (r or not c)
        for b, r, c in zip(rows["broken_by"], rows["robust"], rows["clean_correct"], strict=True)
    )


def test_wilson_interval():
    low, high = wilson_interval(50, 100)
    assert abs(low - 0.4038) < 1e-3 and abs(high - 0.5962) < 1e-3
    low, high = wilson_interval(0, 20)
    assert low == 0.0 and 0.1 < high < 0.2


def test_targeted_apgd_runs_on_two_and_three_class_tasks(digits_path, undefended):
    """DLR needs 3 logits and targeted DLR 4 (AutoAttack refuses smaller tasks); a user's 2- or 3-class
    model is still evaluated (APGD-T is in both protocols; `fast` runs it), and it still breaks an
    undefended one."""
    x, y = load_split(digits_path, "test", max_examples=256)
    for classes in (2, 3):
        keep = y < classes
        xs, ys = x[keep][:48], y[keep][:48]

        def model(inputs, classes=classes):
            return undefended(inputs)[:, :classes]

        result = evaluate_examples(model, xs, ys, norm="linf", eps=0.3, protocol="fast", seed=0, chunk_size=48)
        clean = result.clean_correct.float().mean()
        assert clean > 0.85
        assert result.robust_after["apgd_t"].float().mean() < 0.5 * clean, classes


def _result(robust_after, *, clean, min_norms=None, transfer=None):
    n = len(clean)
    return ChunkResult(
        start=0,
        clean_correct=torch.tensor(clean),
        robust_after={k: torch.tensor(v) for k, v in robust_after.items()},
        predicted_adv=torch.zeros(n, dtype=torch.long),
        min_norms={k: torch.tensor(v) for k, v in (min_norms or {}).items()},
        transfer_correct={k: torch.tensor(v) for k, v in (transfer or {}).items()},
    )


def test_worst_case_counts_every_attack_that_ran():
    """An example broken by anything the evaluation ran is broken: the cascade, a minimal-norm adversarial
    within eps, a transferred example, or a sanity check's stronger attack. Each source is reported."""
    inf = math.inf
    result = _result(
        {"apgd_ce": [True, True, True, True, True, False], "square": [True, True, True, True, False, False]},
        clean=[True, True, True, True, True, False],
        min_norms={"deepfool": [0.5, 0.05, inf, 0.3, 0.02, 0.0], "fmn": [0.4, 0.2, 0.3, 0.25, 0.01, 0.0]},
        transfer={"pgd": [True, True, False, True, False, False]},
    )
    sanity = {"passed": True, "checks": {}, "broken_at_eps": [3]}
    robust = worst_case(result, eps=0.1, extra_broken=extra_broken(sanity, 6))
    # 0: robust to all; 1: DeepFool at 0.05 <= 0.1; 2: transfer; 3: sanity; 4: square; 5: clean-wrong.
    assert robust.tolist() == [True, False, False, False, False, False]
    rows = per_example(result, eps=0.1, extra_broken=extra_broken(sanity, 6))
    assert rows["broken_by"] == [None, "minimal", "transfer.pgd", "sanity", "square", None]
    assert rows["min_norm"] == pytest.approx([0.4, 0.05, 0.3, 0.25, 0.01, 0.0])
    rep = report(
        result,
        sanity=sanity,
        protocol="standard",
        norm="linf",
        eps=0.1,
        seed=0,
        model_info={},
        data_info={},
        seconds=1.0,
        surrogate="models:/other/1",
    )
    assert rep["robust_accuracy"] == pytest.approx(1 / 6) and rep["robust_accuracy_protocol"] == pytest.approx(4 / 6)
    assert rep["broken_by_extra"] == {"minimal": 1, "transfer": 1, "sanity": 1}
    assert rep["verdict"] == "passed" and rep["transfer"]["accuracy"] == pytest.approx(3 / 6)
    curve = rep["minimal"]["curve"]
    assert curve[0] == {"eps": 0.0, "accuracy": pytest.approx(5 / 6)}  # eps 0: the clean accuracy
    assert all(a["accuracy"] >= b["accuracy"] for a, b in itertools.pairwise(curve))
    # The median over the clean-correct examples of each one's best (smallest) perturbation.
    assert rep["minimal"]["median_norm"] == pytest.approx(0.25)


def test_mcnemar_flags_only_more_than_sampling_noise():
    a = torch.tensor([True] * 50 + [False] * 50)
    assert not mcnemar_disagree(a, a.clone())
    one_off = a.clone()
    one_off[0] = False
    assert not mcnemar_disagree(a, one_off)
    assert mcnemar_disagree(a, torch.zeros(100, dtype=torch.bool))


def test_transfer_from_an_undefended_surrogate_exposes_masked_gradients(digits_path, undefended):
    """A model whose input gradients are zero (rounding its input) looks robust to white-box attacks; examples
    crafted on an ordinary surrogate still fool it. The transfer sanity check flags exactly that, and the
    reported worst case counts the transferred breaks."""

    class Rounded(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(torch.round(x * 16) / 16)  # zero gradient almost everywhere

    masked = Rounded(undefended).eval()
    x, y = load_split(digits_path, "test", max_examples=64)
    result = evaluate_examples(
        masked, x, y, norm="linf", eps=0.2, protocol="fast", seed=0, chunk_size=64, surrogate=undefended
    )
    white_box = float(result.robust.float().mean())
    transfer = float(torch.stack(list(result.transfer_correct.values())).all(0).float().mean())
    assert transfer < white_box - 0.2, (transfer, white_box)
    inputs = SanityInputs(masked, x, y, "linf", 0.2, 0, 0.1, result, ["apgd_ce", "apgd_t"])
    assert not transfer_not_stronger(inputs)["passed"]
    assert float(worst_case(result, eps=0.2).float().mean()) <= transfer


def test_minimal_protocol_measures_each_examples_smallest_perturbation(digits_path, undefended):
    """`minimal`: DeepFool, FMN and FAB-T run unbounded on every clean-correct example; the best of them
    is each example's smallest adversarial perturbation, and the accuracy curve read off it agrees with
    the fixed-eps cascade at the threat model's eps (the sanity check that compares the two passes)."""
    # eps 0.2: the cascade breaks nearly every example with its first attacks (the rest skip), so the
    # test's time goes to the minimal-norm attacks it is about.
    x, y = load_split(digits_path, "test", max_examples=32)
    result = evaluate_examples(undefended, x, y, norm="linf", eps=0.2, protocol="minimal", seed=0, chunk_size=32)
    assert set(result.min_norms) == {"deepfool", "fmn", "fab_t"}
    best, clean = result.min_norm, result.clean_correct
    assert torch.isfinite(best[clean]).all() and (best[clean] > 0).all() and (best[~clean] == 0).all()
    assert (best <= torch.stack(list(result.min_norms.values()))).all()
    rep = report(
        result, sanity=None, protocol="minimal", norm="linf", eps=0.2, seed=0, model_info={}, data_info={}, seconds=1.0
    )
    minimal = rep["minimal"]
    assert minimal["accuracy_at_eps"] == pytest.approx(float((best > 0.2).float().mean()))
    assert 0.0 < minimal["median_norm"] < 0.2  # an undefended digits model: small perturbations suffice
    inputs = SanityInputs(undefended, x, y, "linf", 0.2, 0, 0.1, result, ["apgd_ce"])
    assert minimal_agrees_with_fixed_eps(inputs)["passed"]
    assert rep["robust_accuracy"] <= min(minimal["accuracy_at_eps"], rep["robust_accuracy_protocol"])


def test_minimal_evidence_stands_in_for_standard_only_in_the_safe_direction():
    """Promotion: a `minimal` evaluation ran the whole `standard` cascade (and more), so it is evidence for a
    `standard` policy, and a minimal-evaluated challenger may be compared with a standard-evaluated
    champion; never the other way round (that would compare a stricter champion number)."""
    from pipeline.tracking.gates import _covers

    assert _covers("minimal", "standard") and _covers("standard", "standard")
    assert not _covers("standard", "minimal") and not _covers("fast", "standard") and not _covers(None, "standard")
