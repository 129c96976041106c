"""Observer training step time, split into attack, SegNet forward and ObsNet forward+backward,
with and without --amp.

    python -m benchmarks.train_step --size 360 480 --bsize 8 --width_mult 1.0 --steps 3
"""
import argparse
import statistics
import time

import torch

from Dataset.specs import SPECS
from Models.obsnet import Obsnet_Seg
from Models.segnet import SegNet, freeze
from train import make_scaler
from Utils.adv_attack import AttackConfig, select_attack
from Utils.loss import CRITERIA
from Utils.utils import autocast


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_step(segnet, obsnet, images, labels, attack, optimizer, scaler, amp, device) -> dict:
    """One observer training step; seconds spent in each part."""
    times, start = {}, time.perf_counter()
    criterion = CRITERIA["bce"](2.0).to(device)
    with autocast(device, amp):
        images, _ = select_attack(images, labels, segnet, attack)
        _sync(device)
        times["attack"] = time.perf_counter() - start
        with torch.no_grad():
            feats = segnet(images, return_feat=True)
            error = (feats[-1].argmax(1) != labels).float()
        _sync(device)
        times["segnet_forward"] = time.perf_counter() - start - times["attack"]
        loss = criterion(obsnet(images, feats).squeeze(1).float(), error)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    _sync(device)
    times["total"] = time.perf_counter() - start
    times["obsnet_fwd_bwd"] = times["total"] - times["attack"] - times["segnet_forward"]
    return times


def main() -> None:
    """Median times over --steps steps after one warm-up step, without and with AMP."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, nargs=2, default=[360, 480])
    p.add_argument("--bsize", type=int, default=8)
    p.add_argument("--width_mult", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    spec = SPECS["CamVid"]
    segnet = freeze(SegNet(3, 12, width_mult=args.width_mult)).to(device)
    obsnet = Obsnet_Seg(3, 1, width_mult=args.width_mult).to(device).train()
    attack = AttackConfig("min", "random_patch", 0.025, spec.patch_size, 12, spec.mean, spec.std)
    images = torch.randn(args.bsize, 3, *args.size, device=device)
    labels = torch.randint(0, 12, (args.bsize, *args.size), device=device)
    for amp in (False, True):
        optimizer = torch.optim.SGD(obsnet.parameters(), lr=0.01)
        scaler = make_scaler(device, amp)
        runs = [timed_step(segnet, obsnet, images, labels, attack, optimizer, scaler, amp, device)
                for _ in range(args.steps + 1)][1:]
        parts = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        report = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in parts.items())
        print(f"{device.type} {args.size[0]}x{args.size[1]} bsize {args.bsize} width "
              f"{args.width_mult} amp={amp}: {report}")


if __name__ == "__main__":
    main()
