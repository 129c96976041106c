"""SegmentMeIfYouCan component metrics (``obsnet/components.py``) in ``--test_only``.

Only the evaluation presets listed in ``SIZE_LIMITS`` that are ``test_only`` (RoadAnomaly21,
RoadObstacle21, FishyscapesLAF) get them. The pixel threshold is the pixel-F1-optimal one over
the whole split, so the scores are needed twice: once to fit the threshold, once to count the
components at it. These benchmark splits are small (10-400 frames), so each frame's score map
(float32, as the OOD meter ranks them: float16 would move pixels across the threshold) and its
0 / 1 / 255 label (uint8) are simply kept on the CPU during the pass, both at the label file's
resolution (``obsnet.data.native``); that is about 4 bytes per pixel and method, e.g. 830 MB
per method for 100 frames at 1024x2048. The other presets keep nothing.

The threshold is taken from exact cumulative counts over the kept maps' distinct scores (not
from the OOD meter's bins: a coarse bin has no single score to use as a threshold), then
``f1_optimal_threshold``; components are predicted with ``score > threshold``, as SMIYC does.
"""
import numpy as np
import torch

from obsnet.components import NAN, SIZE_LIMITS, ComponentMeter, f1_optimal_threshold

VOID = 255
KEYS = ("siou", "ppv", "mean_f1", "threshold")


def wants_components(spec) -> bool:
    """Whether the evaluation of ``spec`` reports component metrics."""
    return bool(spec.test_only) and spec.name in SIZE_LIMITS


def pixel_curve(scores, labels):
    """(thresholds descending, cumulative TP, cumulative FP, n_pos) over the non-void pixels of
    the frames, one point per distinct score (a point counts pixels with score >= threshold)."""
    keep = [lab != VOID for lab in labels]
    flat = np.concatenate([np.zeros(0, np.float32)] + [s[k] for s, k in zip(scores, keep)])
    pos = np.concatenate([np.zeros(0, bool)] + [lab[k] == 1 for lab, k in zip(labels, keep)])
    values, inverse = np.unique(flat, return_inverse=True)
    n_pos_at = np.bincount(inverse, weights=pos.astype(np.float64), minlength=values.size)[::-1]
    n_at = np.bincount(inverse, minlength=values.size)[::-1]
    return values[::-1], np.cumsum(n_pos_at), np.cumsum(n_at - n_pos_at), int(pos.sum())


def split_components(scores, labels, min_pred: int, min_gt: int) -> dict:
    """``siou``, ``ppv``, ``mean_f1`` and ``threshold`` of a split from its per-frame 2-D score
    maps and 0 / 1 / 255 labels, at the pixel-F1-optimal threshold (all NaN without any
    scored pixel or without any anomaly pixel)."""
    thresholds, tp, fp, n_pos = pixel_curve(scores, labels)
    if not thresholds.size or n_pos == 0:
        return dict.fromkeys(KEYS, NAN)
    threshold = f1_optimal_threshold(thresholds, tp, fp, n_pos)
    meter = ComponentMeter(threshold, min_pred, min_gt, VOID)
    for score, label in zip(scores, labels):
        meter.update(score, label)
    out = meter.compute()
    return {k: out[k] for k in KEYS}


def benchmark_labels(anomaly: torch.Tensor, ood_valid: torch.Tensor) -> torch.Tensor:
    """B×H×W uint8: 1 anomaly, 0 OOD negative, 255 void (the benchmarks' label values)."""
    label = torch.full(anomaly.shape, VOID, dtype=torch.uint8, device=anomaly.device)
    label[ood_valid] = 0
    label[anomaly & ood_valid] = 1
    return label


class ComponentFrames:
    """The frames of one evaluation pass, kept on the CPU for the component metrics: a score
    map per method (float32) and the label (uint8: 1 anomaly, 0 OOD negative, 255 void)."""

    def __init__(self, names, spec):
        self.min_pred, self.min_gt = SIZE_LIMITS[spec.name]
        self.scores = {name: [] for name in names}
        self.labels = []

    def add_labels(self, labels) -> None:
        """Labels of one batch: 2-D uint8 arrays (1 anomaly, 0 OOD negative, 255 void)."""
        self.labels.extend(labels)

    def add_scores(self, name: str, maps) -> None:
        """Score maps of one batch for method ``name``: 2-D float32 arrays."""
        self.scores[name].extend(np.asarray(m, np.float32) for m in maps)

    def compute(self) -> dict:
        """Method name -> ``split_components`` of its kept frames."""
        return {name: split_components(maps, self.labels, self.min_pred, self.min_gt)
                for name, maps in self.scores.items()}
