"""BRAVO metrics from 16-bit confidences (obsnet.metrics.bravo): hand-made frames with answers
worked out by hand, and random frames against a pixel-by-pixel rewrite of the toolkit's formulas
(tests/helpers/bravo_reference.py)."""
import math

import numpy as np
import pytest
import torch

from obsnet.metrics import bravo
from tests.helpers import bravo_reference as ref

L = bravo.LEVELS


def _meter(levels, pred, labels, valid, invalid, nclass=3, batches=1):
    """A BravoMeter fed the flat frame in ``batches`` pieces; confidences at the levels'
    midpoints, so that quantising gives the levels back."""
    meter = bravo.BravoMeter(nclass)
    conf = (torch.as_tensor(levels, dtype=torch.float64) + 0.5) / L
    arrays = [conf, torch.as_tensor(pred), torch.as_tensor(labels), torch.as_tensor(valid),
              torch.as_tensor(invalid)]
    for piece in zip(*(torch.tensor_split(a, batches) for a in arrays)):
        meter.update(*piece)
    return meter.compute()


def test_quantise_spans_every_level():
    q = bravo.quantise(torch.tensor([0.0, 1e-9, 0.5, 1 - 1e-9, 1.0, -0.1, 1.1]))
    assert q.tolist() == [0, 0, 32768, 65535, 65535, 0, 65535]


def test_hand_made_frame():
    """3 right pixels at levels 60000, 50000, 50000; 2 wrong at 50000, 10000; one invalid at
    level 0 and one void pixel (a perfect score there would show if it counted)."""
    levels = np.array([60000, 50000, 50000, 50000, 10000, 0, 65535])
    labels = np.array([0, 1, 1, 2, 2, 0, 0])
    pred = np.array([0, 1, 1, 1, 0, 0, 0])
    valid = np.array([1, 1, 1, 1, 1, 0, 0], bool)
    invalid = np.array([0, 0, 0, 0, 0, 1, 0], bool)
    got = _meter(levels, pred, labels, valid, invalid)
    assert got["auroc_valid"] == pytest.approx(5 / 6)  # 4 wins + 2 ties of 6 pairs
    assert got["fpr95_valid"] == pytest.approx(1 / 2)  # TPR 1/3 at 60000, 1 at 50000
    assert got["auprc_success_valid"] == pytest.approx(1 / 3 + 2 / 3 * 3 / 4)
    assert got["auprc_error_valid"] == pytest.approx(1 / 2 + 1 / 2 * 1 / 2)
    c = lambda k: (k + 0.5) / L  # noqa: E731
    ece = (c(10000) + 3 * abs(c(50000) - 2 / 3) + (1 - c(60000))) / 5
    assert got["ece_valid"] == pytest.approx(ece, abs=1e-12)
    # classes: 0 -> IoU 1/2 (1 right, 1 predicted 0 from label 2), 1 -> 2/3, 2 -> 0/2
    assert got["miou_valid"] == pytest.approx((1 / 2 + 2 / 3 + 0) / 3)
    # the invalid pixel has the least confidence: perfectly separated
    assert (got["auroc_ood"], got["auprc_ood"], got["fpr95_ood"]) == (1.0, 1.0, 0.0)
    sem = [got["miou_valid"], 1 - ece, 5 / 6, 5 / 6, 3 / 4, 1 / 2]
    assert got["semantic_hmean"] == pytest.approx(len(sem) / sum(1 / v for v in sem))
    assert got["ood_hmean"] == 1.0
    assert got["bravo_index"] == pytest.approx(2 / (1 / got["semantic_hmean"] + 1))


def test_one_level_for_all_is_one_threshold():
    levels = np.full(8, 40000)
    right = np.array([1, 1, 1, 0, 1, 0, 1, 1], bool)
    got = _meter(levels, np.where(right, 1, 0), np.ones(8, int), np.ones(8, bool),
                 np.zeros(8, bool))
    assert got["auroc_valid"] == 0.5
    assert got["fpr95_valid"] == 1.0
    assert got["auprc_success_valid"] == pytest.approx(6 / 8)
    assert got["auprc_error_valid"] == pytest.approx(2 / 8)
    assert "auroc_ood" not in got and "bravo_index" not in got and "ood_hmean" not in got
    assert got["hmean"] == got["semantic_hmean"]


def test_saturated_confidences_of_a_perfect_observer():
    """P(error) in {0, 1} exactly: levels 65535 for the right pixels, 0 for the wrong ones."""
    right = np.array([1, 1, 0, 1, 0], bool)
    conf = torch.tensor(np.where(right, 1.0, 0.0))
    meter = bravo.BravoMeter(2)
    meter.update(conf, torch.tensor(np.where(right, 1, 0)), torch.ones(5, dtype=torch.long),
                 torch.ones(5, dtype=torch.bool), torch.zeros(5, dtype=torch.bool))
    got = meter.compute()
    assert (got["auroc_valid"], got["fpr95_valid"]) == (1.0, 0.0)
    assert got["auprc_success_valid"] == got["auprc_error_valid"] == 1.0
    assert got["ece_valid"] == pytest.approx(0.5 / L)  # midpoints sit half a level inside


def test_all_right_leaves_the_ranking_metrics_undefined():
    got = _meter(np.array([100, 60000]), np.array([1, 2]), np.array([1, 2]),
                 np.ones(2, bool), np.zeros(2, bool))
    assert math.isnan(got["auroc_valid"]) and math.isnan(got["fpr95_valid"])
    assert got["auprc_error_valid"] == 0.0  # no error to recall, as the toolkit's step sum
    assert math.isnan(got["semantic_hmean"])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("spread", ["ties", "wide"])
def test_random_frames_match_the_pixel_reference(seed, spread):
    rng = np.random.default_rng(seed)
    n, nclass = 3000, 4
    labels = rng.integers(0, nclass, n)
    pred = np.where(rng.random(n) < 0.7, labels, rng.integers(0, nclass, n))
    kind = rng.choice(3, n, p=[0.8, 0.15, 0.05])  # valid, invalid, void
    valid, invalid = kind == 0, kind == 1
    base = rng.integers(0, 12, n) * 5000 if spread == "ties" else rng.integers(0, L, n)
    levels = np.clip(base + np.where(pred == labels, 3000, 0) - invalid * 4000, 0, L - 1)
    got = _meter(levels, pred, labels, valid, invalid, nclass, batches=3)
    want = ref.all_metrics(levels, pred, labels, valid, invalid, nclass)
    assert set(want) == set(got)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key


def test_hmean_matches_scipy_and_stops_at_zero():
    from scipy import stats
    assert bravo.hmean([0.2, 0.5, 0.9]) == pytest.approx(stats.hmean([0.2, 0.5, 0.9]))
    assert bravo.hmean([0.0, 0.5]) == 0.0
    assert math.isnan(bravo.hmean([]))


def test_without_classes_only_ood_metrics():
    meter = bravo.BravoMeter(2)
    meter.update(torch.tensor([0.9, 0.8, 0.1]), torch.zeros(3, dtype=torch.long),
                 torch.full((3,), 5), torch.tensor([True, True, False]),
                 torch.tensor([False, False, True]))
    got = meter.compute(with_classes=False)
    assert set(got) == {"auroc_ood", "auprc_ood", "fpr95_ood", "ood_hmean", "hmean"}
    assert got["auroc_ood"] == 1.0


def test_observer_confidence_spans_all_16_bits():
    """1 - sigmoid(logit), once: P(error) over [0, 1] gives every level from 0 to 65535 (the
    published baseline's second sigmoid kept it within [0.27, 0.5])."""
    from obsnet.methods import METHODS
    logits = torch.logit(torch.linspace(0, 1, 4 * L + 1, dtype=torch.float64))
    levels = bravo.quantise(bravo.bravo_confidence(METHODS["obsnet"], logits, None))
    assert levels.min() == 0 and levels.max() == L - 1
    assert torch.all(levels[1:] <= levels[:-1])  # more likely wrong, never more confident
    assert levels.unique().numel() == L


def test_squash_keeps_unbounded_scores_apart():
    from obsnet.methods import METHODS
    energies = torch.tensor([-30.0, -20.0, -10.0, -5.0, 0.0, 100.0])
    levels = bravo.quantise(bravo.bravo_confidence(METHODS["energy"], energies, None))
    assert torch.all(levels[1:] < levels[:-1])
