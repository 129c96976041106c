"""Printed table, results.json, TensorBoard pictures."""
import copy
import json
import math

import torch

from obsnet.data.specs import SPECS
from obsnet.report import format_table, log_preview, write_json
from obsnet.visual import colorize_labels, viridis

RESULTS = {
    "split": "test_ood", "n_images": 2,
    "segnet": {"miou": 0.5, "pixel_acc": 0.75, "iou": {"Sky": float("nan")}},
    "methods": {
        "obsnet": {"ood": {"auroc": 0.9123, "aupr": 0.5, "fpr95": float("nan")},
                   "error": {"auroc": 0.8, "aupr_error": 0.4, "aupr_success": 0.9,
                             "fpr95": 0.3, "ace": None}, "ms_per_image": 12.34},
        "mcp": {"error": {"auroc": 0.7, "aupr_error": 0.3, "aupr_success": 0.8, "fpr95": 0.5,
                          "ace": 0.1}, "ms_per_image": 5.0},
    },
}


def test_table_in_percent_with_one_decimal():
    table = format_table(RESULTS)
    lines = table.splitlines()
    assert "mIoU 50.0" in lines[0] and "pixel accuracy 75.0" in lines[0]
    obsnet = next(line for line in lines if line.strip().startswith("obsnet"))
    assert "91.2" in obsnet and "12.3" in obsnet and "nan" in obsnet and "n/a" in obsnet
    mcp = next(line for line in lines if line.strip().startswith("mcp"))
    assert mcp.split()[2] == "n/a"  # no OOD block: no anomaly pixel in the split


def test_results_json_has_null_for_nan(tmp_path):
    path = tmp_path / "out" / "results.json"
    write_json(path, RESULTS)
    data = json.loads(path.read_text())
    assert data["methods"]["obsnet"]["ood"]["fpr95"] is None
    assert data["segnet"]["iou"]["Sky"] is None
    assert data["methods"]["obsnet"]["ood"]["auroc"] == 0.9123
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]


def test_viridis_and_class_colours():
    maps = torch.tensor([[[0.0, 1.0]]])
    img = viridis(maps)
    assert img.shape == (1, 3, 1, 2)
    assert torch.allclose(img[0, :, 0, 0], torch.tensor([0.267, 0.005, 0.329]), atol=2e-3)
    assert torch.allclose(img[0, :, 0, 1], torch.tensor([0.993, 0.906, 0.144]), atol=2e-3)
    colours = colorize_labels(torch.tensor([[[3, 12, 200]]]), SPECS["CamVid"].colors)
    assert torch.allclose(colours[0, :, 0, 0] * 255, torch.tensor([128.0, 64, 128]))
    assert torch.allclose(colours[0, :, 0, 1] * 255, torch.tensor([255.0, 255, 0]))
    assert colours[0, :, 0, 2].sum() == 0


class _Writer:
    def __init__(self):
        self.images = {}

    def add_image(self, tag, image, step):
        self.images[tag] = image


def test_preview_grid_has_one_row_per_picture():
    spec = SPECS["Synthetic"]
    preview = {"images": torch.zeros(2, 3, 8, 8), "labels": torch.zeros(2, 8, 8, dtype=torch.long),
               "pred": torch.ones(2, 8, 8, dtype=torch.long), "error": torch.ones(2, 8, 8),
               "maps": {"obsnet": torch.rand(2, 8, 8), "mcp": torch.rand(2, 8, 8)}}
    writer = _Writer()
    log_preview(writer, preview, spec.colors, spec.mean, spec.std, "Test", 0)
    (tag, grid), = writer.images.items()
    assert tag.startswith("Test/") and "obsnet" in tag
    assert grid.shape == (3, 2 + 6 * 10, 2 + 2 * 10)  # 6 rows, 2 columns of 8 px + padding
    assert not math.isnan(grid.sum().item())


def test_results_csv_one_row_per_method(tmp_path):
    import csv

    from obsnet.report import write_csv
    write_csv(tmp_path / "results.csv", RESULTS)
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [r["method"] for r in rows] == ["obsnet", "mcp"]
    assert float(rows[0]["ood_auroc"]) == 0.9123 and rows[0]["ood_fpr95"] == ""
    assert rows[1]["ood_auroc"] == "" and float(rows[1]["error_ace"]) == 0.1


class _CurveWriter:
    def __init__(self):
        self.curves = {}

    def add_pr_curve_raw(self, tag, tp, fp, tn, fn, precision, recall, step, num_thresholds):
        self.curves[tag] = (tp, fp, tn, fn, precision, recall, num_thresholds)


def test_pr_curves_are_the_meter_counts():
    from obsnet.metrics.ood import OODMeter
    from obsnet.report import log_pr_curves
    torch.manual_seed(0)
    meter = OODMeter()
    positive = torch.rand(5000) < 0.3
    meter.update(torch.randn(5000) + positive.float(), positive)
    empty = OODMeter()
    empty.update(torch.randn(10), torch.zeros(10, dtype=torch.bool))
    writer = _CurveWriter()
    log_pr_curves(writer, {"obsnet": {"error": meter, "ood": empty}}, "Test", 0, points=11)
    assert list(writer.curves) == ["Test/obsnet/error"]  # no positives: no curve
    tp, fp, tn, fn, precision, recall, n = writer.curves["Test/obsnet/error"]
    ref = meter.pr_curve_counts()
    index = torch.linspace(0, len(ref[0]) - 1, 11).round().long().flip(0)
    for logged, counts in zip((tp, fp, tn, fn), ref):
        assert torch.equal(logged.long(), counts[index])
    assert n == 11 and recall[0] == 1 and torch.all(recall[1:] <= recall[:-1])
    assert torch.allclose(precision, tp / (tp + fp).clamp_min(1))


def test_component_columns_only_where_computed():
    """sIoU, PPV and mean F1 appear in the table and the CSV only when some method has
    SegmentMeIfYouCan's component metrics."""
    assert "sIoU" not in format_table(RESULTS)
    with_components = copy.deepcopy(RESULTS)
    first = next(iter(with_components["methods"].values()))
    first["components"] = {"siou": 0.25, "ppv": 0.5, "mean_f1": 0.125, "threshold": 0.3}
    table = format_table(with_components)
    header = next(line for line in table.splitlines() if line.split()[:1] == ["Method"])
    assert header.split()[-4:] == ["sIoU", "PPV", "mean", "F1"]
    assert "25.0" in table and "12.5" in table
