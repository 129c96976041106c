"""Results of an evaluation: printed table, results.json, TensorBoard scalars and images."""
import json
import math
import os
import tempfile
from pathlib import Path

import torch
from torchvision.utils import make_grid

from Utils.affichage import colorize_labels, viridis

COLUMNS = (("ood", "auroc", "OOD AUROC"), ("ood", "aupr", "OOD AUPR"), ("ood", "fpr95", "OOD FPR95"),
           ("error", "auroc", "Err AUROC"), ("error", "aupr_error", "AUPR-Err"),
           ("error", "aupr_success", "AUPR-Succ"), ("error", "fpr95", "Err FPR95"),
           ("error", "ace", "ACE"))


def _percent(value) -> str:
    if value is None:
        return "n/a"
    return "nan" if math.isnan(value) else f"{100 * value:.1f}"


def format_table(results: dict) -> str:
    """One row per method, one column per metric, in percent with one decimal."""
    seg = results["segnet"]
    lines = [f"split {results['split']} ({results['n_images']} images): SegNet mIoU "
             f"{_percent(seg['miou'])}, pixel accuracy {_percent(seg['pixel_acc'])}"]
    header = ["Method", "ms/img"] + [c[2] for c in COLUMNS]
    rows = [header]
    for name, entry in results["methods"].items():
        cells = [_percent(entry.get(block, {}).get(key)) for block, key, _ in COLUMNS]
        rows.append([name, f"{entry['ms_per_image']:.1f}"] + cells)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for row in rows:
        lines.append("  ".join(cell.rjust(w) for cell, w in zip(row, widths)))
    return "\n".join(lines)


def _json_safe(value):
    """NaN becomes null (JSON has no NaN); containers are converted recursively."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def write_json(path, data: dict) -> None:
    """Write ``data`` as JSON atomically (temporary file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(_json_safe(data), f, indent=2)
    os.replace(tmp, path)


def log_scalars(writer, results: dict, prefix: str, step: int) -> None:
    """Every metric of every method as a TensorBoard scalar."""
    writer.add_scalar(f"{prefix}/segnet_miou", results["segnet"]["miou"], step)
    writer.add_scalar(f"{prefix}/segnet_pixel_acc", results["segnet"]["pixel_acc"], step)
    for name, entry in results["methods"].items():
        for block in ("ood", "error"):
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
