"""Tests of obsnet/metrics/ against scikit-learn and hand-computed cases."""
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from obsnet.metrics.confusion import ConfusionMeter
from obsnet.metrics.ood import OODMeter, score_bins
from tests.helpers.reference import TOL, _assert_matches, _feed, _reference


def _gaussian(n, pos_rate, sep, seed):
    rng = np.random.default_rng(seed)
    y = rng.random(n) < pos_rate
    s = (rng.standard_normal(n) + sep * y).astype(np.float32)
    return y, s


def test_score_bins_preserve_order_and_zero_sign():  # the meter's coarse bins
    x = torch.tensor([-math.inf, -3e38, -2.0, -1e-30, -0.0, 0.0, 1e-40, 1e-30, 2.0, math.inf])
    b = score_bins(x, 24)
    assert torch.all(b[1:] >= b[:-1])
    assert b[4] == b[5]  # -0.0 and +0.0 are equal floats
    assert b.min() >= 0 and b.max() < 2 ** 24
    assert len(set(b.tolist())) == len(x) - 1


def test_gaussian_matches_sklearn():
    # 20 bits: AP's tie bias from 16-bit bins (~5e-4 here) exceeds TOL.
    y, s = _gaussian(100_000, 0.3, 1.0, seed=0)
    _assert_matches(_feed(OODMeter(), y, s, chunks=7), y, s)


def test_without_refinement_within_the_reported_bound():
    y, s = _gaussian(100_000, 0.3, 1.0, seed=1)
    res = _feed(OODMeter(max_refined=0), y, s, chunks=3)
    ref = _reference(y, s)
    assert 0 < res["auroc_bound"] < TOL
    assert abs(res["auroc"] - ref["auroc"]) <= res["auroc_bound"]
    _assert_matches(res, y, s)


def test_tie_heavy_matches_sklearn_exactly():
    y, s = _gaussian(50_000, 0.4, 0.7, seed=2)
    s = np.round(s, 1).astype(np.float32)
    _assert_matches(_feed(OODMeter(), y, s, chunks=4), y, s, tol=1e-9, tol_fpr=1e-9)


def test_saturated_probabilities_logit_and_one_minus_p():
    rng = np.random.default_rng(3)
    ulp = np.float32(2.0 ** -24)
    near_one = np.float32(1.0) - ulp * np.arange(2, dtype=np.float32)  # within 1e-7 of 1
    near_zero = (10.0 ** -np.arange(7, 30)).astype(np.float32)
    other = np.float32([0.5, 0.9, 1 - 2 * ulp, 1 - 3 * ulp])
    values = np.concatenate([near_one, near_zero, other])
    weights = np.concatenate([np.full(2, 0.4 / 2), np.full(23, 0.4 / 23), np.full(4, 0.2 / 4)])
    p = rng.choice(values, 40_000, p=weights).astype(np.float32)
    y = rng.random(p.size) < np.where(p > 0.5, 0.8, 0.2)
    assert np.sum(p >= 1 - 1e-7) > 10_000 and np.sum(p <= 1e-7) > 10_000
    p64 = p.astype(np.float64)
    with np.errstate(divide="ignore"):
        logit = (np.log(p64) - np.log1p(-p64)).astype(np.float32)  # p == 1 -> +inf
    for s in (logit, np.float32(1.0) - p):
        _assert_matches(_feed(OODMeter(), y, s, chunks=3), y, s, tol=1e-9, tol_fpr=1e-9)


def test_imbalanced_matches_sklearn():
    y, s = _gaussian(200_000, 0.001, 2.0, seed=4)
    assert 100 < y.sum() < 300
    _assert_matches(_feed(OODMeter(), y, s, chunks=5), y, s)


def test_valid_mask_matches_sklearn_on_kept_pixels():
    y, s = _gaussian(60_000, 0.3, 1.0, seed=5)
    valid = np.random.default_rng(6).random(y.size) < 0.6
    s[~valid] = np.float32(np.nan)  # NaN on ignored pixels is allowed
    res = _feed(OODMeter(), y.reshape(-1, 100), s.reshape(-1, 100), chunks=4,
                valid=valid.reshape(-1, 100))
    _assert_matches(res, y[valid], s[valid])


def _meter(scores, labels, **kw):
    m = OODMeter(**kw)
    m.update(torch.tensor(scores, dtype=torch.float32), torch.tensor(labels, dtype=torch.bool))
    return m


def test_fpr95_hand_separated():
    res = _meter([1.0] * 20 + [0.5] * 30, [True] * 20 + [False] * 30).compute()
    assert res["fpr95"] == 0.0 and res["auroc"] == 1.0 and res["ap"] == 1.0
    assert res["fpr95_neg"] == 0.0


def test_fpr95_hand_threshold_must_include_negatives():
    # 19 of 20 positives (95%) only once the threshold reaches 0.5, where 2 of 4 negatives sit.
    scores = [1.0] * 10 + [0.9] * 4 + [0.8] + [0.5] * 4 + [0.1] + [0.5, 0.5, 0.2, 0.2]
    labels = [True] * 20 + [False] * 4
    res = _meter(scores, labels).compute()
    assert res["fpr95"] == pytest.approx(0.5)
    # Accepting scores <= t: 95% of negatives needs t = 0.5 -> 5 of 20 positives too.
    assert res["fpr95_neg"] == pytest.approx(5 / 20)


def test_no_positives_gives_nan():
    res = _meter([0.1, 0.2, 0.3], [False] * 3).compute()
    for key in ("auroc", "ap", "fpr95", "fpr95_neg"):
        assert math.isnan(res[key]), key
    assert res["ap_neg"] == 1.0 and res["n_pos"] == 0 and res["n_neg"] == 3
    assert all(math.isnan(v) for k, v in OODMeter().compute().items()
               if k not in ("n_pos", "n_neg", "ace", "ece", "auroc_bound"))


def test_infinite_scores_are_fine():
    res = _meter([math.inf, 5.0, -math.inf, 0.0], [True, True, False, False]).compute()
    assert res["auroc"] == 1.0


def test_nan_scores_raise():
    with pytest.raises(ValueError):
        _meter([0.1, float("nan")], [True, False])
    m = OODMeter()
    with pytest.raises(ValueError):
        m.update(torch.rand(4), torch.ones(4, dtype=torch.bool), probs=torch.tensor([0, 2, 0, 0.]))


def test_state_size_is_bounded():
    m = OODMeter(max_refined=8)
    gen = torch.Generator().manual_seed(0)
    m.update(torch.randn(1000, generator=gen), torch.rand(1000, generator=gen) < 0.5)
    for _ in range(30):
        m.update(torch.randn(4, 64, 64, generator=gen) * 1e3 + 5e5 * torch.randint(0, 20, (1,)),
                 torch.rand(4, 64, 64, generator=gen) < 0.5,
                 probs=torch.rand(4, 64, 64, generator=gen))
    length = m.ncoarse + 8 * m.nfine  # every refined slot in use, and no more
    assert len(m.bins) == 8 and [t.numel() for t in m.state_tensors()] == [2 * length, length]
    assert m.compute()["n_pos"] + m.compute()["n_neg"] == 1000 + 30 * 4 * 64 * 64


def test_merge_equals_concatenation_and_all_reduce_noop():
    y, s = _gaussian(20_000, 0.3, 1.0, seed=7)
    yt, st = torch.from_numpy(y), torch.from_numpy(s)
    whole, a, b = OODMeter(), OODMeter(), OODMeter()
    whole.update(st, yt)
    a.update(st[:5000], yt[:5000])
    b.update(st[5000:], yt[5000:])
    a.merge(b).merge(OODMeter())
    # Each update refines the bins its own sample asks for, so the merged table may split
    # other bins than the whole one: the counts agree, the metrics to the meter's accuracy.
    np.testing.assert_array_equal(a.table()[0].sum(), whole.table()[0].sum())
    np.testing.assert_array_equal(a.table()[1].sum(), whole.table()[1].sum())
    before = whole.compute()
    assert whole.all_reduce().compute() == before
    merged = a.compute()
    for key in ("auroc", "ap", "ap_neg", "fpr95", "fpr95_neg"):
        assert merged[key] == pytest.approx(before[key], abs=1e-4), key
    assert merged["auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-4)
    assert merged["ap"] == pytest.approx(average_precision_score(y, s), abs=1e-4)


def test_pr_curve_counts():
    m = _meter([0.9, 0.9, 0.5, 0.1, 0.1], [True, False, True, False, False])
    tp, fp, tn, fn = m.pr_curve_counts()
    assert tp.tolist() == [1, 2, 2] and fp.tolist() == [1, 1, 3]
    assert tn.tolist() == [2, 2, 0] and fn.tolist() == [1, 0, 0]


def _calib(probs, labels, scores=None):
    probs = torch.tensor(probs, dtype=torch.float32)
    m = OODMeter()
    m.update(probs if scores is None else torch.tensor(scores), torch.tensor(labels), probs=probs)
    return m.compute()


def test_calibration_hand_cases():
    # Perfectly calibrated: p=0.25 with 25% positives, p=0.75 with 75%.
    res = _calib([0.25] * 400 + [0.75] * 400,
                 [True] * 100 + [False] * 300 + [True] * 300 + [False] * 100)
    assert res["ace"] == pytest.approx(0.0, abs=1e-12)
    assert res["ece"] == pytest.approx(0.0, abs=1e-12)
    # Overconfident: p=1 everywhere, half positive.
    res = _calib([1.0] * 10, [True, False] * 5, scores=[0.3] * 5 + [0.7] * 5)
    assert res["ace"] == pytest.approx(0.5) and res["ece"] == pytest.approx(0.5)
    # 100 pixels at p=0.2 with 50% positives (gap 0.3), 300 at p=0.9 with 90%.
    res = _calib([0.2] * 100 + [0.9] * 300,
                 [True, False] * 50 + [True] * 270 + [False] * 30)
    assert res["ece"] == pytest.approx(0.3 * 100 / 400)
    assert res["ace"] == pytest.approx(0.3 / 2)


def test_calibration_absent_without_probs_everywhere():
    m = OODMeter()
    m.update(torch.rand(10), torch.rand(10) < 0.5, probs=torch.rand(10))
    m.update(torch.rand(10), torch.rand(10) < 0.5)
    res = m.compute()
    assert res["ace"] is None and res["ece"] is None


def test_confusion_meter_hand_case():
    cm = ConfusionMeter(3, ignore_ids=(2,))
    label = torch.tensor([[0, 0, 1, 1], [2, 255, 1, 0]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 0, 2, 0]])
    cm.update(pred, label)
    res = cm.compute()
    # Counted pixels (label, pred): (0,0) (0,1) (1,1) (1,1) (1,2) (0,0).
    assert res["pixel_acc"] == pytest.approx(4 / 6)
    assert res["iou"][0] == pytest.approx(2 / 3)  # tp 2, fn 1, fp 0
    assert res["iou"][1] == pytest.approx(2 / 4)  # tp 2, fn 1, fp 1
    assert math.isnan(res["iou"][2])
    assert res["miou"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    other = ConfusionMeter(3, ignore_ids=(2,))
    other.update(pred, label)
    assert cm.merge(other).all_reduce().compute()["miou"] == pytest.approx(res["miou"])
    assert int(cm.mat.sum()) == 12


def test_confusion_meter_absent_class_is_nan():
    cm = ConfusionMeter(3)
    cm.update(torch.tensor([0, 1]), torch.tensor([0, 1]))
    res = cm.compute()
    assert math.isnan(res["iou"][2]) and res["miou"] == 1.0 and res["pixel_acc"] == 1.0
    with pytest.raises(ValueError):
        cm.update(torch.tensor([3]), torch.tensor([0]))
