"""anomaly-seg's per-image OOD protocol: ``image_measures``, ``anomaly_seg_fpr95``,
``PerImageMeter``, ``evaluate``'s ``ood_per_image`` block and its report columns.

The references are scikit-learn (AUROC, AP) and an independent numpy transcription of
anomaly-seg's ``fpr_and_fdr_at_recall`` (FPR at 95% recall), written out below.
"""
import csv

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from obsnet.data.specs import SPECS
from obsnet.evaluate import evaluate
from obsnet.methods import MethodConfig
from obsnet.metrics.ood import OODMeter
from obsnet.metrics.per_image import PerImageMeter, anomaly_seg_fpr95, image_measures
from obsnet.report import format_table, write_csv

F32_MAX = float(np.finfo(np.float32).max)


# --------------------------------------------------------------------------- references

def ref_fpr_at_recall(y, s, recall_level=0.95):
    """anomaly-seg's fpr_and_fdr_at_recall (positives: y == 1), transcribed step by step."""
    y = np.asarray(y).astype(bool)
    s = np.asarray(s)
    order = np.argsort(-s, kind="stable")
    sorted_scores, sorted_y = s[order], y[order].astype(np.float64)
    n = len(s)
    distinct_value_indices = np.where(np.diff(sorted_scores))[0]
    threshold_idxs = np.r_[distinct_value_indices, n - 1]
    tps = np.cumsum(sorted_y)[threshold_idxs]
    fps = 1 + threshold_idxs - tps
    recall = tps / tps[-1]
    last_ind = tps.searchsorted(tps[-1])
    sl = slice(last_ind, None, -1)
    recall = np.r_[recall[sl], 1]
    fps = np.r_[fps[sl], 0]
    cutoff = np.argmin(np.abs(recall - recall_level))
    return fps[cutoff] / np.sum(np.logical_not(y))


def sk_safe(s):
    """sklearn rejects inf: the float32 extremes keep the order (test data never hold them)."""
    s = np.asarray(s, dtype=np.float64)
    return np.where(np.isposinf(s), F32_MAX, np.where(np.isneginf(s), -F32_MAX, s))


def reference(s, y):
    """(AUROC, AP, FPR95) as anomaly-seg computes them, or None without both classes."""
    y = np.asarray(y).astype(bool)
    if y.size == 0 or y.all() or not y.any():
        return None
    s = sk_safe(s)
    return (roc_auc_score(y, s), average_precision_score(y, s), ref_fpr_at_recall(y, s))


def first_tpr95_fpr(y, s):
    """The other convention: FPR at the first threshold (from the top) with TPR >= 0.95."""
    fpr, tpr, _ = roc_curve(np.asarray(y).astype(bool), sk_safe(s), drop_intermediate=False)
    return fpr[np.argmax(tpr >= 0.95)]


def assert_matches(s, y):
    got, want = image_measures(np.asarray(s), np.asarray(y)), reference(s, y)
    assert got is not None and want is not None
    assert got[0] == pytest.approx(want[0], abs=1e-12, rel=0)
    assert got[1] == pytest.approx(want[1], abs=1e-12, rel=0)
    assert got[2] == want[2]  # exact: same counts, same division
    return got


# --------------------------------------------------------------------------- 1. image_measures

def test_image_measures_hand_computed():
    # Scores 0.9 0.8 0.7 0.7 0.4 0.1, labels P N P N P N (3 positives, 3 negatives).
    # AUROC: positive 0.9 beats 3 negatives, 0.7 beats 0.1 and ties 0.7 (1.5), 0.4 beats
    #   0.1 (1): 5.5 / 9.
    # AP: thresholds 0.9 (tp 1, fp 0, P 1), 0.8 (1, 1), 0.7 (2, 2, P 1/2), 0.4 (3, 2, P 3/5):
    #   each positive block adds recall 1/3: (1 + 1/2 + 3/5) / 3 = 0.7.
    # FPR95: recalls 1/3 1/3 2/3 1 (then 1 at 0.1); up to the first full recall (0.4), the
    #   closest to 0.95 is 1 at 0.4, with 2 of the 3 negatives above: 2/3.
    s = np.array([0.9, 0.8, 0.7, 0.7, 0.4, 0.1])
    y = np.array([1, 0, 1, 0, 1, 0], dtype=bool)
    auroc, ap, fpr = assert_matches(s, y)
    assert auroc == pytest.approx(5.5 / 9, abs=1e-15)
    assert ap == pytest.approx(0.7, abs=1e-15)
    assert fpr == pytest.approx(2 / 3, abs=1e-15)

    # Everything tied: one threshold, AUROC 1/2, AP = precision there = 2/6, every negative
    # is above the (only) full-recall threshold: FPR 1.
    s = np.full(6, 0.5, dtype=np.float32)
    y = np.array([1, 0, 1, 0, 0, 0], dtype=bool)
    auroc, ap, fpr = assert_matches(s, y)
    assert (auroc, ap, fpr) == (pytest.approx(0.5), pytest.approx(1 / 3), 1.0)

    # Perfect separation, positives on top: AUROC 1, AP 1, no negative above full recall.
    s = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    y = np.array([1, 1, 1, 0, 0, 0], dtype=bool)
    assert assert_matches(s, y) == (1.0, 1.0, 0.0)

    # Reversed: AUROC 0, AP = (1/4 + 2/5 + 3/6) / 3, every negative above: FPR 1.
    auroc, ap, fpr = assert_matches(-s, y)
    assert auroc == 0.0 and fpr == 1.0
    assert ap == pytest.approx((1 / 4 + 2 / 5 + 3 / 6) / 3, abs=1e-15)

    # -0.0 and +0.0 tie (as sklearn and np.diff see them).
    s = np.array([0.0, -0.0, 1.0, -1.0], dtype=np.float32)
    y = np.array([1, 0, 0, 1], dtype=bool)
    auroc, _, _ = assert_matches(s, y)
    # positive 0.0 ties negative -0.0 (1/2) and loses to 1.0; positive -1.0 loses both: 0.5 / 4
    assert auroc == pytest.approx(0.125)


def test_image_measures_random_with_ties():
    rng = np.random.default_rng(0)
    for i in range(250):
        n = int(rng.integers(2, 3000))
        rate = rng.choice([0.01, 0.05, 0.3, 0.5, 0.9])
        y = rng.random(n) < rate
        y[rng.integers(n)] = True
        y[rng.integers(n)] = False
        if y.all() or not y.any():
            continue
        # Few distinct values: large tie blocks mixing both classes.
        decimals = int(rng.integers(0, 3))
        s = np.round(rng.normal(size=n) + 0.7 * y, decimals)
        if i % 2:
            s = s.astype(np.float32)
        assert_matches(s, y)


def test_image_measures_tiny_spread_float32():
    rng = np.random.default_rng(1)
    for _ in range(40):
        n = int(rng.integers(3000, 20000))
        y = rng.random(n) < rng.uniform(0.02, 0.6)
        y[:2] = True, False
        noise = rng.normal(size=n) + 0.5 * y
        s = (0.9166 + 1e-3 * noise).astype(np.float32)
        assert len(np.unique(s)) < n  # float32 resolution makes ties
        assert_matches(s, y)
    # Large magnitude, unit spread: 1e4 +- 1 in float32 (step ~1e-3).
    y = rng.random(5000) < 0.1
    s = (1e4 + rng.normal(size=5000) + y).astype(np.float32)
    assert_matches(s, y)


def test_image_measures_infinite_scores():
    rng = np.random.default_rng(2)
    for _ in range(60):
        n = int(rng.integers(10, 2000))
        y = rng.random(n) < 0.3
        y[:2] = True, False
        s = np.round(rng.normal(size=n) + y, 1).astype(np.float32)
        s[rng.random(n) < 0.1] = np.inf
        s[rng.random(n) < 0.1] = -np.inf
        assert_matches(s, y)
    # Hand case: +inf positive on top, -inf tie between a positive and a negative.
    s = np.array([np.inf, 0.0, -np.inf, -np.inf], dtype=np.float32)
    y = np.array([1, 0, 1, 0], dtype=bool)
    auroc, ap, fpr = assert_matches(s, y)
    # pairs: inf beats both negatives (2); -inf positive ties the -inf negative (0.5): 2.5 / 4
    assert auroc == pytest.approx(0.625)
    assert ap == pytest.approx((1.0 + 2 / 4) / 2)  # precision 1 at inf, 2/4 at -inf
    assert fpr == 1.0  # full recall only at -inf, where both negatives are accepted


# --------------------------------------------------------------------------- 2. closest recall

def test_fpr95_is_closest_recall_not_first_above():
    # 100 positives, 100 negatives. 94 positives on top, then 10 negatives, then a tie block
    # of 3 positives + 5 negatives, then 3 positives, then 85 negatives. Recall goes
    # 0.94 (10 false positives at its lowest threshold) -> 0.97 (15) -> 1.0 (15).
    # anomaly-seg: |0.94 - 0.95| < |0.97 - 0.95| -> 10 / 100. First TPR >= 0.95: 15 / 100.
    s = np.r_[100.0 + np.arange(94), 50.0 + np.arange(10), np.full(8, 40.0),
              np.full(3, 30.0), -np.arange(85.0)]
    y = np.r_[np.ones(94), np.zeros(10), np.ones(3), np.zeros(5), np.ones(3),
              np.zeros(85)].astype(bool)
    assert y.sum() == 100 and (~y).sum() == 100
    ours = assert_matches(s, y)[2]
    assert ref_fpr_at_recall(y, s) == pytest.approx(0.10, abs=1e-15)
    assert first_tpr95_fpr(y, s) == pytest.approx(0.15, abs=1e-15)
    assert ours == pytest.approx(0.10, abs=1e-15)
    # The pooled OODMeter keeps the "first TPR >= 0.95" convention.
    meter = OODMeter()
    meter.update(torch.tensor(s, dtype=torch.float32), torch.tensor(y))
    assert meter.compute()["fpr95"] == pytest.approx(0.15, abs=1e-15)

    # anomaly_seg_fpr95 on the cumulative counts directly (one entry per threshold).
    tp = np.array([94.0, 94.0, 97.0, 100.0, 100.0])
    fp = np.array([0.0, 10.0, 15.0, 15.0, 100.0])
    assert anomaly_seg_fpr95(tp, fp) == pytest.approx(0.10)
    # Recall 0.96 vs 0.94 on either side: the closest (0.96) wins although it is above.
    tp = np.array([94.0, 96.0, 100.0])
    fp = np.array([3.0, 7.0, 50.0])
    assert anomaly_seg_fpr95(tp, fp) == pytest.approx(7 / 50)


# --------------------------------------------------------------------------- 3. one class only

def test_image_measures_none_without_both_classes():
    s = np.array([0.1, 0.5, 0.3], dtype=np.float32)
    assert image_measures(s, np.ones(3, dtype=bool)) is None
    assert image_measures(s, np.zeros(3, dtype=bool)) is None
    assert image_measures(s[:1], np.ones(1, dtype=bool)) is None
    assert image_measures(s[:1], np.zeros(1, dtype=bool)) is None
    assert image_measures(s[:2], np.array([True, False])) is not None


# --------------------------------------------------------------------------- 4. PerImageMeter

def _batch(rng, b=6, h=9, w=11, empty=False):
    scores = torch.from_numpy(np.round(rng.normal(size=(b, h, w)), 1).astype(np.float32))
    pos = torch.from_numpy(rng.random((b, h, w)) < 0.2)
    scores = scores + pos.float()
    valid = torch.from_numpy(rng.random((b, h, w)) < 0.8)
    pos[0] = False  # image 0: negatives only -> skipped
    pos[1] = True  # image 1: positives only -> skipped
    pos[2] = False
    pos[2, 0, :3], valid[2, 0, :3] = True, False  # image 2: its positives are all invalid
    valid[3] = False  # image 3: one valid pixel (or none with ``empty``)
    if not empty:
        valid[3, 0, 0] = True
    pos[4, 0, :2], valid[4, 0, :2] = True, True  # image 4: some valid positives for sure
    pos[4, 1, :2], valid[4, 1, :2] = False, True
    return scores, pos, valid


def _reference_mean(batches):
    values, skipped = [], 0
    for scores, pos, valid in batches:
        for i in range(scores.shape[0]):
            keep = np.ones(scores[i].shape, bool) if valid is None else valid[i].numpy()
            r = reference(scores[i].numpy()[keep], pos[i].numpy()[keep])
            if r is None:
                skipped += 1
            else:
                values.append(r)
    return np.mean(values, axis=0), len(values), skipped


def _assert_meter(meter, batches):
    got = meter.compute()
    want, n, skipped = _reference_mean(batches)
    assert (got["n_images"], got["n_skipped"]) == (n, skipped)
    for key, w in zip(("auroc", "aupr", "fpr95"), want):
        assert got[key] == pytest.approx(w, abs=1e-12, rel=0), key


def test_per_image_meter_mean_over_images_with_valid_mask():
    rng = np.random.default_rng(3)
    batches = [_batch(rng), _batch(rng, b=5, h=16, w=5)]
    meter = PerImageMeter()
    for b in batches:
        meter.update(*b)
    _assert_meter(meter, batches)
    got = meter.compute()
    # per batch: images 0-3 skipped (0, 1, 2 lack a class among valid pixels, 3 has one pixel),
    # image 4 counted, image 5 (first batch) random.
    assert got["n_skipped"] >= 8 and got["n_images"] >= 2
    assert got["n_images"] + got["n_skipped"] == 11
    # ... and the mask matters: ignoring it counts image 2 (and 3) and moves the means.
    no_mask = PerImageMeter()
    for scores, pos, _ in batches:
        no_mask.update(scores, pos)
    _assert_meter(no_mask, [(s, p, None) for s, p, _ in batches])
    assert no_mask.compute()["n_images"] > got["n_images"]
    assert no_mask.compute()["auroc"] != pytest.approx(got["auroc"], abs=1e-6)


def test_image_without_valid_pixel_is_skipped():
    # An image whose pixels are all ignored (e.g. all 255 in a batch that holds anomalies)
    # has no class at all: skipped like the one-class images, not an error.
    assert image_measures(np.zeros(0, np.float32), np.zeros(0, bool)) is None
    rng = np.random.default_rng(6)
    batches = [_batch(rng, empty=True)]
    meter = PerImageMeter()
    meter.update(*batches[0])
    _assert_meter(meter, batches)


def test_per_image_meter_plain_batches_and_merge():
    rng = np.random.default_rng(4)
    batches = []
    for _ in range(4):
        scores = torch.from_numpy(np.round(rng.normal(size=(5, 12, 12)), 1).astype(np.float32))
        pos = torch.from_numpy(rng.random((5, 12, 12)) < rng.uniform(0.02, 0.5))
        pos[0] = False
        valid = torch.from_numpy(rng.random((5, 12, 12)) < 0.9)
        batches.append((scores + 2 * pos, pos, valid))
    one = PerImageMeter()
    for b in batches:
        one.update(*b)
    _assert_meter(one, batches)
    a, b = PerImageMeter(), PerImageMeter()
    for batch in batches[:3]:
        a.update(*batch)
    b.update(*batches[3])
    merged = a.merge(b)
    assert merged is a
    assert merged.compute() == pytest.approx(one.compute(), abs=1e-12)
    # Merging into/with an empty meter.
    into_empty = PerImageMeter().merge(one)
    assert into_empty.compute() == pytest.approx(one.compute(), abs=1e-12)
    before = one.compute()
    assert one.merge(PerImageMeter()).compute() == before
    # all_reduce without a process group: a no-op.
    assert one.all_reduce().compute() == before


def test_per_image_meter_empty_and_all_skipped():
    got = PerImageMeter().compute()
    assert np.isnan(got["auroc"]) and np.isnan(got["aupr"]) and np.isnan(got["fpr95"])
    assert got["n_images"] == 0 and got["n_skipped"] == 0
    meter = PerImageMeter()
    meter.update(torch.rand(3, 4, 4), torch.zeros(3, 4, 4, dtype=torch.bool))
    got = meter.compute()
    assert np.isnan(got["auroc"]) and got["n_images"] == 0 and got["n_skipped"] == 3


# --------------------------------------------------------------------------- 5. evaluate

def _ood_loader():
    g = torch.Generator().manual_seed(5)
    images = torch.randn(8, 3, 32, 48, generator=g)
    labels = torch.randint(0, 12, (8, 32, 48), generator=g)  # void (11) everywhere
    labels[0, :6, :8] = 12
    labels[2, 10:20, 30:44] = 12
    labels[4, 20:, :10] = 12
    labels[6, :3, :3] = 12
    labels[0, 3:9, 4:20] = 255  # over anomaly and other pixels
    labels[4, :, 40:] = 255
    labels[5, :8] = 255  # an image without anomaly
    labels[1, :, :4] = 11  # more void
    labels[2, :4] = 11
    # batch 3 (images 6, 7) and image 7 of it; batch 2 (image 5) has no anomaly at all.
    batches = [(images[:5], labels[:5]), (images[5:6], labels[5:6]), (images[6:], labels[6:])]
    return batches, labels


def _mcp_reference(segnet, batches, spec, exclude_void, exclude_ignore=True):
    values = []
    with torch.no_grad():
        for images, labels in batches:
            logits = segnet(images, return_feat=True)[-1]
            mcp = (1 - torch.softmax(logits.float(), dim=1).amax(dim=1)).numpy()
            for i in range(len(images)):
                lab = labels[i].numpy()
                if not (lab == 12).any():
                    continue
                keep = lab != spec.ignore_id if exclude_ignore else np.ones(lab.shape, bool)
                if exclude_void:
                    keep &= lab != spec.void_id
                r = reference(mcp[i][keep], lab[keep] == 12)
                assert r is not None
                values.append(r)
    assert len(values) == 4
    return dict(zip(("auroc", "aupr", "fpr95"), np.mean(values, axis=0)))


def test_evaluate_ood_per_image_matches_reference(nets):
    segnet, obsnet = nets
    spec = SPECS["Synthetic"]
    assert spec.anomaly_ids == (12,) and spec.void_id == 11 and spec.ignore_id == 255
    batches, labels = _ood_loader()
    results = evaluate(segnet, obsnet, batches, ["mcp", "obsnet"], spec, torch.device("cpu"),
                       MethodConfig(), 12, "test_ood", progress=False)[0]
    entry = results["methods"]["mcp"]
    assert set(entry["ood_per_image"]) == {"auroc", "aupr", "fpr95"}
    assert set(entry["ood"]) == {"auroc", "aupr", "fpr95"}
    assert set(results["methods"]["obsnet"]["ood_per_image"]) == {"auroc", "aupr", "fpr95"}
    want = _mcp_reference(segnet, batches, spec, exclude_void=False)
    for key in ("auroc", "aupr", "fpr95"):
        assert entry["ood_per_image"][key] == pytest.approx(want[key], abs=1e-9, rel=0), key
    # The test tells the protocols apart: void excluded (the pooled protocol's negatives)
    # gives other numbers.
    no_void = _mcp_reference(segnet, batches, spec, exclude_void=True)
    assert any(abs(no_void[k] - want[k]) > 1e-6 for k in want)
    # ... and so does counting the ignored (255) pixels as negatives.
    with_ignored = _mcp_reference(segnet, batches, spec, exclude_void=False, exclude_ignore=False)
    assert any(abs(with_ignored[k] - want[k]) > 1e-6 for k in want)
    # No anomaly in the split: neither OOD block.
    clean = [(images, labs.clamp(max=11)) for images, labs in batches]
    results = evaluate(segnet, None, clean, ["mcp"], spec, torch.device("cpu"),
                       MethodConfig(), 12, "val", progress=False)[0]
    assert "ood" not in results["methods"]["mcp"]
    assert "ood_per_image" not in results["methods"]["mcp"]


# --------------------------------------------------------------------------- 6. report

RESULTS = {
    "split": "test_ood", "n_images": 3,
    "segnet": {"miou": 0.5, "pixel_acc": 0.75, "iou": {"Sky": 0.5}},
    "methods": {
        "mcp": {"ood": {"auroc": 0.9, "aupr": 0.4, "fpr95": 0.3},
                "ood_per_image": {"auroc": 0.8123, "aupr": 0.3456, "fpr95": 0.4567},
                "error": {"auroc": 0.7, "aupr_error": 0.3, "aupr_success": 0.8, "fpr95": 0.5,
                          "ace": 0.1, "ece": 0.2}, "ms_per_image": 5.0},
        "void": {"error": {"auroc": 0.6, "aupr_error": 0.2, "aupr_success": 0.7, "fpr95": 0.6,
                           "ace": None, "ece": None}, "ms_per_image": 1.0},
    },
}


def _cell(table, method, column):
    """The right-justified cell of ``method`` under header ``column``."""
    lines = table.splitlines()
    header = next(line for line in lines if line.lstrip().startswith("Method"))
    end = header.index(column) + len(column)
    row = next(line for line in lines if line.split() and line.split()[0] == method)
    return row[:end].split("  ")[-1].strip()


def test_format_table_has_per_image_columns():
    table = format_table(RESULTS)
    for column in ("img AUROC", "img AUPR", "img FPR95", "OOD AUROC"):
        assert column in table
    assert _cell(table, "mcp", "img AUROC") == "81.2"
    assert _cell(table, "mcp", "img AUPR") == "34.6"
    assert _cell(table, "mcp", "img FPR95") == "45.7"
    assert _cell(table, "mcp", "OOD AUROC") == "90.0"
    assert _cell(table, "void", "img AUROC") == "n/a"


def test_write_csv_has_per_image_columns(tmp_path, nets):
    path = tmp_path / "r.csv"
    write_csv(path, RESULTS)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert {"ood_per_image_auroc", "ood_per_image_aupr", "ood_per_image_fpr95"} <= set(rows[0])
    mcp, void = rows
    assert float(mcp["ood_per_image_auroc"]) == 0.8123
    assert float(mcp["ood_per_image_fpr95"]) == 0.4567
    assert void["ood_per_image_auroc"] == ""
    # And from a real evaluation.
    segnet, _ = nets
    batches, _ = _ood_loader()
    results = evaluate(segnet, None, batches, ["mcp"], SPECS["Synthetic"], torch.device("cpu"),
                       MethodConfig(), 12, "test_ood", progress=False)[0]
    write_csv(path, results)
    with open(path, newline="") as f:
        row = next(csv.DictReader(f))
    assert float(row["ood_per_image_aupr"]) == pytest.approx(
        results["methods"]["mcp"]["ood_per_image"]["aupr"], rel=1e-12)
    assert "img AUPR" in format_table(results)
