"""Training-set statistics of a frozen SegNet for the post-hoc methods ``sml`` and
``mahalanobis`` (``main.py --fit_stats``), saved next to the SegNet as ``<stem>.stats.pth``.

- ``sml`` (Standardized Max Logit, Jung et al. 2021): per class c, the mean and standard
  deviation (population, ddof 0) of the max logit over the training pixels *predicted* as c.
- ``mahalanobis`` (Lee et al. 2018): per class c, the mean of the penultimate map (the last
  ``return_feat=True`` map before the logits, bilinearly resized to the logits' size) over the
  training pixels *labelled* c, and one covariance tied across classes, with its inverse.

Everything is accumulated per batch in float64 (sums, sums of squares, outer-product sums):
no pixel is kept.
"""
import warnings
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import torch
from tqdm import tqdm

from obsnet.errors import ObsnetWarning
from obsnet.models.blocks import resize
from obsnet.models.checkpoint import (FINGERPRINT_KEY, CheckpointError, check_same_segmenter,
                                     load_checkpoint, recorded_fingerprint, save_checkpoint,
                                     weights_fingerprint)

RIDGE = 1e-6  # added to the covariance: RIDGE * trace / D * identity
MIN_STD = 1e-6  # floor of a class's max-logit standard deviation
CHUNK = 65536  # pixels per float64 outer-product block


@dataclass
class ClassStats:
    """Per-class statistics of one SegNet (float64, CPU)."""

    nclass: int
    feat_dim: int
    logit_mean: torch.Tensor  # C: mean max logit of the pixels predicted as c
    logit_std: torch.Tensor  # C: its standard deviation (floored at MIN_STD)
    feat_mean: torch.Tensor  # C×D: mean penultimate feature of the pixels labelled c
    feat_present: torch.Tensor  # C bool: the class had labelled pixels (others are left out)
    covariance: torch.Tensor  # D×D tied covariance (ridge included)
    precision: torch.Tensor  # D×D its inverse
    predicted_counts: torch.Tensor  # C int64
    label_counts: torch.Tensor  # C int64
    # the fingerprint of the segmenter's weights (obsnet.models.checkpoint.weights_fingerprint);
    # None in files of earlier versions
    segmenter: str | None = None

    @cached_property
    def whitening(self) -> torch.Tensor:
        """L with ``precision`` = L Lᵀ (Cholesky, float64): ||Lᵀ(x - mu)||² is the squared
        Mahalanobis distance. Computed once per loaded file, not per batch."""
        return torch.linalg.cholesky(self.precision)

    def state(self) -> dict:
        """A dict of tensors, ints and a string (loadable with ``weights_only=True``)."""
        state = {"kind": "obsnet-class-stats",
                 **{k: getattr(self, k) for k in self.__dataclass_fields__ if k != "segmenter"}}
        return state | ({FINGERPRINT_KEY: self.segmenter} if self.segmenter else {})

    @classmethod
    def from_state(cls, state, where: str) -> "ClassStats":
        """The statistics of a loaded file, each entry checked (a CheckpointError names the
        file and the entry)."""
        if not isinstance(state, dict) or state.get("kind") != "obsnet-class-stats":
            raise CheckpointError(f"{where}: not a statistics file written by --fit_stats")
        fields = [k for k in cls.__dataclass_fields__ if k != "segmenter"]
        missing = [k for k in fields if k not in state]
        if missing:
            raise CheckpointError(f"{where}: statistics file without {missing[0]}")
        bad = _invalid_entry(state)
        if bad is not None:
            raise CheckpointError(f"{where}: statistics file with an invalid {bad}")
        return cls(**{k: state[k] for k in fields}, segmenter=recorded_fingerprint(state, where))


def _invalid_entry(state: dict) -> str | None:
    """The first entry of a statistics file that is not what ``ClassStats`` holds, or None."""
    c, d = state["nclass"], state["feat_dim"]
    for key, value in (("nclass", c), ("feat_dim", d)):
        if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            return key
    shapes = {"logit_mean": (c,), "logit_std": (c,), "feat_mean": (c, d), "feat_present": (c,),
              "covariance": (d, d), "precision": (d, d), "predicted_counts": (c,),
              "label_counts": (c,)}
    for key, shape in shapes.items():
        if not (torch.is_tensor(state[key]) and tuple(state[key].shape) == shape):
            return key
    return None


FITTED_METHODS = ("sml", "sml_post", "mahalanobis")  # the methods reading these statistics


def stats_path(segnet_file) -> Path:
    """``ckpt/segnet.pth`` -> ``ckpt/segnet.stats.pth``."""
    path = Path(segnet_file)
    return path.with_name(f"{path.stem}.stats.pth")


def penultimate(feats: list, size) -> torch.Tensor:
    """The map before the logits in a ``return_feat=True`` list, resized to ``size`` (float)."""
    if len(feats) < 2:
        raise ValueError("the segmenter returns no map before its logits (return_feat=True)")
    return resize(feats[-2].float(), size)


class _Accumulator:
    """Streaming sums of one fitting pass."""

    def __init__(self, nclass: int):
        self.nclass = nclass
        # every sum stays on the SegNet's device (no per-batch copy to the host); made at the
        # first batch, when the device and the feature dimension are known
        self.n_pred = self.s_pred = self.ss_pred = self.n_label = None  # C
        self.s_feat = None  # C×D
        self.outer = None  # D×D

    def _start(self, device, d: int) -> None:
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)  # noqa: E731
        c = self.nclass
        self.n_pred, self.s_pred, self.ss_pred, self.n_label = (zeros(c) for _ in range(4))
        self.s_feat, self.outer = zeros(c, d), zeros(d, d)

    def add(self, logits: torch.Tensor, feats: torch.Tensor, labels: torch.Tensor,
            ignore_id) -> None:
        c, d = self.nclass, feats.shape[1]
        if self.s_feat is None:
            self._start(feats.device, d)
        top, pred = logits.float().max(dim=1)
        top, pred = top.reshape(-1).double(), pred.reshape(-1)
        self.n_pred += torch.bincount(pred, minlength=c)[:c].double()
        self.s_pred += torch.bincount(pred, weights=top, minlength=c)[:c]
        self.ss_pred += torch.bincount(pred, weights=top * top, minlength=c)[:c]
        labels = labels.reshape(-1).to(feats.device)
        valid = (labels >= 0) & (labels < c)
        if ignore_id is not None:
            valid &= labels != ignore_id
        x = feats.permute(0, 2, 3, 1).reshape(-1, d)[valid]
        y = labels[valid].long()
        self.n_label += torch.bincount(y, minlength=c)[:c].double()
        for start in range(0, len(x), CHUNK):
            xc = x[start:start + CHUNK].double()
            self.s_feat.index_add_(0, y[start:start + CHUNK], xc)
            self.outer += xc.T @ xc

    def finish(self, feat_dim: int) -> ClassStats:
        c = self.nclass
        if self.s_feat is None or self.n_label.sum() == 0:
            raise ValueError("--fit_stats: no labelled training pixel (every label ignored)")
        for name in ("n_pred", "s_pred", "ss_pred", "n_label", "s_feat", "outer"):
            setattr(self, name, getattr(self, name).cpu())
        s_feat, outer = self.s_feat, self.outer
        seen = self.n_pred > 0
        mean = torch.where(seen, self.s_pred / self.n_pred.clamp_min(1), torch.zeros(c, dtype=torch.float64))
        var = (self.ss_pred / self.n_pred.clamp_min(1) - mean ** 2).clamp_min(0)
        std = torch.where(seen, var.sqrt().clamp_min(MIN_STD), torch.ones(c, dtype=torch.float64))
        never = [str(i) for i in range(c) if not seen[i]]
        if never:
            warnings.warn(f"--fit_stats: class(es) {', '.join(never)} never predicted on the "
                          f"training split: sml uses mean 0, std 1 for them", ObsnetWarning)
        present = self.n_label > 0
        feat_mean = s_feat / self.n_label.clamp_min(1)[:, None]
        missing = [str(i) for i in range(c) if not present[i]]
        if missing:
            warnings.warn(f"--fit_stats: class(es) {', '.join(missing)} have no labelled "
                          f"training pixel: mahalanobis leaves them out", ObsnetWarning)
        n = self.n_label.sum()
        cov = (outer - (feat_mean.T * self.n_label) @ feat_mean) / n
        cov = (cov + cov.T) / 2
        cov += RIDGE * max(cov.trace().item(), 1e-12) / feat_dim * torch.eye(feat_dim, dtype=torch.float64)
        return ClassStats(nclass=c, feat_dim=feat_dim, logit_mean=mean, logit_std=std,
                          feat_mean=feat_mean, feat_present=present, covariance=cov,
                          precision=torch.linalg.inv(cov), predicted_counts=self.n_pred.long(),
                          label_counts=self.n_label.long())


@torch.no_grad()
def fit_class_stats(segnet, loader, nclass: int, device, ignore_id=None,
                    progress: bool = False) -> ClassStats:
    """One pass of the frozen ``segnet`` (eval mode) over ``loader`` (images, labels); the
    statistics record the fingerprint of its weights (``segmenter``)."""
    acc, feat_dim = _Accumulator(nclass), None
    for batch in tqdm(loader, desc="Fit stats", leave=False, disable=not progress):
        images, labels = batch[0].to(device), batch[1].to(device)
        feats = segnet(images, return_feat=True)
        logits = feats[-1]
        if logits.shape[1] != nclass:
            raise ValueError(f"--fit_stats: the SegNet predicts {logits.shape[1]} classes, not {nclass}")
        x = penultimate(feats, logits.shape[-2:])
        feat_dim = x.shape[1]
        acc.add(logits, x, labels, ignore_id)
    if feat_dim is None:
        raise ValueError("--fit_stats: the training split is empty")
    return replace(acc.finish(feat_dim), segmenter=weights_fingerprint(segnet))


def save_stats(stats: ClassStats, path) -> None:
    """Write ``stats`` atomically to ``path``."""
    save_checkpoint(path, stats.state(), "--fit_stats")


def load_stats(path, nclass: int | None = None, method: str = "sml",
               segmenter: tuple[str, str] | None = None) -> ClassStats:
    """The statistics at ``path``; a one-line error when missing, for another class count, or
    fitted on another segmenter than ``segmenter`` (its weights fingerprint, how messages name
    its file); a file of an earlier version records no segmenter and is accepted."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"--test_multi {method}: {path} not found; run main.py --fit_stats "
                              f"with this --segnet_file first")
    stats = ClassStats.from_state(load_checkpoint(path, "--test_multi " + method), str(path))
    if segmenter is not None:
        check_same_segmenter(stats.segmenter, segmenter[0], f"--test_multi {method}: {path}",
                             segmenter[1], "run main.py --fit_stats --overwrite with this "
                             "--segnet_file (after --train_segnet --overwrite too)")
    if nclass is not None and stats.nclass != nclass:
        raise CheckpointError(f"{path}: fitted for {stats.nclass} classes, this run has {nclass}; "
                              f"run --fit_stats --overwrite again")
    return stats


def toy_class_stats(nclass: int, feat_dim: int, seed: int = 0) -> ClassStats:
    """Valid statistics drawn at random (for tests and examples): no fitting pass needed."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(feat_dim, feat_dim, generator=g, dtype=torch.float64)
    cov = a @ a.T / feat_dim + torch.eye(feat_dim, dtype=torch.float64)
    counts = torch.full((nclass,), 100, dtype=torch.int64)
    return ClassStats(nclass=nclass, feat_dim=feat_dim,
                      logit_mean=torch.randn(nclass, generator=g, dtype=torch.float64),
                      logit_std=torch.rand(nclass, generator=g, dtype=torch.float64) + 0.5,
                      feat_mean=torch.randn(nclass, feat_dim, generator=g, dtype=torch.float64),
                      feat_present=torch.ones(nclass, dtype=torch.bool), covariance=cov,
                      precision=torch.linalg.inv(cov), predicted_counts=counts, label_counts=counts)
