"""An independent, pixel-by-pixel rewrite of the BRAVO toolkit's metrics from its README and
``bravo_toolkit/eval`` (no histogram): the tests' reference for ``obsnet.metrics.bravo``."""
import numpy as np
from scipy import stats
from sklearn.metrics import average_precision_score

LEVELS = 65536


def auroc(pos_levels, neg_levels):
    """P(positive ranks above negative), ties counted one half (Mann-Whitney)."""
    pos, neg = np.asarray(pos_levels)[:, None], np.asarray(neg_levels)[None, :]
    return float(((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (pos.size * neg.size))


def fpr95(pos_levels, neg_levels):
    """FPR at the highest threshold t (``score >= t`` accepted) where TPR reaches 0.95."""
    pos, neg = np.asarray(pos_levels), np.asarray(neg_levels)
    for t in sorted(set(pos.tolist()) | set(neg.tolist()), reverse=True):
        if (pos >= t).sum() / pos.size >= 0.95:
            return float((neg >= t).sum() / neg.size)
    return 1.0


def aupr(pos_levels, neg_levels):
    """Average precision of the positives (scikit-learn's step sum)."""
    y = np.r_[np.ones(len(pos_levels)), np.zeros(len(neg_levels))]
    return float(average_precision_score(y, np.r_[pos_levels, neg_levels]))


def ece(levels, right, bins=15):
    """15 groups of consecutive levels split at round(linspace(0, 65536, 16)); confidence of a
    level = its midpoint."""
    levels, right = np.asarray(levels), np.asarray(right, bool)
    edges = np.round(np.linspace(0, LEVELS, bins + 1))
    conf = (levels + 0.5) / LEVELS
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (levels >= lo) & (levels < hi)
        if sel.any():
            total += sel.sum() * abs(conf[sel].mean() - right[sel].mean())
    return total / levels.size


def miou(labels, pred, nclass):
    """Mean IoU over classes present in labels or predictions."""
    ious = []
    for c in range(nclass):
        inter = ((labels == c) & (pred == c)).sum()
        union = ((labels == c) | (pred == c)).sum()
        if union:
            ious.append(inter / union)
    return float(np.mean(ious))


def all_metrics(levels, pred, labels, valid, invalid, nclass):
    """Every metric of one subset from flat per-pixel arrays (void pixels in neither mask)."""
    lv, right = levels[valid], (pred == labels)[valid]
    out = {"miou_valid": miou(labels[valid], pred[valid], nclass),
           "ece_valid": ece(lv, right),
           "auroc_valid": auroc(lv[right], lv[~right]),
           "auprc_success_valid": aupr(lv[right], lv[~right]),
           "auprc_error_valid": aupr(-lv[~right], -lv[right]),
           "fpr95_valid": fpr95(lv[right], lv[~right])}
    if invalid.any():
        doubt = LEVELS - 1 - levels
        out.update({"auroc_ood": auroc(doubt[invalid], doubt[valid]),
                    "auprc_ood": aupr(doubt[invalid], doubt[valid]),
                    "fpr95_ood": fpr95(doubt[invalid], doubt[valid])})
    flip = {"ece_valid", "fpr95_valid", "fpr95_ood"}
    terms = {k: 1 - v if k in flip else v for k, v in out.items()}
    sem = [v for k, v in terms.items() if k.endswith("_valid")]
    ood = [v for k, v in terms.items() if k.endswith("_ood")]
    out["semantic_hmean"] = float(stats.hmean(sem))
    if ood:
        out["ood_hmean"] = float(stats.hmean(ood))
        out["bravo_index"] = float(stats.hmean([out["semantic_hmean"], out["ood_hmean"]]))
    out["hmean"] = float(stats.hmean(sem + ood))
    return out
