"""SMIYC component metrics (obsnet.components): hand-counted frames, a brute-force reference
(own 8-neighbour BFS and coordinate sets), the F1-optimal threshold against scikit-learn, edge
cases. Frames are tiny (12x12) with the size limits lowered so every number can be counted."""
from collections import deque

import numpy as np
import pytest
import torch
from sklearn.metrics import precision_recall_curve

from obsnet.components import (SIZE_LIMITS, TAUS, ComponentMeter, component_stats,
                               f1_optimal_threshold, f1_per_tau)

VOID = 255
LINSPACE = [0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75]


def frame(size=12):
    """(score, label): all in-distribution, nothing predicted at threshold 0.5."""
    return np.zeros((size, size), np.float32), np.zeros((size, size), np.uint8)


def stats(score, label, min_pred=1, min_gt=1):
    return component_stats(score, label, 0.5, min_pred=min_pred, min_gt=min_gt)


def test_constants():
    assert np.allclose(TAUS, LINSPACE) and TAUS.size == 11
    assert SIZE_LIMITS["RoadAnomaly21"] == (500, 100)
    assert SIZE_LIMITS["RoadObstacle21"] == (50, 10)
    assert SIZE_LIMITS["FishyscapesLAF"] == (500, 100)
    # the official taus come from np.linspace, whose 8th value is 0.6000000000000001, not 0.6:
    # a component with sIoU exactly 3/5 is a miss there (and PPV 3/5 a false positive)
    assert TAUS[7] > 0.6
    f1 = f1_per_tau([0.6], [0.6])
    assert f1[6] == 1.0  # tau .55: TP 1, FN 0, FP 0
    assert f1[7] == 0.0  # tau .6000000000000001: TP 0, FN 1, FP 1


def test_perfect_blob():
    score, label = frame()
    label[1:3, 1:3] = 1
    score[1:3, 1:3] = 1.0
    fc = stats(score, label)
    # |k & P| = 4, |P| = 4, |k| = 4, A = 0: 4 / (4 + 4 - 4 - 0) = 1; PPV = 4 / 4
    assert fc.siou.tolist() == [1.0] and fc.ppv.tolist() == [1.0] and fc.siou_pred.tolist() == [1.0]
    meter = ComponentMeter(0.5, min_pred=1, min_gt=1)
    meter.update(score, label)
    out = meter.compute()
    # TP = 1, FN = 0, FP = 0 at every tau: F1 = 2 / 2
    assert out["mean_f1"] == 1.0 and out["f1_per_tau"] == [1.0] * 11
    assert out["siou"] == 1.0 and out["ppv"] == 1.0 and out["threshold"] == 0.5


def a_term_frame():
    score, label = frame()
    label[1:3, 1:3] = 1  # K1: 4 px
    label[1:3, 5:7] = 1  # K2: 4 px, cols 3-4 in between are background
    score[1:3, 1:7] = 1.0  # one predicted component of 12 px over K1, gap and K2
    return score, label


def test_prediction_touching_two_gt_components():
    fc = stats(*a_term_frame())
    # K1: P = 12 px, |K1 & P| = 4, A = P & K2 = 4 px: 4 / (12 + 4 - 4 - 4) = 0.5 (K2 alike);
    # without the A term it would be 4 / 12.
    assert np.allclose(fc.siou, [0.5, 0.5])
    # PPV: 8 of the 12 px lie on GT components
    assert np.allclose(fc.ppv, [8 / 12])
    # swapped roles: G = K1 | K2 = 8 px, |c & G| = 8, no other prediction: 8 / (8 + 12 - 8) = 2/3
    assert np.allclose(fc.siou_pred, [8 / 12])
    meter = ComponentMeter(0.5, min_pred=1, min_gt=1)
    meter.update(*a_term_frame())
    # tau <= 0.5 (6 values): TP 2, FN 0, FP 0 -> 1; tau .55-.65: TP 0, FN 2, FP 0 -> 0;
    # tau .7, .75: PPV 2/3 < tau, FP 1 -> 0.  mean = 6 / 11
    assert meter.compute()["f1_per_tau"] == [1.0] * 6 + [0.0] * 5
    assert meter.compute()["mean_f1"] == pytest.approx(6 / 11)


def test_prediction_half_outside():
    score, label = frame()
    label[1:3, 1:3] = 1
    score[1:3, 1:5] = 1.0  # 8 px, 4 on the GT component
    fc = stats(score, label)
    # 4 / (8 + 4 - 4 - 0) = 0.5; PPV 4 / 8
    assert fc.siou.tolist() == [0.5] and fc.ppv.tolist() == [0.5]


def test_missed_gt_component():
    score, label = frame()
    label[4:7, 4:7] = 1
    fc = stats(score, label)
    # nothing touches it: 0 / (0 + 9 - 0 - 0)
    assert fc.siou.tolist() == [0.0] and fc.ppv.size == 0
    meter = ComponentMeter(0.5, min_pred=1, min_gt=1)
    meter.update(score, label)
    out = meter.compute()
    # TP 0, FN 1, FP 0: 0 / 1 at every tau; no predicted component: PPV NaN
    assert out["mean_f1"] == 0.0 and out["siou"] == 0.0 and np.isnan(out["ppv"])


def test_false_positive_blob():
    score, label = frame()
    score[5, 5:8] = 1.0
    fc = stats(score, label)
    # 0 of its 3 px on GT
    assert fc.siou.size == 0 and fc.ppv.tolist() == [0.0] and fc.siou_pred.tolist() == [0.0]
    meter = ComponentMeter(0.5, min_pred=1, min_gt=1)
    meter.update(score, label)
    out = meter.compute()
    # TP 0, FN 0, FP 1: 0 / 1
    assert out["mean_f1"] == 0.0 and np.isnan(out["siou"]) and out["ppv"] == 0.0


def test_diagonal_connectivity():
    score, label = frame()
    label[2, 2] = label[3, 3] = 1  # diagonal neighbours: one component with 8-connectivity
    score[2, 2] = 1.0
    fc = stats(score, label)
    # one GT component of 2 px: 1 / (1 + 2 - 1 - 0) = 0.5 (4-connectivity: two, sIoU 1 and 0)
    assert fc.siou.tolist() == [0.5] and fc.ppv.tolist() == [1.0]
    score[3, 3] = 1.0
    score[2, 2] = 0.0
    score[4, 4] = score[5, 5] = 1.0  # the prediction chain (3,3)-(4,4)-(5,5): one component
    fc = stats(score, label)
    # P = 3 px, |k & P| = 1: 1 / (3 + 2 - 1 - 0) = 0.25; PPV 1 / 3
    assert fc.siou.tolist() == [0.25] and np.allclose(fc.ppv, [1 / 3])


def test_void_inside_prediction_excluded():
    score, label = frame()
    label[1:3, 1:3] = 1  # 4 px
    label[1, 3] = VOID
    score[1:3, 1:5] = 1.0  # 8 px, one of them void: 7 px, still connected through (2, 3)
    fc = stats(score, label)
    # 4 / (7 + 4 - 4 - 0) = 4/7; PPV 4 / 7 (4 / 8 were the void pixel counted)
    assert np.allclose(fc.siou, [4 / 7]) and np.allclose(fc.ppv, [4 / 7])
    label[2, 3] = VOID  # now column 3 is void: the prediction splits into 4 px and 2 px
    fc = stats(score, label)
    assert fc.siou.tolist() == [1.0] and fc.ppv.tolist() == [1.0, 0.0]


def test_small_gt_component_becomes_void():
    score, label = frame()
    label[1:3, 1:3] = 1  # K: 4 px, kept (min_gt 3)
    score[1:3, 1:3] = 1.0
    label[8, 8] = 1  # S: 1 px < 3 -> void
    score[8, 8:10] = 1.0  # Q: 2 px (>= min_pred 2, counted before S turns void)
    label[10, 2:4] = 1  # S2: 2 px < 3 -> void
    score[10, 2:4] = 1.0  # predicted exactly: lies wholly on void, so it vanishes
    fc = stats(score, label, min_pred=2, min_gt=3)
    # only K is left: sIoU [1]. Predictions: K's (PPV 4/4) and Q, whose pixel on S is no longer
    # counted: 0 / 1. (Were S and S2 kept: sIoU [1, 0.5, 1], PPV [1, 0.5, 1].)
    assert fc.siou.tolist() == [1.0]
    assert fc.ppv.tolist() == [1.0, 0.0]


def test_background_under_min_gt_becomes_void():
    # the official loop over GT labels also visits label 0 (the background)
    score = np.zeros((3, 3), np.float32)
    label = np.ones((3, 3), np.uint8)
    label[0, 0] = 0  # background: 1 px < min_gt 2 -> void
    score[0, 0] = 1.0  # predicted only on the background pixel
    fc = stats(score, label, min_gt=2)
    # the prediction vanishes with the background; the GT component (8 px) is missed
    assert fc.siou.tolist() == [0.0] and fc.ppv.size == 0


def test_small_predicted_component_removed():
    score, label = frame()
    label[1:3, 1:3] = 1  # K1: predicted exactly, 4 px >= 3
    score[1:3, 1:3] = 1.0
    label[6:8, 1:3] = 1  # K2: only 2 px predicted, < 3: removed
    score[6, 1:3] = 1.0
    score[10, 5:7] = 1.0  # false positive of 2 px: removed
    score[10, 9:12] = 1.0  # false positive of exactly 3 px: kept
    fc = stats(score, label, min_pred=3)
    # K1: 1; K2: 0 / (0 + 4) = 0. PPV: K1's 4/4, the 3 px blob 0/3
    assert fc.siou.tolist() == [1.0, 0.0] and fc.ppv.tolist() == [1.0, 0.0]


def two_frame_split():
    first = a_term_frame()  # sIoU [.5, .5], PPV [2/3]
    score, label = frame()
    label[1:3, 1:3] = 1  # perfect: sIoU 1, PPV 1
    score[1:3, 1:3] = 1.0
    label[5:7, 1:3] = 1  # missed: sIoU 0
    score[9, 9:11] = 1.0  # false positive: PPV 0
    label[10:12, 1:3] = 1  # perfect: sIoU 1, PPV 1
    score[10:12, 1:3] = 1.0
    return [first, (score, label)]


def test_mean_f1_on_two_frames():
    meter = ComponentMeter(0.5, min_pred=1, min_gt=1)
    for score, label in two_frame_split():
        meter.update(score, label)
    out = meter.compute()
    siou, ppv = [0.5, 0.5, 1.0, 0.0, 1.0], [2 / 3, 1.0, 0.0, 1.0]
    f1 = []
    for tau in np.linspace(0.25, 0.75, 11):
        tp = sum(v >= tau for v in siou)
        fn = len(siou) - tp
        fp = sum(v < tau for v in ppv)
        f1.append(2 * tp / (2 * tp + fn + fp))
    # by hand: tau <= .5: TP 4, FN 1, FP 1 -> 8/10; .55-.65: TP 2, FN 3, FP 1 -> 4/8;
    # .7, .75: TP 2, FN 3, FP 2 -> 4/9
    assert np.allclose(f1, [0.8] * 6 + [0.5] * 3 + [4 / 9] * 2)
    assert np.allclose(out["f1_per_tau"], f1)
    assert out["mean_f1"] == pytest.approx((6 * 0.8 + 3 * 0.5 + 2 * 4 / 9) / 11)
    # pooled over the 5 GT components: 3 / 5 (the mean of per-frame means would be 7/12)
    assert out["siou"] == pytest.approx(0.6)
    assert out["ppv"] == pytest.approx((2 / 3 + 2) / 4)
    assert out["n_gt"] == 5 and out["n_pred"] == 4
    assert all(isinstance(out[k], float) for k in ("siou", "ppv", "mean_f1", "threshold"))


# ---- brute-force reference: own BFS components, sets of coordinates ----

def bfs_components(pixels):
    """8-connected components of a set of (row, col), ordered by their first pixel in raster
    order (as scipy numbers them)."""
    left, comps = set(pixels), []
    for start in sorted(pixels):
        if start not in left:
            continue
        left.discard(start)
        comp, todo = {start}, deque([start])
        while todo:
            r, c = todo.popleft()
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    nb = (r + dr, c + dc)
                    if nb in left:
                        left.discard(nb)
                        comp.add(nb)
                        todo.append(nb)
        comps.append(comp)
    return comps


def reference(score, label, threshold, min_pred, min_gt):
    h, w = label.shape
    every = {(r, c) for r in range(h) for c in range(w)}
    void = {p for p in every if label[p] == VOID}
    gts = bfs_components({p for p in every if label[p] == 1})
    preds = bfs_components({p for p in every if score[p] > threshold and p not in void})
    preds = [c for c in preds if len(c) >= min_pred]
    on_gt = set().union(*gts) if gts else set()
    if len(every - on_gt) < min_gt:  # the background counts as a GT "component" too
        void |= every - on_gt
    for g in gts:
        if len(g) < min_gt:
            void |= g
    gts = [g for g in gts if len(g) >= min_gt]
    preds = [c - void for c in preds if c - void]
    all_gt = set().union(*gts) if gts else set()
    all_pred = set().union(*preds) if preds else set()

    def adjusted(k, others, other_all_rows):
        union = set().union(*[c for c in others if c & k]) if any(c & k for c in others) else set()
        a = union & (other_all_rows - k)
        return len(k & union) / (len(union) + len(k) - len(k & union) - len(a))

    siou = [adjusted(k, preds, all_gt) for k in gts]
    siou_pred = [adjusted(c, gts, all_pred) for c in preds]
    ppv = [len(c & all_gt) / len(c) for c in preds]
    return siou, ppv, siou_pred


def random_frame(rng):
    h, w = rng.integers(6, 13, size=2)
    label = rng.choice([0, 1, VOID], size=(h, w), p=[0.55, 0.35, 0.1]).astype(np.uint8)
    score = (rng.integers(0, 5, size=(h, w)) / 4).astype(np.float32)  # ties with 0.5
    return score, label


def test_against_brute_force_reference():
    rng = np.random.default_rng(0)
    for min_pred, min_gt in [(1, 1), (2, 3), (4, 2), (6, 5)]:
        meter = ComponentMeter(0.5, min_pred=min_pred, min_gt=min_gt)
        all_siou, all_ppv = [], []
        for _ in range(12):
            score, label = random_frame(rng)
            fc = meter.update(score, label)
            siou, ppv, siou_pred = reference(score, label, 0.5, min_pred, min_gt)
            assert np.allclose(fc.siou, siou) and len(fc.siou) == len(siou)
            assert np.allclose(fc.ppv, ppv) and len(fc.ppv) == len(ppv)
            assert np.allclose(fc.siou_pred, siou_pred)
            all_siou += siou
            all_ppv += ppv
        f1 = [2 * sum(s >= t for s in all_siou)
              / (2 * sum(s >= t for s in all_siou) + sum(s < t for s in all_siou)
                 + sum(p < t for p in all_ppv)) for t in np.linspace(0.25, 0.75, 11)]
        out = meter.compute()
        assert out["mean_f1"] == pytest.approx(np.mean(f1))
        assert out["siou"] == pytest.approx(np.mean(all_siou))
        assert out["ppv"] == pytest.approx(np.mean(all_ppv))


def test_reference_on_hand_counted_frame():
    # sanity of the reference itself on the hand-counted frames above
    score, label = a_term_frame()
    assert reference(score, label, 0.5, 1, 1)[:2] == ([0.5, 0.5], [8 / 12])


# ---- pixel F1-optimal threshold ----

def curve(scores, positive):
    """Distinct thresholds high to low with cumulative TP / FP at score >= threshold."""
    thresholds = np.unique(scores)[::-1]
    tp = np.array([np.sum(positive & (scores >= t)) for t in thresholds])
    fp = np.array([np.sum(~positive & (scores >= t)) for t in thresholds])
    return thresholds, tp, fp


def test_f1_optimal_threshold_matches_sklearn():
    rng = np.random.default_rng(1)
    for _ in range(20):
        n = int(rng.integers(20, 300))
        positive = rng.random(n) < rng.uniform(0.1, 0.6)
        positive[0] = True
        scores = np.round(rng.random(n) + 0.4 * positive, 1)  # many ties
        precision, recall, thresholds = precision_recall_curve(positive, scores)
        with np.errstate(invalid="ignore", divide="ignore"):
            f1 = 2 * precision[:-1] * recall[:-1] / (precision[:-1] + recall[:-1])
        f1 = np.nan_to_num(f1)
        best = thresholds[np.flatnonzero(f1 == f1.max()).max()]  # highest threshold on a tie
        got = f1_optimal_threshold(*curve(scores, positive), positive.sum())
        assert got == best


def test_f1_optimal_threshold_hand_and_errors():
    # thresholds .9 .5 .1, n_pos 2: (tp, fp) = (1, 0) (2, 1) (2, 3)
    # F1 = 2 TP / (TP + FP + n_pos): 2/3, 4/5, 4/7 -> 0.5
    assert f1_optimal_threshold([0.9, 0.5, 0.1], [1, 2, 2], [0, 1, 3], 2) == 0.5
    # a tie (F1 2/3 at both) goes to the higher threshold
    assert f1_optimal_threshold([0.9, 0.5], [1, 2], [0, 2], 2) == 0.9
    assert np.isnan(f1_optimal_threshold([0.9], [0], [3], 0))
    with pytest.raises(ValueError):
        f1_optimal_threshold([0.1, 0.9], [1, 2], [0, 1], 2)
    with pytest.raises(ValueError):
        f1_optimal_threshold([0.9, 0.1], [1], [0, 1], 2)


def test_f1_per_tau_undefined_is_nan():
    assert np.isnan(f1_per_tau([], [])).all()


# ---- edge cases ----

def test_empty_frame():
    score, label = frame()
    fc = stats(score, label)
    assert fc.siou.size == 0 and fc.ppv.size == 0 and fc.siou_pred.size == 0
    meter = ComponentMeter(0.5, min_pred=1, min_gt=1)
    meter.update(score, label)
    out = meter.compute()
    assert np.isnan(out["siou"]) and np.isnan(out["ppv"]) and np.isnan(out["mean_f1"])
    assert out["n_gt"] == 0 and out["n_pred"] == 0
    assert np.isnan(ComponentMeter(0.5).compute()["mean_f1"])  # no frames at all


def test_all_void_frame():
    score = np.ones((12, 12), np.float32)
    label = np.full((12, 12), VOID, np.uint8)
    fc = stats(score, label)
    assert fc.siou.size == 0 and fc.ppv.size == 0


def test_all_equal_scores():
    score, label = frame()
    label[1:3, 1:3] = 1
    score[:] = 0.5
    fc = stats(score, label)  # 0.5 > 0.5 is False: nothing predicted
    assert fc.siou.tolist() == [0.0] and fc.ppv.size == 0
    fc = component_stats(score, label, 0.4, min_pred=1, min_gt=1)  # all 144 px: one component
    # 4 / (144 + 4 - 4 - 0) = 1/36; PPV 4 / 144
    assert np.allclose(fc.siou, [1 / 36]) and np.allclose(fc.ppv, [4 / 144])


def test_bad_inputs():
    score, label = frame()
    score[3, 3] = np.nan
    with pytest.raises(ValueError):
        stats(score, label)
    with pytest.raises(ValueError):
        stats(np.zeros((2, 3, 3)), np.zeros((2, 3, 3)))
    with pytest.raises(ValueError):
        stats(np.zeros((3, 3)), np.zeros((3, 4)))


def test_torch_input_and_default_limits():
    score, label = frame(40)
    label[2:14, 2:14] = 1  # 144 px GT >= min_gt 100
    score[2:14, 2:14] = 1.0
    score[20:30, 20:30] = 1.0  # 100 px false positive < min_pred 500: removed
    meter = ComponentMeter(0.5)
    fc = meter.update(torch.from_numpy(score), torch.from_numpy(label))
    # the 144 px prediction is itself < 500: removed too -> the GT component is missed
    assert fc.siou.tolist() == [0.0] and fc.ppv.size == 0
    fc = component_stats(torch.from_numpy(score), torch.from_numpy(label), 0.5,
                         *SIZE_LIMITS["RoadObstacle21"])
    assert fc.siou.tolist() == [1.0] and fc.ppv.tolist() == [1.0, 0.0]
