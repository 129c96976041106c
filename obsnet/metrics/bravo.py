"""The BRAVO challenge's metrics, from 16-bit confidences (``docs/bravo.md``).

A confidence c in [0, 1] is quantised to a level ``floor(c * 65536)`` clipped to 0..65535, the
value its ``_conf.png`` holds; the toolkit reads level k back as ``(k + 0.5) / 65536``. Every
curve metric is a function of per-level pixel counts, so one 65536-bin histogram per kind of
pixel (valid and right, valid and wrong, invalid) is exact and bounded in memory.

Pixels: void ones count nowhere; *valid* pixels give the semantic metrics (mIoU, ECE, AUROC,
AUPR-success, AUPR-error, FPR95 of right vs wrong, ranked by confidence); *invalid* pixels are
the OOD positives against every valid pixel, ranked by ``65535 - level``.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist

from obsnet.distributed import in_process_group
from obsnet.metrics.common import NAN, dist_device

LEVELS = 65536
ECE_BINS = 15
TPR_TARGET = 0.95
SEMANTIC = ("miou_valid", "ece_valid", "auroc_valid", "auprc_success_valid",
            "auprc_error_valid", "fpr95_valid")
OOD = ("auroc_ood", "auprc_ood", "fpr95_ood")
LOWER_IS_BETTER = ("ece_valid", "fpr95_valid", "fpr95_ood")


def quantise(conf: torch.Tensor) -> torch.Tensor:
    """Confidences in [0, 1] -> int64 levels 0..65535 (``floor(c * 65536)``, clipped): level k
    holds [k/65536, (k+1)/65536), whose midpoint is the value the toolkit reads back."""
    return torch.clamp(torch.floor(conf.double() * LEVELS), 0, LEVELS - 1).long()


def squash(scores: torch.Tensor) -> torch.Tensor:
    """A fixed map of unbounded uncertainty scores (higher = more uncertain) to a confidence in
    (0, 1): ``sigmoid(-sign(s) * log1p(|s|))``. Decreasing, the same for every image of a split
    (commensurable), and the log keeps energies and distances of tens or thousands apart at 16
    bits where a plain sigmoid would pile them on one level."""
    s = scores.double()
    return torch.sigmoid(-torch.sign(s) * torch.log1p(s.abs()))


def bravo_confidence(method, scores: torch.Tensor, cfg) -> torch.Tensor:
    """A method's confidence that the prediction is right: ``1 - P(error)`` for a method that
    gives a probability of error (``method.to_prob``: the observer's sigmoid, MCP's 1 - max
    softmax, the sampled methods' with --sampling_score mcp), else ``squash`` of its score."""
    prob = None if method.to_prob is None else method.to_prob(scores, cfg)
    if prob is None:
        return squash(scores)
    return 1.0 - prob.double().clamp(0.0, 1.0)


def level_values() -> np.ndarray:
    """The confidence each level stands for: its bin's midpoint ``(k + 0.5) / 65536``."""
    return (np.arange(LEVELS, dtype=np.float64) + 0.5) / LEVELS


def _from_top(counts: np.ndarray) -> np.ndarray:
    """Counts at or above each level, highest level first: one threshold per level."""
    return np.cumsum(np.asarray(counts, np.float64)[::-1])


def roc_curve(pos: np.ndarray, neg: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """(AUROC, TPR, FPR) of the positives ``pos`` against ``neg`` (per-level counts, a higher
    level = more positive), thresholds from the top level down plus the (0, 0) start; the area by
    trapezoids, so a level shared by both classes is one diagonal step, as scikit-learn's."""
    tp, fp = _from_top(pos), _from_top(neg)
    if tp[-1] == 0 or fp[-1] == 0:
        return NAN, np.zeros(1), np.zeros(1)
    tpr = np.concatenate(([0.0], tp / tp[-1]))
    fpr = np.concatenate(([0.0], fp / fp[-1]))
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    return area, tpr, fpr


def fpr_at_tpr(tpr: np.ndarray, fpr: np.ndarray, target: float = TPR_TARGET) -> float:
    """FPR at the first threshold (from the top) whose TPR reaches ``target``."""
    if tpr.size < 2:
        return NAN
    return float(fpr[int(np.searchsorted(tpr, target, side="left"))])


def average_precision(pos: np.ndarray, neg: np.ndarray) -> float:
    """Area under the precision-recall curve of ``pos`` (per-level counts, higher level = more
    positive) as a step sum: each threshold's recall gain times its precision."""
    tp, fp = _from_top(pos), _from_top(neg)
    if tp[-1] == 0:
        return 0.0  # the toolkit's value when there is no positive: no recall is ever gained
    predicted = tp + fp
    precision = np.divide(tp, predicted, out=np.ones_like(tp), where=predicted > 0)
    recall_gain = np.diff(np.concatenate(([0.0], tp / tp[-1])))
    return float(np.sum(recall_gain * precision))


def ece_from_counts(right: np.ndarray, total: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error over ``bins`` groups of consecutive levels (boundaries at
    ``round(linspace(0, 65536, bins + 1))``, as the toolkit groups them): per group, |mean
    confidence - accuracy| weighted by its share of the pixels; empty groups skipped."""
    total = np.asarray(total, np.float64)
    if total.sum() == 0:
        return NAN
    edges = np.round(np.linspace(0, total.size, bins + 1)).astype(np.int64)
    weighted = total * level_values()[: total.size]
    n = np.add.reduceat(total, edges[:-1])
    conf = np.add.reduceat(weighted, edges[:-1])
    hits = np.add.reduceat(np.asarray(right, np.float64), edges[:-1])
    full = n > 0
    gap = np.abs(conf[full] / n[full] - hits[full] / n[full])
    return float(np.sum(gap * n[full]) / n.sum())


def miou(confusion: np.ndarray) -> float:
    """Mean IoU over the classes present in labels or predictions (others are NaN, skipped)."""
    confusion = np.asarray(confusion, np.float64)
    inter = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = inter / union
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else NAN


def hmean(values) -> float:
    """Harmonic mean of values in [0, 1]; 0 when one is 0; NaN when there is none or one is
    NaN."""
    values = [float(v) for v in values]
    if not values or any(math.isnan(v) for v in values):
        return NAN
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def summary(metrics: dict) -> dict:
    """The harmonic means of one subset: ``semantic_hmean`` over the semantic metrics,
    ``ood_hmean`` over the OOD ones (ECE and FPR95 entering as 1 - value), ``hmean`` over all
    of them and ``bravo_index`` = hmean(semantic_hmean, ood_hmean), each when its inputs exist."""
    def terms(keys):
        return [1.0 - metrics[k] if k in LOWER_IS_BETTER else metrics[k]
                for k in keys if metrics.get(k) is not None]
    out = {}
    sem, ood = terms(SEMANTIC), terms(OOD)
    if sem:
        out["semantic_hmean"] = hmean(sem)
    if ood:
        out["ood_hmean"] = hmean(ood)
    if sem or ood:
        out["hmean"] = hmean(sem + ood)
    if sem and ood:
        out["bravo_index"] = hmean([out["semantic_hmean"], out["ood_hmean"]])
    return out


def metrics_from_counts(right, wrong, invalid, confusion=None, semantic: bool = True) -> dict:
    """Every BRAVO metric from per-level counts of valid right, valid wrong and invalid pixels
    (and the valid pixels' confusion matrix for mIoU): semantic ones when ``semantic`` and a
    valid pixel exists, OOD ones when an invalid pixel does (every valid pixel a negative),
    then ``summary``."""
    right, wrong, invalid = (np.asarray(c, np.float64) for c in (right, wrong, invalid))
    out = {}
    if semantic and right.sum() + wrong.sum() > 0:
        auroc, tpr, fpr = roc_curve(right, wrong)
        out.update({"miou_valid": NAN if confusion is None else miou(confusion),
                    "ece_valid": ece_from_counts(right, right + wrong),
                    "auroc_valid": auroc,
                    "auprc_success_valid": average_precision(right, wrong),
                    # error is the positive class, ranked by 1 - confidence: reversed levels
                    "auprc_error_valid": average_precision(wrong[::-1], right[::-1]),
                    "fpr95_valid": fpr_at_tpr(tpr, fpr)})
    if invalid.sum() > 0:
        doubt_pos, doubt_neg = invalid[::-1], (right + wrong)[::-1]
        auroc, tpr, fpr = roc_curve(doubt_pos, doubt_neg)
        out.update({"auroc_ood": auroc, "auprc_ood": average_precision(doubt_pos, doubt_neg),
                    "fpr95_ood": fpr_at_tpr(tpr, fpr)})
    out.update(summary(out))
    return out


class ValidConfusion:
    """The confusion matrix of the valid pixels (BRAVO's mIoU), on the device; summed across
    DDP ranks. It does not depend on the uncertainty method: an evaluation counts it once and
    gives it to every method's ``BravoMeter``."""

    def __init__(self, nclass: int):
        self.nclass = nclass
        self.counts = None

    def update(self, pred, labels, valid) -> None:
        """Count one batch's valid pixels whose prediction and label are classes."""
        if self.counts is None:
            self.counts = torch.zeros(self.nclass ** 2, dtype=torch.int64, device=pred.device)
        classed = valid & (pred >= 0) & (pred < self.nclass) & (labels >= 0) & \
            (labels < self.nclass)  # none without class labels
        cells = labels[classed] * self.nclass + pred[classed]
        self.counts += torch.bincount(cells, minlength=self.nclass ** 2)

    def all_reduce(self):
        """Sum the counts over the default process group; a no-op without one."""
        if in_process_group():
            if self.counts is None:
                self.counts = torch.zeros(self.nclass ** 2, dtype=torch.int64,
                                          device=dist_device())
            dist.all_reduce(self.counts, op=dist.ReduceOp.SUM)
        return self

    def matrix(self) -> np.ndarray | None:
        """nclass × nclass counts (None before any update)."""
        return None if self.counts is None else \
            self.counts.cpu().numpy().reshape(self.nclass, self.nclass)


class BravoMeter:
    """Per-level counts of valid right, valid wrong and invalid pixels (3 × 65536 int64) on
    the device, summed across DDP ranks, and the valid pixels' confusion (``confusion``: a
    ``ValidConfusion`` counted by the caller, shared by several meters; None: its own)."""

    def __init__(self, nclass: int, confusion: ValidConfusion | None = None):
        self.nclass = nclass
        self.counts = None
        self.own = confusion is None
        self.confusion = ValidConfusion(nclass) if confusion is None else confusion

    def update(self, conf, pred, labels, valid, invalid):
        """Count one batch: ``conf`` confidences in [0, 1], ``pred``/``labels`` classes (compared
        on valid pixels only), ``valid``/``invalid`` boolean masks (void pixels in neither)."""
        if self.counts is None:
            self.counts = torch.zeros(3, LEVELS, dtype=torch.int64, device=conf.device)
        levels = quantise(conf)
        valid = valid & (pred >= 0) & (pred < self.nclass)
        right = valid & (pred == labels)
        for row, mask in enumerate((right, valid & ~right, invalid & ~valid)):
            self.counts[row] += torch.bincount(levels[mask], minlength=LEVELS)
        if self.own:
            self.confusion.update(pred, labels, valid)

    def all_reduce(self):
        """Sum the counts (and an own confusion) over the default process group; a no-op
        without one."""
        if not in_process_group():
            return self
        if self.counts is None:
            self.counts = torch.zeros(3, LEVELS, dtype=torch.int64, device=dist_device())
        dist.all_reduce(self.counts, op=dist.ReduceOp.SUM)
        if self.own:
            self.confusion.all_reduce()
        return self

    def compute(self, with_classes: bool = True) -> dict:
        """``metrics_from_counts`` of the pixels seen; without classes (no class ground truth)
        the OOD metrics only."""
        if self.counts is None:
            return {}
        right, wrong, invalid = self.counts.cpu().numpy()
        return metrics_from_counts(right, wrong, invalid, self.confusion.matrix(),
                                   semantic=with_classes)
