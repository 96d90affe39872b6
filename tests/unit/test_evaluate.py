"""Evaluation on real (small) models without Ray: ensemble strength, merging, intervals."""

import torch

from pipeline.data import load_split
from pipeline.evaluate import evaluate_chunk, evaluate_examples, merge, per_example, wilson_interval


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
