"""``ConfusionMeter``: a segmentation confusion matrix accumulated on the device (mIoU,
per-class IoU, pixel accuracy)."""
import numpy as np
import torch
import torch.distributed as dist

from obsnet.distributed import in_process_group
from obsnet.metrics.common import NAN, dist_device


class ConfusionMeter:
    """Segmentation confusion matrix (rows = label, columns = prediction) on device.

    Pixels whose label is outside [0, nclass) or in ``ignore_ids`` are skipped.
    """

    def __init__(self, nclass: int, ignore_ids=(), device=None):
        self.nclass = nclass
        self.ignore_ids = tuple(int(i) for i in ignore_ids)
        self.device = None if device is None else torch.device(device)
        self.reset()

    def reset(self):
        """Forget every pixel seen."""
        self.mat = None

    def _init_state(self, device):
        self.device = torch.device(device)
        self.mat = torch.zeros(self.nclass, self.nclass, dtype=torch.int64, device=self.device)
        self._keep = torch.ones(self.nclass, dtype=torch.bool, device=self.device)
        for i in self.ignore_ids:
            if 0 <= i < self.nclass:
                self._keep[i] = False

    def update(self, pred, label):
        """Count int64 ``pred``/``label`` tensors of one shape.

        Raises ``ValueError`` if a counted pixel's prediction is outside [0, nclass).
        """
        if pred.shape != label.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and label {tuple(label.shape)} differ")
        if self.mat is None:
            self._init_state(label.device if self.device is None else self.device)
        n = self.nclass
        pred = pred.to(self.device, torch.int64).flatten()
        label = label.to(self.device, torch.int64).flatten()
        in_range = (label >= 0) & (label < n)
        valid = in_range & self._keep[label.clamp(0, n - 1)]
        if ((pred < 0) | (pred >= n)).logical_and(valid).any():
            raise ValueError(f"ConfusionMeter.update: predictions outside [0, {n})")
        key = torch.where(valid, label * n + pred, n * n)
        self.mat += torch.bincount(key, minlength=n * n + 1)[:-1].view(n, n)

    def merge(self, other: "ConfusionMeter"):
        """Add the counts of ``other`` (same ``nclass``) to this meter."""
        if other.nclass != self.nclass:
            raise ValueError("cannot merge meters with different nclass")
        if other.mat is None:
            return self
        if self.mat is None:
            self._init_state(other.device if self.device is None else self.device)
        self.mat += other.mat.to(self.device)
        return self

    def all_reduce(self):
        """Sum the matrix over the default process group; a no-op without one."""
        if not in_process_group():
            return self
        if self.mat is None:
            self._init_state(dist_device() if self.device is None else self.device)
        dist.all_reduce(self.mat, op=dist.ReduceOp.SUM)
        return self

    def compute(self) -> dict:
        """``miou``, ``pixel_acc`` (floats) and per-class ``iou`` (list of floats).

        A class absent from both predictions and labels has IoU NaN, and so does
        every class in ``ignore_ids``; ``miou`` is the mean over the non-NaN
        IoUs of the other classes (NaN if none). ``pixel_acc`` is NaN when no
        pixel was counted.
        """
        if self.mat is None:
            mat = np.zeros((self.nclass, self.nclass))
        else:
            mat = self.mat.cpu().numpy().astype(np.float64)
        tp = np.diag(mat)
        union = mat.sum(0) + mat.sum(1) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = np.where(union > 0, tp / union, NAN)
        for i in self.ignore_ids:
            if 0 <= i < self.nclass:
                iou[i] = NAN
        defined = iou[~np.isnan(iou)]
        total = mat.sum()
        return {"miou": float(defined.mean()) if defined.size else NAN,
                "pixel_acc": float(tp.sum() / total) if total > 0 else NAN,
                "iou": [float(v) for v in iou]}
