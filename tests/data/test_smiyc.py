"""SegmentMeIfYouCan (AnomalyTrack, ObstacleTrack) and Fishyscapes Lost & Found presets.

Folders are generated in tmp_path in the road_anomaly_benchmark layout and file names,
frames of different sizes; labels hold 0 in-distribution, 1 anomaly, 255 void.
"""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score
from torchvision import tv_tensors

from obsnet.component_eval import pixel_curve, split_components
from obsnet.components import SIZE_LIMITS, ComponentMeter, f1_optimal_threshold
from obsnet.data.errors import DatasetError
from obsnet.data.loaders import build_dataset
from obsnet.data.smiyc import decode_benchmark
from obsnet.data.specs import SPECS
from obsnet.evaluate import _label_masks
from tests.helpers.cityscapes import H, W, make_cityscapes
from tests.helpers.smiyc import (ANOMALY_STEMS, FISHY, OBSTACLE_STEMS, make_anomaly, make_fishy,
                                 make_track, mcp_reference)
from tests.helpers.runner import main_py


def test_specs_are_cityscapes_ones_and_test_only():
    city = SPECS["Cityscapes"]
    for name, split in (("RoadAnomaly21", "validation"), ("RoadObstacle21", "validation"),
                        ("FishyscapesLAF", "val")):
        spec = SPECS[name]
        assert spec.test_only and spec.test_split == split
        assert (spec.class_names, spec.mean, spec.std, spec.size) == (
            city.class_names, city.mean, city.std, (512, 1024))
        assert (spec.nclass, spec.anomaly_ids, spec.inlier_id, spec.ignore_id) == (19, (19,), 20, 255)
        assert len(spec.colors) == 21


def test_decoding_by_hand():
    spec = SPECS["RoadAnomaly21"]
    raw = tv_tensors.Mask(torch.tensor([[0, 1, 255], [2, 0, 1]], dtype=torch.uint8))
    assert decode_benchmark(raw, spec).tolist() == [[20, 19, 255], [255, 20, 19]]


def test_label_masks_inliers_are_ood_negatives_not_errors():
    spec = SPECS["RoadObstacle21"]
    labels = torch.tensor([[20, 19, 255, 20]])
    pred = torch.tensor([[3, 3, 3, 0]])
    _, err_valid, anomaly, ood_valid, image_valid = _label_masks(labels, pred, spec, 19)
    assert ood_valid.tolist() == [[True, True, False, True]]
    assert anomaly.tolist() == [[False, True, False, False]]
    assert not err_valid[labels == 20].any()
    assert image_valid.tolist() == [[True, True, False, True]]


@pytest.mark.parametrize("track_form", [False, True])
def test_tracks_list_sorted_pairs(tmp_path, track_form):
    datasets = tmp_path / "datasets"
    anomaly = make_anomaly(datasets)
    obstacle = make_track(datasets, "dataset_ObstacleTrack", OBSTACLE_STEMS, "webp")
    for name, root, stems in (("RoadAnomaly21", anomaly, sorted(ANOMALY_STEMS)),
                              ("RoadObstacle21", obstacle, ["validation_1", "validation_2"])):
        spec = SPECS[name]
        data = build_dataset(spec, root if track_form else datasets, spec.test_split, (32, 64))
        assert [p.image.stem for p in data.samples] == stems
        for pair in data.samples:
            assert pair.label == root.absolute() / "labels_masks" / f"{pair.image.stem}_labels_semantic.png"
        image, label = data[1]
        with Image.open(data.samples[1].label) as file:  # the label keeps the file's resolution
            assert image.shape == (3, 32, 64) and label.shape == (file.height, file.width)
        assert set(label.unique().tolist()) == {19, 20, 255}


@pytest.mark.parametrize("fishy_form", [False, True])
def test_fishyscapes_pairs_laf_images(tmp_path, fishy_form):
    datasets = tmp_path / "datasets"
    fishy, laf = make_fishy(datasets)
    data = build_dataset(SPECS["FishyscapesLAF"], fishy if fishy_form else datasets, "val", (32, 64))
    assert [p.label.name for p in data.samples] == [f"{fid}_fishy-labels.png" for fid in sorted(FISHY)]
    assert [p.image for p in data.samples] == [
        laf.absolute() / "leftImg8bit/test/01_Hanns_Klemm_Str_45/"
                         "01_Hanns_Klemm_Str_45_000000_000080_leftImg8bit.png",
        laf.absolute() / "leftImg8bit/train/04_Maurener_Weg_8/"
                         "04_Maurener_Weg_8_000000_000030_leftImg8bit.png"]
    _, label = data[0]
    assert set(label.unique().tolist()) == {19, 20, 255}
    (laf / "leftImg8bit/test/01_Hanns_Klemm_Str_45/"
           "01_Hanns_Klemm_Str_45_000000_000080_leftImg8bit.png").unlink()
    with pytest.raises(DatasetError, match=r"01_Hanns_Klemm_Str_45_000000_000080_fishy-labels\.png: "
                                           r"image file not found"):
        build_dataset(SPECS["FishyscapesLAF"], datasets, "val")


def test_pixel_curve_ties_void_and_no_anomaly():
    scores = [np.array([[0.5, 0.9], [0.5, 0.1]], np.float32), np.array([[0.9, 7.0]], np.float32)]
    labels = [np.array([[1, 0], [0, 255]], np.uint8), np.array([[1, 255]], np.uint8)]
    thresholds, tp, fp, n_pos = pixel_curve(scores, labels)  # void pixels (0.1, 7.0) left out
    assert thresholds.tolist() == [np.float32(0.9), 0.5] and n_pos == 2
    assert tp.tolist() == [1, 2] and fp.tolist() == [1, 2]
    none = split_components(scores, [np.where(lab == 1, 0, lab) for lab in labels], 0, 0)
    assert all(math.isnan(v) for v in none.values())
    # pixel F1: 2/4 at 0.9, 4/6 at 0.5; then "> 0.5": frame 0 misses its GT pixel and predicts
    # a negative one, frame 1 hits its GT pixel (the void 7.0 is not predicted)
    some = split_components(scores, labels, 0, 0)
    assert some == {"siou": 0.5, "ppv": 0.5, "mean_f1": 0.5, "threshold": 0.5}


def check_components(results, stdout, maps, labels, scores, truth):
    """Every method has ``components`` (sIoU finite: the anomaly blobs pass the size limits),
    the table shows them, and mcp's equal ComponentMeter's on the recomputed score maps at the
    pixel-F1-optimal threshold of cumulative counts computed here."""
    for name in ("obsnet", "mcp"):
        comp = results["methods"][name]["components"]
        assert set(comp) == {"siou", "ppv", "mean_f1", "threshold"}
        assert math.isfinite(comp["siou"]) and math.isfinite(comp["threshold"]), comp
        assert all(v is None or math.isfinite(v) for v in comp.values()), comp  # JSON: NaN = null
    header = next(line for line in stdout.splitlines() if line.lstrip().startswith("Method"))
    assert header.split()[-4:] == ["sIoU", "PPV", "mean", "F1"], header
    order = np.argsort(-scores, kind="stable")
    ranked, positive = scores[order], truth[order]
    last = np.r_[ranked[1:] != ranked[:-1], True]  # the last pixel of each distinct score
    tp, fp = np.cumsum(positive)[last], np.cumsum(~positive)[last]
    threshold = f1_optimal_threshold(ranked[last], tp, fp, int(truth.sum()))
    meter = ComponentMeter(threshold, *SIZE_LIMITS["RoadAnomaly21"])
    for score, label in zip(maps, labels):
        meter.update(score, label)
    expected = meter.compute()
    comp = results["methods"]["mcp"]["components"]
    assert expected["n_gt"] == 3 and comp["threshold"] == threshold, (comp, expected)
    for key in ("siou", "ppv", "mean_f1"):
        want = None if math.isnan(expected[key]) else expected[key]
        assert (comp[key] is None) == (want is None), (key, comp, expected)
        # PIL's and torch's bilinear upsampling differ by ~2e-6, which moves a few pixels
        # across the threshold
        assert want is None or abs(comp[key] - want) <= 1e-4, (key, comp, expected)


def test_cli_test_only_and_refusals(tmp_path):
    cs = make_cityscapes(tmp_path / "cs")
    common = ["--size", str(H), str(W), "--width_mult", "0.0625", "--bsize", "2", "--epoch", "1",
              "--seed", "0", "--segnet_file", str(tmp_path / "segnet.pth"),
              "--obsnet_file", str(tmp_path / "obs")]
    out = main_py("--data", "Cityscapes", "--dset_folder", str(cs), *common,
                  "--tboard", str(tmp_path / "cl"), "--train_segnet")
    assert out.returncode == 0, out.stdout + out.stderr
    out = main_py("--data", "Cityscapes", "--dset_folder", str(cs), *common,
                  "--tboard", str(tmp_path / "cl"))
    assert out.returncode == 0, out.stdout + out.stderr
    datasets = tmp_path / "datasets"
    make_anomaly(datasets)
    run = ["--data", "RoadAnomaly21", "--dset_folder", str(datasets), *common,
           "--tboard", str(tmp_path / "logs")]
    out = main_py(*run, "--test_only", "--test_multi", "obsnet,mcp")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "IoU per class" not in out.stdout  # no class ground truth: no line of n/a
    results = json.loads((tmp_path / "logs" / "results_validation.json").read_text())
    assert results["split"] == "validation" and results["n_images"] == 3
    assert results["segnet"]["miou"] is None  # no class ground truth
    for name in ("obsnet", "mcp"):
        entry = results["methods"][name]
        assert "error" not in entry
        for block in ("ood", "ood_per_image"):
            assert all(math.isfinite(v) for v in entry[block].values()), entry
    # mcp's pooled OOD AUROC, recomputed: positives = anomaly pixels, negatives = the rest but void
    maps, labels = mcp_reference(tmp_path / "segnet.pth", datasets)
    keep = [lab != 255 for lab in labels]
    scores = [m[k] for m, k in zip(maps, keep)]
    truth = [lab[k] == 1 for lab, k in zip(labels, keep)]
    expected = roc_auc_score(np.concatenate(truth), np.concatenate(scores))
    entry = results["methods"]["mcp"]
    assert abs(entry["ood"]["auroc"] - expected) <= 1e-4 + entry["auroc_bound"], (entry, expected)
    check_components(results, out.stdout, maps, labels, np.concatenate(scores),
                     np.concatenate(truth))
    # the segmenter's checkpoint records its preset: --segnet_file alone gives the same run
    bare = ["--data", "RoadAnomaly21", "--dset_folder", str(datasets), "--seed", "0", "--bsize", "2",
            "--segnet_file", str(tmp_path / "segnet.pth"), "--obsnet_file", str(tmp_path / "obs"),
            "--tboard", str(tmp_path / "bare"), "--test_only", "--test_multi", "obsnet,mcp"]
    out = main_py(*bare)
    assert out.returncode == 0, out.stdout + out.stderr
    again = json.loads((tmp_path / "bare" / "results_validation.json").read_text())
    for name in ("obsnet", "mcp"):
        assert again["methods"][name]["ood"] == results["methods"][name]["ood"]
        assert again["methods"][name]["components"] == results["methods"][name]["components"]
    out = main_py(*bare, "--width_mult", "0.5")
    assert out.returncode == 2 and "trained with --width_mult 0.0625" in out.stderr, out.stderr
    for flag in ("--train_segnet", "--epoch"):  # SegNet or observer training: refused
        args = [*run, flag] if flag == "--train_segnet" else run
        out = main_py(*args)
        assert out.returncode == 2, out.stdout + out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and "--test_only" in lines[0] and "RoadAnomaly21" in lines[0]
    (datasets / "dataset_AnomalyTrack/labels_masks/validation0001_labels_semantic.png").unlink()
    out = main_py(*run, "--test_only", "--test_multi", "mcp", "--overwrite")  # the first test's files
    assert out.returncode != 0 and "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "validation0001_labels_semantic.png" in lines[0], out.stderr


def test_check_counts_the_test_frames_without_labels(tmp_path):
    from obsnet.data.check import inspect_pair
    from obsnet.data.smiyc import RoadAnomaly21
    datasets = tmp_path / "datasets"
    make_anomaly(datasets)
    spec = SPECS["RoadAnomaly21"]
    _, pairs = RoadAnomaly21.read_pairs(datasets, "test")
    assert [p.image.name for p in pairs] == ["cow0000.jpg"] and pairs[0].label is None
    counts, problems = inspect_pair(RoadAnomaly21, spec, pairs[0])
    assert problems == [] and counts is not None and counts.sum() == 0
    image, label = build_dataset(spec, datasets, "test", (32, 64))[0]
    assert image.shape == (3, 32, 64) and label.shape == (8, 8) and (label == 255).all()


def test_check_defaults_to_the_labelled_split_and_reads_test_frames_on_request(tmp_path):
    from obsnet.data.check import check
    datasets = tmp_path / "datasets"
    make_track(datasets, "dataset_ObstacleTrack", OBSTACLE_STEMS, "webp", stray=False)  # no test frame
    lines, ok = check("RoadObstacle21", datasets)
    assert ok and any(line.startswith("validation ") for line in lines), lines
    lines, ok = check("RoadObstacle21", datasets, ["test"])
    assert not ok and any("no *.webp frame of split 'test'" in line for line in lines)
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(
        datasets / "dataset_ObstacleTrack" / "images" / "gravel_0001.webp")
    lines, ok = check("RoadObstacle21", datasets, ["test"])
    assert ok and any(line.split()[:3] == ["test", "images", "1"] for line in lines), lines
