"""scikit-learn's AUROC, average precisions and FPR at 95 % TPR, and the checks of a meter's
results against them."""
import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

TOL = 1e-4

TOL_FPR = 1e-3


def _fpr95(y, s):
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    return fpr[np.argmax(tpr >= 0.95)]


def _reference(y, s):
    """sklearn's values on numpy bool labels and float32 scores."""
    s = np.nan_to_num(s)  # sklearn rejects +-inf; float32 max/min keep the order
    return {"auroc": roc_auc_score(y, s), "ap": average_precision_score(y, s),
            "ap_neg": average_precision_score(~y, -s), "fpr95": _fpr95(y, s),
            "fpr95_neg": _fpr95(~y, -s)}


def _assert_matches(res, y, s, tol=TOL, tol_fpr=TOL_FPR):
    ref = _reference(y, s)
    for key in ("auroc", "ap", "ap_neg"):
        assert res[key] == pytest.approx(ref[key], abs=tol), key
    for key in ("fpr95", "fpr95_neg"):
        assert res[key] == pytest.approx(ref[key], abs=tol_fpr), key
    assert res["n_pos"] == int(y.sum()) and res["n_neg"] == int((~y).sum())


def _feed(meter, y, s, chunks, **extra):
    for yc, sc, *rest in zip(np.array_split(y, chunks), np.array_split(s, chunks),
                             *(np.array_split(v, chunks) for v in extra.values())):
        kwargs = {k: torch.from_numpy(v) for k, v in zip(extra, rest)}
        meter.update(torch.from_numpy(sc), torch.from_numpy(yc), **kwargs)
    return meter.compute()
