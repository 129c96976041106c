"""Peak memory of an evaluation pass as the number of pixels grows: it must stay flat.

    python -m benchmarks.eval_memory --pixels 1000000 10000000 50000000 200000000

Runs the real ``evaluation.evaluate`` (label masks, confusion matrix, every method's two
streaming meters, timing, preview) on generated CamVid logits and labels. A stand-in SegNet
returns its input as the logits, so that only the evaluation itself is measured; the methods
are those computed from the logits alone.
"""
import argparse
import time

import torch

from benchmarks.common import MB, PeakRSS
from obsnet.data.specs import SPECS
from obsnet.evaluate import evaluate
from obsnet.methods import MethodConfig

METHODS = ("mcp", "temp_scale", "entropy", "max_logit", "energy", "void")
BATCH_SHAPE = (1, 500, 500)  # 250,000 pixels per batch: 1 M pixels is 4 batches


class LogitsAsSegNet(torch.nn.Module):
    """Stands in for the SegNet: its input already is the logits."""

    def forward(self, x, return_feat: bool = False, mc_drop: bool = False):
        return [x] if return_feat else x


def generated_batches(n_batches: int, nclass: int, seed: int = 0):
    """A few (logits, labels) batches of BATCH_SHAPE; labels include the anomaly id nclass."""
    gen = torch.Generator().manual_seed(seed)
    b, h, w = BATCH_SHAPE
    return [(torch.randn(b, nclass, h, w, generator=gen) * 3,
             torch.randint(0, nclass + 1, (b, h, w), generator=gen)) for _ in range(n_batches)]


def cycled(batches, count: int):
    """``count`` batches taken in turn from ``batches`` (a loader that re-reads a small pool)."""
    for i in range(count):
        yield batches[i % len(batches)]


def run(pixel_counts=(1_000_000, 10_000_000, 50_000_000, 200_000_000)) -> list[dict]:
    """Peak RSS and time of one evaluation pass per total pixel count, smallest first."""
    spec = SPECS["CamVid"]
    batches = generated_batches(2, spec.nclass)
    per_batch = BATCH_SHAPE[0] * BATCH_SHAPE[1] * BATCH_SHAPE[2]
    cfg = MethodConfig(void_class=spec.void_logit, mean=spec.mean, std=spec.std)
    rows = []
    for pixels in sorted(pixel_counts):
        loader = cycled(batches, max(1, round(pixels / per_batch)))
        start = time.perf_counter()
        with PeakRSS() as mem:
            evaluate(LogitsAsSegNet(), None, loader, list(METHODS), spec, torch.device("cpu"),
                     cfg, spec.nclass, "generated", progress=False)
        rows.append({"pixels": pixels, "methods": len(METHODS), "peak_rss_mb": mem.peak / MB,
                     "seconds": time.perf_counter() - start})
    for row in rows:
        row["growth_mb"] = row["peak_rss_mb"] - rows[0]["peak_rss_mb"]
    return rows


def main() -> None:
    """Print one line per pixel count."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pixels", type=int, nargs="+",
                   default=[1_000_000, 10_000_000, 50_000_000, 200_000_000])
    args = p.parse_args()
    for r in run(args.pixels):
        print(f"{r['pixels']:>12,} pixels, {r['methods']} methods: peak RSS {r['peak_rss_mb']:.0f} MB "
              f"(+{r['growth_mb']:.0f} MB over the smallest), {r['seconds']:.1f} s")


if __name__ == "__main__":
    main()
