"""OODMeter against scikit-learn and against a plain sort-based exact computation.

    python -m benchmarks.metrics --sizes 10000000 40000000 --runs 3

Same random scores for all three, of two kinds: "gaussian" (10% positives shifted by 1.5) and
"narrow" (ODIN-like: 0.9166 + 1e-3 * N(0, 1), positives shifted by 1e-3, a spread far below
the magnitude that coarse relative bins cannot separate). For each: time of AUROC + AP (timed
calls, after a first one that samples the peak memory above the data), that peak, and the
largest difference to scikit-learn.
"""
import argparse
from functools import partial

import numpy as np
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from benchmarks.common import MB, measure
from obsnet.metrics.ood import OODMeter


def sorted_exact(scores: torch.Tensor, positive: torch.Tensor) -> tuple[float, float]:
    """Exact AUROC (ties count 1/2) and AP, by one descending sort: the textbook way.
    Both classes must be present."""
    ordered, order = torch.sort(scores, descending=True)
    tp = positive[order].to(torch.float64).cumsum(0)
    fp = torch.arange(1, len(tp) + 1, dtype=torch.float64, device=tp.device) - tp
    ends = torch.cat([torch.nonzero(ordered[1:] != ordered[:-1]).flatten(),
                      torch.tensor([len(tp) - 1], device=tp.device)])  # each tie block's last index
    tp, fp = tp[ends], fp[ends]
    n_pos, n_neg = tp[-1].item(), fp[-1].item()
    tp_prev = torch.cat([tp.new_zeros(1), tp[:-1]])
    fp_prev = torch.cat([fp.new_zeros(1), fp[:-1]])
    auroc = ((fp - fp_prev) * (tp + tp_prev)).sum().item() / (2 * n_pos * n_neg)
    ap = ((tp - tp_prev) * tp / (tp + fp)).sum().item() / n_pos
    return auroc, ap


def meter_ranking(scores: torch.Tensor, positive: torch.Tensor) -> tuple[float, float]:
    """AUROC and AP from a fresh OODMeter fed all scores at once."""
    meter = OODMeter()
    meter.update(scores, positive)
    out = meter.compute()
    return out["auroc"], out["ap"]


def sklearn_ranking(scores: torch.Tensor, positive: torch.Tensor) -> tuple[float, float]:
    """scikit-learn's roc_auc_score and average_precision_score."""
    y, s = positive.numpy(), scores.numpy()
    return roc_auc_score(y, s), average_precision_score(y, s)


DISTRIBUTIONS = ("gaussian", "narrow")


def scores_and_labels(n: int, seed: int = 0, kind: str = "gaussian"):
    """``n`` float32 scores with 10% positives: Gaussian with positives shifted up by 1.5, or
    "narrow", ODIN-like 0.9166 + 1e-3 * (Gaussian + positive)."""
    gen = torch.Generator().manual_seed(seed)
    positive = torch.rand(n, generator=gen) < 0.1
    if kind == "narrow":
        return 0.9166 + 1e-3 * (torch.randn(n, generator=gen) + positive), positive
    return torch.randn(n, generator=gen) + 1.5 * positive, positive


def run(sizes=(10_000_000, 40_000_000), runs: int = 3, distributions=DISTRIBUTIONS) -> list[dict]:
    """One row per (size, distribution, implementation): time, peak memory, difference to
    scikit-learn."""
    rows = []
    for n, kind in ((n, kind) for n in sizes for kind in distributions):
        scores, positive = scores_and_labels(n, kind=kind)
        results = {}
        for name, fn in (("scikit-learn", sklearn_ranking), ("sort-based exact", sorted_exact),
                         ("OODMeter", meter_ranking)):
            # The first call samples memory (a thread reading /proc every 2 ms, which would
            # take CPU from the timed code) and warms up; the timed calls run without it.
            _, peak, value = measure(partial(fn, scores, positive), 1)
            seconds, _, _ = measure(partial(fn, scores, positive), runs, track_memory=False)
            results[name] = (seconds, peak, np.array(value))
        reference = results["scikit-learn"]
        for name, (seconds, peak, value) in results.items():
            rows.append({"pixels": n, "scores": kind, "method": name, "seconds": seconds,
                         "peak_mb": peak / MB,
                         "speedup_vs_sklearn": reference[0].median / seconds.median,
                         "max_abs_diff": float(np.abs(value - reference[2]).max())})
    return rows


def main() -> None:
    """Print the rows."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000_000, 40_000_000])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--scores", nargs="+", choices=DISTRIBUTIONS, default=list(DISTRIBUTIONS))
    args = p.parse_args()
    for r in run(args.sizes, args.runs, args.scores):
        print(f"{r['pixels']:>11,} {r['scores']:<8} {r['method']:<17} {r['seconds'].text(3)} s, "
              f"peak +{r['peak_mb']:.0f} MB, x{r['speedup_vs_sklearn']:.1f} vs scikit-learn, "
              f"max |diff| {r['max_abs_diff']:.1e}")


if __name__ == "__main__":
    main()
