"""Results of an evaluation: printed table, results files (JSON, CSV), TensorBoard scalars and images."""
import csv
import io
import json
import math

import torch
from torchvision.utils import make_grid

from obsnet.outputs import atomic_write
from obsnet.visual import colorize_labels, viridis

COLUMNS = (("ood", "auroc", "OOD AUROC"), ("ood", "aupr", "OOD AUPR"), ("ood", "fpr95", "OOD FPR95"),
           ("ood_per_image", "auroc", "img AUROC"), ("ood_per_image", "aupr", "img AUPR"),
           ("ood_per_image", "fpr95", "img FPR95"),
           ("error", "auroc", "Err AUROC"), ("error", "aupr_error", "AUPR-Err"),
           ("error", "aupr_success", "AUPR-Succ"), ("error", "fpr95", "Err FPR95"),
           ("error", "ace", "ACE"), ("error", "ece", "ECE"),
           # risk–coverage (obsnet/metrics/risk.py): AURC, E-AURC, coverage at risk 1/2/5%
           ("error", "aurc", "AURC"), ("error", "eaurc", "E-AURC"),
           ("error", "cov_at_risk_1", "Cov@1%"), ("error", "cov_at_risk_2", "Cov@2%"),
           ("error", "cov_at_risk_5", "Cov@5%"),
           # SegmentMeIfYouCan's component metrics (obsnet/component_eval.py), benchmarks only
           ("components", "siou", "sIoU"), ("components", "ppv", "PPV"),
           ("components", "mean_f1", "mean F1"))


class NullWriter:
    """Stands in for a SummaryWriter on DDP ranks other than 0: every call does nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def _percent(value) -> str:
    if value is None:
        return "n/a"
    return "nan" if math.isnan(value) else f"{100 * value:.1f}"


def columns_of(results: dict) -> tuple:
    """COLUMNS, without the component metrics' unless some method has them (only the
    SegmentMeIfYouCan / Fishyscapes presets compute them)."""
    with_components = any("components" in e for e in results["methods"].values())
    return tuple(c for c in COLUMNS if c[0] != "components" or with_components)


def format_table(results: dict) -> str:
    """One row per method, one column per metric, in percent with one decimal: "OOD" pooled
    over the split's pixels, "img" anomaly-seg's mean over images, "Err" the error protocol,
    then SegmentMeIfYouCan's component sIoU, PPV and mean F1 where computed."""
    seg = results["segnet"]
    lines = [f"split {results['split']} ({results['n_images']} images): SegNet mIoU "
             f"{_percent(seg['miou'])}, pixel accuracy {_percent(seg['pixel_acc'])}"]
    if seg["miou"] is not None and seg["miou"] == seg["miou"]:  # NaN: no class ground truth
        lines.append("IoU per class: " + ", ".join(f"{name} {_percent(v)}"
                                                    for name, v in seg["iou"].items()))
    columns = columns_of(results)
    header = ["Method", "ms/img"] + [c[2] for c in columns]
    rows = [header]
    for name, entry in results["methods"].items():
        cells = [_percent(entry.get(block, {}).get(key)) for block, key, _ in columns]
        rows.append([name, f"{entry['ms_per_image']:.1f}"] + cells)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for row in rows:
        lines.append("  ".join(cell.rjust(w) for cell, w in zip(row, widths)))
    return "\n".join(lines)


FROZEN_COLUMNS = (("accepted_correct", "acc. correct"), ("caught_errors", "caught err"),
                  ("selective_risk", "risk"), ("caught_anomalies", "caught OOD"))


def _rate_pair(point: dict, key: str) -> str:
    """"fit -> test" of one rate in percent (the fit value alone before any test)."""
    fit = _percent(point.get("fit", {}).get(key))
    return fit if "test" not in point else f"{fit} -> {_percent(point['test'].get(key))}"


def format_frozen_table(points: dict, about: dict, results: dict | None = None) -> str:
    """The operating points of ``points`` (method -> kind -> {threshold, fit, test}) in one
    table: each rate as "fit split -> test split", false alarms per megapixel, and with
    ``results`` the FPR95 tuned on the test split itself, for comparison. ``about``: the fit
    split, its images and the targets."""
    targets = about["targets"]
    risk = "" if targets.get("risk") is None else f", risk <= {100 * targets['risk']:.1f}%"
    lines = [f"thresholds fixed on {about['split']} ({about['images']} images; targets: "
             f"accept {100 * targets['tpr']:.1f}% of the correct pixels{risk}); alarm when "
             f"score > threshold; rates in % as fit -> test"]
    header = ["Method", "point", "threshold", *(label for _, label in FROZEN_COLUMNS), "FA/Mpx"]
    header += ["Err FPR95 (test-tuned)"] if results is not None else []
    rows = [header]
    for name, kinds in points.items():
        for kind, point in kinds.items():
            fa = point.get("test", point.get("fit", {})).get("false_alarms_per_mpx")
            row = [name, kind, f"{point['threshold']:.6g}",
                   *(_rate_pair(point, key) for key, _ in FROZEN_COLUMNS),
                   "n/a" if fa is None or math.isnan(fa) else f"{fa:.0f}"]
            if results is not None:
                row.append(_percent(results["methods"][name].get("error", {}).get("fpr95")))
            rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def _json_safe(value):
    """NaN becomes null and an infinity the string "inf" or "-inf" (JSON has neither, and a
    threshold may be one); containers are converted recursively."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, float) and math.isinf(value):
        return str(value)
    return value


def write_json(path, data: dict, label: str | None = None) -> None:
    """Write ``data`` as JSON atomically (``obsnet.outputs.atomic_write``; ``label``: the flag
    that names the folder, for error messages)."""
    text = json.dumps(_json_safe(data), indent=2)
    atomic_write(path, lambda f: f.write(text.encode()), label)


def write_csv(path, results: dict, label: str | None = None) -> None:
    """One row per method: ms per image and every metric of both protocols (fractions)."""
    columns = columns_of(results)
    fields = ["method", "ms_per_image"] + [f"{block}_{key}" for block, key, _ in columns]
    rows = []
    for name, entry in results["methods"].items():
        row = {"method": name, "ms_per_image": entry["ms_per_image"]}
        for block, key, _ in columns:
            value = entry.get(block, {}).get(key)
            row[f"{block}_{key}"] = "" if value is None or math.isnan(value) else value
        rows.append(row)
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, lambda f: f.write(text.getvalue().encode()), label)


def log_pr_curves(writer, meters: dict, prefix: str, step: int, points: int = 127) -> None:
    """Precision-recall curves from the meters' bin counts (no second pass over pixels).

    ``meters``: method name -> {"ood": OODMeter, "error": OODMeter}; ``points`` thresholds
    are taken evenly among the meter's distinct score bins.
    """
    for name, by_protocol in meters.items():
        for protocol in ("ood", "error"):
            tp, fp, tn, fn = by_protocol[protocol].pr_curve_counts()
            if len(tp) == 0 or tp[-1] == 0:
                continue  # no positive pixel: no curve
            index = torch.linspace(0, len(tp) - 1, points).round().long()
            # TensorBoard orders thresholds from low to high: the meter goes high to low.
            tp, fp, tn, fn = (c[index].flip(0).double() for c in (tp, fp, tn, fn))
            precision = tp / (tp + fp).clamp_min(1)
            recall = tp / (tp + fn).clamp_min(1)
            writer.add_pr_curve_raw(f"{prefix}/{name}/{protocol}", tp, fp, tn, fn, precision,
                                    recall, step, num_thresholds=points)


def log_scalars(writer, results: dict, prefix: str, step: int) -> None:
    """Every metric of every method as a TensorBoard scalar."""
    writer.add_scalar(f"{prefix}/segnet_miou", results["segnet"]["miou"], step)
    writer.add_scalar(f"{prefix}/segnet_pixel_acc", results["segnet"]["pixel_acc"], step)
    for name, entry in results["methods"].items():
        for block in ("ood", "ood_per_image", "error", "components"):
            for key, value in entry.get(block, {}).items():
                if value is not None and not math.isnan(value):
                    writer.add_scalar(f"{prefix}/{name}/{block}_{key}", value, step)
        writer.add_scalar(f"{prefix}/{name}/ms_per_image", entry["ms_per_image"], step)


def log_preview(writer, preview: dict, colors, mean, std, prefix: str, step: int) -> None:
    """Input, prediction, label and error map, then each method's map in viridis."""
    mean_t = torch.tensor(mean).view(1, 3, 1, 1)
    std_t = torch.tensor(std).view(1, 3, 1, 1)
    images = (preview["images"] * std_t + mean_t).clamp(0, 1)
    rows = [images, colorize_labels(preview["pred"], colors),
            colorize_labels(preview["labels"], colors), viridis(preview["error"], 0.0, 1.0)]
    rows += [viridis(m) for m in preview["maps"].values()]
    grid = make_grid(torch.cat(rows), nrow=len(images), padding=2)
    writer.add_image(f"{prefix}/input_pred_label_error_" + "_".join(preview["maps"]), grid, step)
