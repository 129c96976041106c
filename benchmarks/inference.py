"""Inference cost per image: SegNet forward, ObsNet, MCP, MC dropout, an ensemble of 3.

    python -m benchmarks.inference --size 360 480 --width_mult 1.0 --T 50 --runs 3

Every method is timed through its registered function (as ``evaluation.evaluate`` runs it)
on one image at a time. "total" is the time from the image to the method's map, including
the SegNet forward when the method reads it; "added" is what the method costs on top of the
SegNet forward that the segmentation needs anyway.
"""
import argparse
from functools import partial

import torch

from benchmarks.common import repeat
from obsnet.methods import METHODS, EvalBatch, MethodConfig
from obsnet.models.obsnet import Obsnet_Seg
from obsnet.models.segnet import SegNet, freeze
from obsnet.utils import autocast


def networks(width: float, nclass: int, members: int, device):
    """A frozen SegNet, an observer and ``members`` extra SegNets, random weights, eval mode."""
    torch.manual_seed(0)
    segnet = freeze(SegNet(3, nclass, width_mult=width)).to(device)
    obsnet = freeze(Obsnet_Seg(3, 1, width_mult=width)).to(device)
    ensemble = tuple(freeze(SegNet(3, nclass, width_mult=width)).to(device) for _ in range(members))
    return segnet, obsnet, ensemble


def run(size=(360, 480), width: float = 1.0, mc_passes: int = 50, runs: int = 3,
        amp: bool = False, nclass: int = 12) -> dict:
    """Per-image seconds (Spreads) of the SegNet forward and of each method, and the ratios."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    segnet, obsnet, ensemble = networks(width, nclass, 2, device)
    image = torch.randn(1, 3, *size, device=device)
    cfg = MethodConfig(mc_passes=mc_passes)
    with torch.no_grad(), autocast(device, amp):
        feats = segnet(image, return_feat=True)
        batch = EvalBatch(image, segnet, obsnet, feats, ensemble)
        forward = repeat(lambda: segnet(image, return_feat=True), runs, device=device)
        rows = {"segnet_forward": {"total": forward, "added": None}}
        for name in ("obsnet", "mcp", "mc_dropout", "ensemble"):
            method = METHODS[name]
            warmup = 0 if name == "mc_dropout" else 1  # its passes are SegNet forwards, warm already
            added = repeat(partial(method.fn, batch, cfg), runs, warmup=warmup, device=device)
            total = forward.median + added.median if method.uses_shared_forward else added.median
            rows[name] = {"total": total, "added": added}
    return {"device": device.type, "size": tuple(size), "width": width, "amp": amp,
            "mc_passes": mc_passes, "runs": runs, "methods": rows, **ratios(rows)}


def ratios(rows: dict) -> dict:
    """ObsNet against the SegNet forward and against MC dropout."""
    forward, obsnet, mc = (rows[k] for k in ("segnet_forward", "obsnet", "mc_dropout"))
    return {"obsnet_over_segnet_forward": obsnet["added"].median / forward["total"].median,
            "mc_dropout_over_obsnet_added": mc["total"] / obsnet["added"].median,
            "mc_dropout_over_obsnet_total": mc["total"] / obsnet["total"]}


def total_seconds(entry: dict) -> float:
    """A method row's total seconds per image (the SegNet forward's row holds a Spread)."""
    total = entry["total"]
    return total if isinstance(total, float) else total.median


def main() -> None:
    """Print ms per image for each method, and the ratios."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, nargs=2, default=[360, 480])
    p.add_argument("--width_mult", type=float, default=1.0)
    p.add_argument("--T", type=int, default=50, help="MC dropout passes")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--amp", action="store_true")
    args = p.parse_args()
    out = run(tuple(args.size), args.width_mult, args.T, args.runs, args.amp)
    for name, entry in out["methods"].items():
        added = "" if entry["added"] is None else f", added {entry['added'].scaled(1000).text()} ms"
        print(f"{name:<15} total {total_seconds(entry) * 1000:.1f} ms/image{added}")
    print(f"ObsNet / SegNet forward {out['obsnet_over_segnet_forward']:.2f}; MC dropout (T={args.T}) "
          f"/ ObsNet: x{out['mc_dropout_over_obsnet_added']:.0f} (added cost), "
          f"x{out['mc_dropout_over_obsnet_total']:.0f} (total)")


if __name__ == "__main__":
    main()
