"""Component-level metrics of SegmentMeIfYouCan (SMIYC): sIoU, PPV and mean F1.

These follow the official benchmark code, repository SegmentMeIfYouCan/road-anomaly-benchmark,
``road_anomaly_benchmark/metrics/instance_segmentation.py`` (``default_instancer``,
``segment_metrics``, ``MetricSegment``) and, for the pixel threshold,
``road_anomaly_benchmark/metrics/pixel_classification_curves.py`` (``curves_from_cmats``).

Per frame (score map ``s``, label map ``y``: 0 in-distribution, 1 anomaly, ``void``; threshold ``t``)
--------------------------------------------------------------------------------------------------
1. Prediction: ``s > t`` (strict), set to False on void pixels, *before* any labelling.
2. 8-connected components (3x3 structuring element) of the prediction and of ``y == 1``.
3. Predicted components with fewer than ``min_pred`` pixels are dropped (a component of exactly
   ``min_pred`` pixels stays). The count is taken on the full frame, before step 4.
4. Ground-truth (GT) components with fewer than ``min_gt`` pixels become void. Like the official
   loop, which also visits label 0, the background (every pixel outside GT components, void
   included) becomes void too when it has fewer than ``min_gt`` pixels.
5. Everything below only looks at the region of interest ROI = non-void pixels after step 4. So
   predicted pixels lying on a GT component that became void no longer count (a predicted
   component may shrink, or vanish if it lies wholly there), while predicted components keep the
   identity (connectivity, and size test of step 3) that they had before.
6. For a GT component ``k`` (pixels in ROI): ``P`` = union of the predicted components that touch
   ``k``; ``A`` = pixels of ``P`` on GT components other than ``k``;
   ``sIoU(k) = |k & P| / (|P| + |k| - |k & P| - |A|)`` (0 when nothing touches ``k``).
7. For a predicted component ``c`` (pixels in ROI): ``PPV(c) = |c & G| / |c|``, ``G`` = all GT
   component pixels (that is, the share of ``c`` on the GT components it touches).
   ``sIoU_pred(c)`` is step 6 with the roles of GT and prediction swapped (the official code
   reports it as ``sIoU_pred``; SMIYC's tables show ``sIoU_gt`` and ``PPV``).
Components are listed in scipy's label order (raster order of their first pixel).

Over a split
------------
``sIoU``, ``PPV`` (and ``sIoU_pred``) are means over all components of the split pooled across
frames (sum of values over sum of counts), not means of per-frame means. For each
``tau in numpy.linspace(0.25, 0.75, 11)``: TP = GT components with ``sIoU >= tau``, FN = the other
GT components, FP = predicted components with ``PPV < tau``, each summed over frames;
``F1(tau) = 2 TP / (2 TP + FN + FP)``; ``mean_f1`` is the mean of the 11 values. The taus are
numpy's values, as in the official code: the 8th is 0.6000000000000001, so a component with sIoU
(or PPV) exactly 0.6 fails it.

The pixel threshold is the pixel-F1-optimal one over the split (``MetricSegment`` reads the
``best_f1_threshold`` of the pixel PR curve, computed by ``curves_from_cmats`` as the
``nanargmax`` of ``2 TP / (2 TP + FP + FN)`` along the curve from high to low threshold, where a
curve point counts pixels with ``score >= threshold``): see ``f1_optimal_threshold``.

Departures from the official code, and why
------------------------------------------
- Empty cases: a mean over zero components is NaN (official: NaN too, with a warning), and
  ``F1(tau)`` with ``2 TP + FN + FP == 0`` is NaN, where the official code raises
  ZeroDivisionError.
- A NaN score raises ValueError (official: a NaN pixel is silently never predicted).
- The ROI is ``label != void`` (official: ``label < 255``; the same for uint8 labels).
- ``f1_optimal_threshold`` returns the threshold *of* the maximising curve point. The official
  ``curves_from_cmats`` drops repeated thresholds and may prepend a (0, 0) point to the counts
  but then indexes the unfiltered threshold array with the index found in the filtered one, so
  it can land on a neighbouring bin edge of its 768-percentile-bins-per-frame histogram; that
  off-by-some index is an artefact of its binning we do not reproduce.
- Like the official code, the threshold picked on a ``>=`` curve is then applied with ``>``: a
  pixel scoring exactly ``t`` is not predicted. Pass ``numpy.nextafter(t, -numpy.inf)`` for ``>=``.
- The official harness stores scores as float16; here scores are compared in the dtype given.
"""
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

TAUS = np.linspace(0.25, 0.75, 11)
NAN = float("nan")

SIZE_LIMITS = {
    # (min_pred, min_gt) = (thresh_segsize, thresh_instsize) of MetricSegment's configs in
    # road_anomaly_benchmark/metrics/instance_segmentation.py:
    "RoadAnomaly21": (500, 100),  # 'SegEval-AnomalyTrack'
    "RoadObstacle21": (50, 10),  # 'SegEval-ObstacleTrack'
    # the benchmark README evaluates FishyLAFAnomaly-val with SegEval-AnomalyTrack and
    # LostAndFound-testNoKnown with SegEval-ObstacleTrack:
    "FishyscapesLAF": (500, 100),
    "LostAndFound": (50, 10),
}

_EIGHT = np.ones((3, 3), dtype=bool)


@dataclass
class FrameComponents:
    """Per-component values of one frame, in label order: ``siou`` per GT component, ``ppv``
    and ``siou_pred`` per predicted component (float64 arrays)."""
    siou: np.ndarray
    ppv: np.ndarray
    siou_pred: np.ndarray


def _as_numpy(x, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (H, W), got shape {x.shape}")
    return x


def _instances(score, label, threshold, min_pred, min_gt, void):
    """(GT ids, predicted ids) of the ROI pixels (flat int arrays, 0 = no component),
    following steps 1-5 of the module docstring."""
    pred = (score > threshold) & (label != void)
    gt_ids, _ = ndimage.label(label == 1, structure=_EIGHT)
    pred_ids, _ = ndimage.label(pred, structure=_EIGHT)
    if min_pred:
        small = np.bincount(pred_ids.ravel()) < min_pred
        small[0] = False
        pred_ids[small[pred_ids]] = 0
    roi = label != void
    if min_gt:
        small = np.bincount(gt_ids.ravel()) < min_gt  # entry 0: the background (step 4)
        roi &= ~small[gt_ids]
    return gt_ids[roi], pred_ids[roi]


def _compact(ids: np.ndarray) -> np.ndarray:
    """Renumber ids to 0..n in the same order, 0 kept for 'none', dropping absent ids."""
    present = np.bincount(ids, minlength=1) > 0
    present[0] = True
    return (np.cumsum(present) - 1)[ids]


def _adjusted_iou(table: np.ndarray) -> np.ndarray:
    """sIoU of each row component against the column components of a contingency table
    (row/column 0 = background; ``table[i, j]`` = pixels of row comp i and column comp j)."""
    inner = table[1:, 1:]
    touch = inner > 0
    col_size = table[:, 1:].sum(axis=0)
    col_on_rows = inner.sum(axis=0)  # pixels of each column component on any row component
    own = inner.sum(axis=1)  # |k & P|: touching columns cover exactly the covered pixels of k
    union_cols = touch @ col_size  # |P|
    others = touch @ col_on_rows - own  # |A|
    size = table[1:].sum(axis=1)
    return own / (union_cols + size - own - others)


def component_stats(score, label, threshold: float, min_pred: int = 500, min_gt: int = 100,
                    void: int = 255) -> FrameComponents:
    """sIoU of each GT component and PPV (and sIoU_pred) of each predicted component of one
    frame, as SMIYC's ``default_instancer`` + ``segment_metrics`` (see the module docstring).

    ``score``/``label``: 2-D numpy arrays or torch tensors of one shape; ``min_pred``/``min_gt``:
    smallest kept predicted / GT component in pixels (0 or None keeps all).
    """
    score, label = _as_numpy(score, "score"), _as_numpy(label, "label")
    if score.shape != label.shape:
        raise ValueError(f"score {score.shape} and label {label.shape} differ in shape")
    if np.issubdtype(score.dtype, np.floating) and np.isnan(score).any():
        raise ValueError("score contains NaN")
    gt, pred = _instances(score, label, threshold, min_pred, min_gt, void)
    gt, pred = _compact(gt), _compact(pred)
    n_gt, n_pred = int(gt.max(initial=0)) + 1, int(pred.max(initial=0)) + 1
    table = np.bincount(gt * n_pred + pred, minlength=n_gt * n_pred).reshape(n_gt, n_pred)
    table = table.astype(np.float64)
    pred_size = table[:, 1:].sum(axis=0)
    ppv = table[1:, 1:].sum(axis=0) / pred_size
    return FrameComponents(siou=_adjusted_iou(table), ppv=ppv, siou_pred=_adjusted_iou(table.T))


def f1_per_tau(siou, ppv, taus=TAUS) -> np.ndarray:
    """Component F1 = 2 TP / (2 TP + FN + FP) at each tau (TP: sIoU >= tau, FN: sIoU < tau,
    FP: PPV < tau), from the sIoU / PPV of all components of a split; NaN where undefined."""
    siou, ppv = np.asarray(siou, dtype=np.float64), np.asarray(ppv, dtype=np.float64)
    out = []
    for tau in taus:
        tp = np.count_nonzero(siou >= tau)
        fn = np.count_nonzero(siou < tau)
        fp = np.count_nonzero(ppv < tau)
        denom = 2 * tp + fn + fp
        out.append(2 * tp / denom if denom else NAN)
    return np.array(out, dtype=np.float64)


def f1_optimal_threshold(thresholds, tp, fp, n_pos) -> float:
    """The threshold of the pixel PR curve that maximises pixel F1 = 2PR / (P + R).

    ``thresholds``: descending; ``tp``/``fp``: cumulative counts of positive / negative pixels
    predicted at each (``score >= threshold``), as a streaming meter gives them; ``n_pos``: all
    positive pixels. F1 is taken as ``2 TP / (TP + FP + n_pos)`` (the same value, and 0 rather
    than NaN where TP = 0); on a tie the first point, i.e. the highest threshold, wins, as
    SMIYC's ``nanargmax``. NaN when ``n_pos`` is 0. Note SMIYC then predicts ``score > t``.
    """
    thresholds = np.asarray(thresholds, dtype=np.float64)
    tp, fp = np.asarray(tp, dtype=np.float64), np.asarray(fp, dtype=np.float64)
    if not (thresholds.shape == tp.shape == fp.shape) or thresholds.ndim != 1 or not tp.size:
        raise ValueError("thresholds, tp and fp must be 1-D arrays of one non-zero length")
    if np.any(np.diff(thresholds) > 0):
        raise ValueError("thresholds must be in descending order")
    if n_pos <= 0:
        return NAN
    f1 = 2 * tp / (tp + fp + n_pos)
    return float(thresholds[int(np.argmax(f1))])


class ComponentMeter:
    """Streaming SMIYC component metrics over a split at one pixel threshold.

    ``update(score, label)`` per frame (2-D numpy or torch); ``compute()`` gives Python floats:
    ``siou``, ``ppv``, ``siou_pred`` (pooled means, NaN without components), ``mean_f1``,
    ``f1_per_tau`` (list, one per ``TAUS``), ``threshold``, and ``n_gt``/``n_pred`` (ints).
    """

    def __init__(self, threshold: float, min_pred: int = 500, min_gt: int = 100, void: int = 255):
        self.threshold, self.min_pred, self.min_gt, self.void = threshold, min_pred, min_gt, void
        self.frames = []

    def reset(self):
        """Forget all frames."""
        self.frames = []

    def update(self, score, label) -> FrameComponents:
        """Add one frame; returns its ``FrameComponents``."""
        frame = component_stats(score, label, self.threshold, self.min_pred, self.min_gt,
                                self.void)
        self.frames.append(frame)
        return frame

    def compute(self) -> dict:
        """Split-level metrics (see the class docstring)."""
        def pooled(field):
            values = np.concatenate([np.zeros(0)] + [getattr(f, field) for f in self.frames])
            return values, (float(values.mean()) if values.size else NAN)

        siou, siou_mean = pooled("siou")
        ppv, ppv_mean = pooled("ppv")
        _, siou_pred_mean = pooled("siou_pred")
        f1 = f1_per_tau(siou, ppv)
        return {"siou": siou_mean, "ppv": ppv_mean, "siou_pred": siou_pred_mean,
                "mean_f1": float(f1.mean()), "f1_per_tau": [float(v) for v in f1],
                "threshold": float(self.threshold), "n_gt": int(siou.size),
                "n_pred": int(ppv.size)}
