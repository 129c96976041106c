"""One evaluation pass: the SegNet once per batch, every method, streaming meters."""
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm import tqdm

from obsnet.component_eval import ComponentFrames, benchmark_labels, wants_components
from obsnet.data.native import LabelGrid
from obsnet.data.specs import DatasetSpec
from obsnet.distributed import in_process_group
from obsnet.methods import METHODS, EvalBatch, MethodConfig
from obsnet.metrics.bravo import BravoMeter, ValidConfusion, bravo_confidence
from obsnet.metrics.confusion import ConfusionMeter
from obsnet.metrics.ood import OODMeter
from obsnet.metrics.per_image import PerImageMeter
from obsnet.metrics.risk import COVERAGE_KEYS, ImageCounts
from obsnet.utils import autocast


@dataclass(frozen=True)
class EvalHooks:
    """What an evaluation hands out besides its results, each in loader order:
    ``on_scores(name, maps)``: every method's B×h×w maps at the images' size
    (``--export_scores``, ``--export_bravo``); ``on_pred(pred)``: the B×h×w predicted classes
    (``--export_bravo``); ``on_error(name, scores, error, valid)``: every method's scores at
    the labels' resolution with the error protocol's targets and the pixels it counts
    (``--calibrate``); ``image_counts``: count each image's correct and wrong pixels per score
    bin (``obsnet.metrics.risk.ImageCounts``: the meters' "images", conformal thresholds)."""

    on_scores: Callable | None = None
    on_pred: Callable | None = None
    on_error: Callable | None = None
    image_counts: bool = False


class _Meters:
    """Meters of one method: OOD protocol pooled over the split and per image (anomaly-seg's),
    error protocol, and time."""

    def __init__(self, nclass: int, valid_confusion: ValidConfusion, image_counts: bool = False):
        self.ood, self.error, self.seconds = OODMeter(), OODMeter(), 0.0
        self.ood_image = PerImageMeter()
        # the BRAVO toolkit's metrics (docs/bravo.md); the valid pixels' confusion is shared
        self.bravo = BravoMeter(nclass, valid_confusion)
        self.images = ImageCounts() if image_counts else None  # per image, for conformal


def _label_masks(labels: torch.Tensor, pred: torch.Tensor, spec: DatasetSpec, nclass: int):
    """Error-protocol target/valid, OOD target, pooled OOD valid (void excluded) and per-image
    OOD valid (every pixel but the ignore id: anomaly-seg's negatives include void)."""
    anomaly = torch.isin(labels, torch.tensor(spec.anomaly_ids, device=labels.device))
    labelled = ((labels >= 0) & (labels < nclass)) | anomaly
    image_valid = torch.ones_like(anomaly)
    if spec.ignore_id is not None:
        labelled &= labels != spec.ignore_id
        image_valid = labels != spec.ignore_id
    ood_valid = labelled if spec.void_id is None else labelled & (labels != spec.void_id)
    if spec.inlier_id is not None:  # in-distribution pixels of no known class: OOD negatives
        ood_valid = ood_valid | (labels == spec.inlier_id)
    return pred != labels, labelled, anomaly, ood_valid, image_valid


def _timed(device, fn, *args, **kwargs):
    """Run ``fn(*args, **kwargs)``; return (result, seconds), waiting for the GPU if any."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    sync()
    return out, time.perf_counter() - start


def _score_batch(batch: EvalBatch, names, meters, masks, cfg, forward_seconds, device,
                 grid: LabelGrid, frames=None, hooks: "EvalHooks" = None, classes=None):
    """Run every method on one batch, bring its scores to the labels' resolution (``grid``)
    and feed its meters (and ``frames``, a ``ComponentFrames`` or None) and ``hooks``'
    callbacks (``EvalHooks``); ``classes``: (predicted, label) classes at the labels'
    resolution, for the BRAVO metrics."""
    hooks = hooks or EvalHooks()
    error, err_valid, anomaly, ood_valid, image_valid = masks
    pred, labels = classes
    for name in names:
        method = METHODS[name]
        scores, seconds = _timed(device, method.fn, batch, cfg)
        if torch.isnan(scores).any():
            raise FloatingPointError(f"method '{name}' produced NaN scores")
        if hooks.on_scores is not None:
            hooks.on_scores(name, scores)
        scores = grid.scores(scores)
        m = meters[name]
        m.seconds += seconds + (forward_seconds if method.uses_shared_forward else 0.0)
        probs = None if method.to_prob is None else method.to_prob(scores, cfg)
        m.error.update(scores, error, err_valid, probs=probs)
        if m.images is not None:
            m.images.update(scores, error, err_valid)
        if hooks.on_error is not None:
            hooks.on_error(name, scores, error, err_valid)
        m.ood.update(scores, anomaly, ood_valid)
        if anomaly.any():
            m.ood_image.update(scores, anomaly, image_valid)
        m.bravo.update(bravo_confidence(method, scores, cfg), pred, labels,
                       ood_valid & ~anomaly, ood_valid & anomaly)
        if frames is not None:
            frames.add_scores(name, grid.frames(scores))


@torch.no_grad()
def evaluate(segnet, obsnet, loader, names, spec: DatasetSpec, device, cfg: MethodConfig,
             nclass: int, split: str, amp: bool = False, progress: bool = True, ensemble=(),
             hooks: "EvalHooks" = None):
    """Evaluate the methods ``names`` over ``loader``.

    Returns (results dict, maps of the split's first images, meters by method and protocol).
    ``pixels`` (with a method) counts the pixels scored and the anomaly ones among them.
    ``ood`` and ``error`` pool the pixels of the whole split, ``ood_per_image`` averages over
    the images (anomaly-seg's protocol); meters are summed across DDP ranks. For the
    SegmentMeIfYouCan / Fishyscapes presets each method also gets ``components`` (sIoU, PPV,
    mean F1: ``obsnet/component_eval.py``), from frames kept on the CPU (one process only);
    their loaders give labels at each file's resolution, and every map computed at the
    images' size is resized to it (``obsnet.data.native``).
    ``ensemble``: extra SegNets for the "ensemble" method.
    ``hooks`` (``EvalHooks``): callbacks that get the scores, predictions or error pixels,
    and per-image counts. Each method also gets ``bravo``: the BRAVO toolkit's metrics
    (``obsnet.metrics.bravo``).
    A split whose labels are hidden (``loader.dataset.labelled`` false) scores nothing.
    """
    hooks = hooks or EvalHooks()
    segnet.eval()
    if obsnet is not None:
        obsnet.eval()
    valid_confusion = ValidConfusion(nclass)  # BRAVO's mIoU: one for every method
    meters = {name: _Meters(nclass, valid_confusion, hooks.image_counts) for name in names}
    confusion = ConfusionMeter(nclass, ignore_ids=tuple(i for i in (spec.void_id,) if i is not None))
    n_images, preview = 0, None
    labelled = getattr(getattr(loader, "dataset", None), "labelled", True)
    frames = ComponentFrames(names, spec) if wants_components(spec) and labelled else None
    for loaded in tqdm(loader, desc=f"Eval {split}", leave=False, disable=not progress):
        images, labels, grid = LabelGrid.of_batch(loaded)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast(device, amp):
            feats, forward_seconds = _timed(device, segnet, images, return_feat=True)
            batch = EvalBatch(images, segnet, obsnet, feats, tuple(ensemble))
            pred = feats[-1].argmax(dim=1)
            pred_at_labels = grid.classes(pred)
            confusion.update(pred_at_labels, labels)
            masks = _label_masks(labels, pred_at_labels, spec, nclass)
            valid_confusion.update(pred_at_labels, labels, masks[3] & ~masks[2])
            _score_batch(batch, names, meters, masks, cfg, forward_seconds, device, grid, frames,
                         hooks, (pred_at_labels, labels))
            if hooks.on_pred is not None:
                hooks.on_pred(pred)
            if frames is not None:
                frames.add_labels(grid.frames(benchmark_labels(masks[2], masks[3])))
            if preview is None:
                small = grid.to_size(labels, images.shape[-2:])
                preview = _preview(batch, names, cfg, small, pred, pred != small)
        n_images += len(images)
    valid_confusion.all_reduce()
    results = _results(split, confusion, meters, n_images, spec, device)
    if frames is not None:
        for name, components in frames.compute().items():
            results["methods"][name]["components"] = components
    return results, preview, {n: {"ood": m.ood, "error": m.error, "images": m.images}
                              for n, m in meters.items()}


def _preview(batch, names, cfg, labels, pred, error, count: int = 4):
    """Maps of the first images of the split, for TensorBoard (a fixed set of images)."""
    first = EvalBatch(batch.images[:count], batch.segnet, batch.obsnet,
                      [f[:count] for f in batch.feats], batch.ensemble)
    maps = {name: METHODS[name].fn(first, cfg).float().cpu() for name in names}
    return {"images": first.images.float().cpu(), "labels": labels[:count].cpu(),
            "pred": pred[:count].cpu(), "error": error[:count].float().cpu(), "maps": maps}


def _reduce_time(seconds: float, device) -> float:
    """Total seconds over DDP ranks (each rank timed its own images)."""
    if in_process_group():
        t = torch.tensor([seconds], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return t.item()
    return seconds


def _results(split, confusion, meters, n_images, spec, device):
    """Reduce the meters across ranks and build the results dictionary."""
    confusion.all_reduce()
    seg = confusion.compute()
    n_total = int(_reduce_time(float(n_images), device))
    out = {"split": split, "n_images": n_total,
           "segnet": {"miou": seg["miou"], "pixel_acc": seg["pixel_acc"],
                      "iou": dict(zip(spec.class_names, seg["iou"]))},
           "methods": {}}
    for name, m in meters.items():
        for meter in (m.error, m.ood, m.ood_image, m.bravo):
            meter.all_reduce()
        err, ood = m.error.compute(), m.ood.compute()
        # no class ground truth (spec.inlier_id): error metrics n/a, the tie share is the OOD one
        has_classes = spec.inlier_id is None
        entry = {}
        if has_classes:
            rc = m.error.risk_coverage()
            entry["error"] = {"auroc": err["auroc"], "aupr_error": err["ap"],
                              "aupr_success": err["ap_neg"], "fpr95": err["fpr95_neg"],
                              "ace": err.get("ace"), "ece": err.get("ece"), "aurc": rc["aurc"],
                              "eaurc": rc["eaurc"], **{k: rc[k] for k in COVERAGE_KEYS}}
        entry.update({"ms_per_image": 1000 * _reduce_time(m.seconds, device) / max(n_total, 1),
                      # 0 unless some scores stayed in coarse bins: see OODMeter
                      "auroc_bound": max(err["auroc_bound"] if has_classes else 0.0,
                                         ood["auroc_bound"]),
                      # share of the pixels holding the most common score: a tie that large
                      # caps FPR95
                      "tie_share": (err if has_classes else ood)["tie_share"]})
        if ood["n_pos"] > 0:
            entry["ood"] = {"auroc": ood["auroc"], "aupr": ood["ap"], "fpr95": ood["fpr95"]}
            per_image = m.ood_image.compute()
            entry["ood_per_image"] = {k: per_image[k] for k in ("auroc", "aupr", "fpr95")}
        entry["bravo"] = m.bravo.compute(with_classes=has_classes)
        out["methods"][name] = entry
        # every method scores the same pixels: those a protocol counts, and the anomaly ones
        out["pixels"] = {"scored": max(err["n_pos"] + err["n_neg"], ood["n_pos"] + ood["n_neg"]),
                         "anomaly": ood["n_pos"]}
    return out
