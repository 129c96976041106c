"""anomaly-seg's per-image OOD protocol: each image's exact AUROC, AP and FPR95, averaged over
the images that hold both anomaly and other pixels."""
import numpy as np
import torch
import torch.distributed as dist

from obsnet.distributed import in_process_group
from obsnet.metrics.common import NAN, dist_device


def anomaly_seg_fpr95(tp: np.ndarray, fp: np.ndarray) -> float:
    """FPR at 95% recall as anomaly-seg's ``fpr_and_fdr_at_recall``: cumulative counts at each
    distinct threshold from the highest score down; among the thresholds up to the first that
    reaches full recall (plus a closing point of recall 1 and no false positive), the one
    whose recall is *closest* to 0.95, the lowest threshold on a tie."""
    n_pos, n_neg = tp[-1], fp[-1]
    last = int(np.searchsorted(tp, n_pos))  # first threshold with every positive found
    recall = np.r_[tp[last::-1] / n_pos, 1.0]
    false_pos = np.r_[fp[last::-1], 0.0]
    return float(false_pos[np.argmin(np.abs(recall - 0.95))] / n_neg)


def image_measures(scores: np.ndarray, positive: np.ndarray):
    """Exact (AUROC, AP, anomaly-seg's FPR95) of one image's pixels by one sort, as
    anomaly-seg computes them (scikit-learn's AUROC and AP); None without both classes."""
    if scores.size == 0:
        return None
    order = np.argsort(-scores, kind="stable")
    ranked, y = scores[order], positive[order].astype(np.float64)
    ends = np.r_[np.flatnonzero(ranked[1:] != ranked[:-1]), len(ranked) - 1]  # tie blocks
    tp = np.cumsum(y)[ends]
    fp = (ends + 1) - tp
    if tp[-1] == 0 or fp[-1] == 0:
        return None
    tp_prev, fp_prev = np.r_[0.0, tp[:-1]], np.r_[0.0, fp[:-1]]
    auroc = float(np.sum((fp - fp_prev) * (tp + tp_prev)) / (2 * tp[-1] * fp[-1]))
    ap = float(np.sum((tp - tp_prev) * tp / (tp + fp)) / tp[-1])
    return auroc, ap, anomaly_seg_fpr95(tp, fp)


class PerImageMeter:
    """anomaly-seg's OOD protocol: AUROC, AUPR and FPR95 of each image, averaged over the
    images that hold both anomaly and other pixels (the others are skipped, as there).

    ``update`` takes one batch of B images; the sums live in a float64 tensor on the batch's
    device, so ``merge`` and ``all_reduce`` add them up as for the other meters.
    """

    def __init__(self):
        self.sums = None  # auroc, aupr, fpr95, images counted, images skipped

    def update(self, scores, is_positive, valid=None):
        """Add the B images of B×H×W ``scores`` (positives: ``is_positive``; only the pixels
        with ``valid`` True count)."""
        if self.sums is None:
            self.sums = torch.zeros(5, dtype=torch.float64, device=scores.device)
        s = scores.detach().float().cpu().numpy()
        y = is_positive.cpu().numpy()
        keep = np.ones_like(y) if valid is None else valid.cpu().numpy()
        add = np.zeros(5)
        for image in range(s.shape[0]):
            measures = image_measures(s[image][keep[image]], y[image][keep[image]])
            add += (*measures, 1.0, 0.0) if measures else (0.0, 0.0, 0.0, 0.0, 1.0)
        self.sums += torch.from_numpy(add).to(self.sums.device)

    def merge(self, other: "PerImageMeter"):
        """Add the images of ``other``."""
        if other.sums is None:
            return self
        if self.sums is None:
            self.sums = torch.zeros_like(other.sums)
        self.sums += other.sums.to(self.sums.device)
        return self

    def all_reduce(self):
        """Sum over the default process group; a no-op without one."""
        if in_process_group():
            if self.sums is None:
                self.sums = torch.zeros(5, dtype=torch.float64, device=dist_device())
            dist.all_reduce(self.sums, op=dist.ReduceOp.SUM)
        return self

    def compute(self) -> dict:
        """Means over the counted images (NaN when none), and how many were counted / skipped."""
        auroc, aupr, fpr, n, skipped = (0.0,) * 5 if self.sums is None else self.sums.tolist()
        mean = (lambda v: v / n) if n else (lambda v: NAN)
        return {"auroc": mean(auroc), "aupr": mean(aupr), "fpr95": mean(fpr),
                "n_images": int(n), "n_skipped": int(skipped)}
