"""Minimal-norm attacks vs foolbox 3.3.4 at matched settings, on the undefended digits model: ours is as
strong or stronger (median minimal norm <= 1.02x foolbox's). Strength only: the time comparison and the
full table (both models, 200 examples, IBM ART too) are benchmarks/minimal_norm_conformance.py's.

Both sides' answers are checked the same way: an example counts as broken only where the model
misclassifies the answer, and the norm is computed here from x_adv - x. The median is over all examples
with inf for a failure, so a side cannot look stronger by giving up on the hard examples.
"""

import math

import numpy as np
import pytest
import torch

from pipeline.attacks import cw_l2, deepfool, fmn
from pipeline.data import load_split

NORM_BAR = 1.02
NUM_EXAMPLES = 32


@pytest.fixture(scope="module")
def batch(digits_path, undefended):
    """The first 32 test examples the undefended model classifies correctly."""
    x, y = load_split(digits_path, "test")
    with torch.no_grad():
        keep = undefended(x).argmax(1) == y
    return x[keep][:NUM_EXAMPLES].contiguous(), y[keep][:NUM_EXAMPLES].contiguous()


def _median_norm(model, x, y, x_adv, norm):
    """Median over all examples of ||x_adv - x|| (inf where x_adv is not misclassified)."""
    x_adv = torch.as_tensor(x_adv)
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        broken = model(x_adv).argmax(1) != y
    delta = (x_adv - x).flatten(1).double()
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    return float(np.median(torch.where(broken, size, math.inf).numpy()))


def _foolbox(model, attack, x, y):
    import foolbox

    raw, _, _ = attack(foolbox.PyTorchModel(model, bounds=(0, 1)), x, y, epsilons=None)
    return raw


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_deepfool_as_strong_as_foolbox(norm, batch, undefended):
    """The paper's settings on both sides: 50 steps, overshoot 0.02, 10 candidate classes."""
    import foolbox.attacks as fa

    x, y = batch
    ours = deepfool(undefended, x, y, eps=math.inf, norm=norm, num_steps=50, overshoot=0.02, num_candidates=10)
    reference = {"l2": fa.L2DeepFoolAttack, "linf": fa.LinfDeepFoolAttack}[norm]
    theirs = _foolbox(undefended, reference(steps=50, candidates=10, overshoot=0.02, loss="logits"), x, y)
    ours_median = _median_norm(undefended, x, y, ours, norm)
    theirs_median = _median_norm(undefended, x, y, theirs, norm)
    assert ours_median <= NORM_BAR * theirs_median, (ours_median, theirs_median)


def test_cw_l2_as_strong_as_foolbox(batch, undefended):
    """A small matched budget (100 steps x 3 search steps from c = 0.1, Adam lr 0.01, early abort) in
    place of the paper's 10000 x 9 from 1e-3. Both sides miss the same 2 of the 32 at this budget;
    foolbox then answers with the all-zero image (its fallback, misclassified, so counted as broken
    here with a norm of ~4), which cannot move the median of 32."""
    import foolbox.attacks as fa

    x, y = batch
    options = {"binary_search_steps": 3, "initial_const": 0.1, "confidence": 0.0}
    ours = cw_l2(undefended, x, y, eps=math.inf, num_steps=100, learning_rate=0.01, **options)
    reference = fa.L2CarliniWagnerAttack(steps=100, stepsize=0.01, abort_early=True, **options)
    theirs = _foolbox(undefended, reference, x, y)
    ours_median = _median_norm(undefended, x, y, ours, "l2")
    theirs_median = _median_norm(undefended, x, y, theirs, "l2")
    assert ours_median <= NORM_BAR * theirs_median, (ours_median, theirs_median)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_fmn_as_strong_as_foolbox(norm, batch, undefended):
    """100 steps on both sides, step size 1 -> 0.01 and gamma 0.05 -> 0.001 (foolbox's defaults)."""
    import foolbox.attacks as fa

    x, y = batch
    ours = fmn(undefended, x, y, eps=math.inf, norm=norm, num_steps=100, alpha_init=1.0, gamma_init=0.05)
    reference = {"l2": fa.L2FMNAttack, "linf": fa.LInfFMNAttack}[norm]
    theirs = _foolbox(undefended, reference(steps=100, max_stepsize=1.0, gamma=0.05), x, y)
    ours_median = _median_norm(undefended, x, y, ours, norm)
    theirs_median = _median_norm(undefended, x, y, theirs, norm)
    assert ours_median <= NORM_BAR * theirs_median, (ours_median, theirs_median)
