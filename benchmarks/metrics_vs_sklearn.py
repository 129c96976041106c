"""OODMeter against scikit-learn on N random scores: time and largest difference.

    python -m benchmarks.metrics_vs_sklearn --n 10000000
"""
import argparse
import time

import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from Utils.metrics import OODMeter


def main() -> None:
    """Time OODMeter (update + compute) and scikit-learn's AUROC + AP on the same scores."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000_000, help="number of scores")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    positive = torch.rand(args.n, generator=gen) < 0.1
    scores = torch.randn(args.n, generator=gen) + 1.5 * positive
    start = time.perf_counter()
    meter = OODMeter()
    meter.update(scores, positive)
    ours = meter.compute()
    meter_s = time.perf_counter() - start
    start = time.perf_counter()
    auroc = roc_auc_score(positive.numpy(), scores.numpy())
    ap = average_precision_score(positive.numpy(), scores.numpy())
    sklearn_s = time.perf_counter() - start
    print(f"{args.n} scores: OODMeter {meter_s:.2f} s, scikit-learn {sklearn_s:.2f} s "
          f"({sklearn_s / meter_s:.0f}x); |AUROC diff| {abs(ours['auroc'] - auroc):.1e}, "
          f"|AP diff| {abs(ours['ap'] - ap):.1e}")


if __name__ == "__main__":
    main()
