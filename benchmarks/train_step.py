"""Observer training step, split into data wait, attack, SegNet forward and ObsNet
forward+backward; and the attack with and without SegNet weight gradients.

The step is the observer stage's: the attack runs on the SegNet with its batch norms folded.
After it, on the same batch, the same attack on the SegNet as loaded ("attack_unfolded") and
the original's attack, which also computes the SegNet's weight gradients.

    python -m benchmarks.train_step --size 360 480 --bsize 8 --width_mult 1.0 --runs 3

Batches come from the real training loader (2 workers, CamVid transforms) over a folder of
random images of the given size, made in a temporary directory.
"""
import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import Spread, sync
from benchmarks.loader_speed import make_folder
from obsnet.attacks import MASKS, AttackConfig, _valid_range, select_attack
from obsnet.data.loaders import build_dataset, build_loader
from obsnet.data.specs import SPECS
from obsnet.losses import CRITERIA
from obsnet.models.blocks import fold_batchnorm
from obsnet.models.obsnet import Obsnet_Seg
from obsnet.models.segnet import SegNet, freeze
from obsnet.stages import attack_config
from obsnet.train import make_scaler
from obsnet.utils import autocast

PARTS = ("data_wait", "attack", "segnet_forward", "obsnet_fwd_bwd", "step", "attack_unfolded",
         "attack_weight_grads")


def attack_with_weight_grads(trainable_segnet, images, labels, cfg: AttackConfig):
    """The original's way for reference: one FGSM step through ``loss.backward()`` on a SegNet
    whose weights require gradients, so that backward also computes (and stores) them.
    Only the "min" mode (the CamVid preset's) is written here."""
    if cfg.mode != "min":
        raise ValueError(f"attack_with_weight_grads: only the 'min' mode, not '{cfg.mode}'")
    mask = MASKS[cfg.mask](images, labels, cfg)
    x = (images + cfg.noise_std * torch.randn_like(images) * mask).detach().requires_grad_(True)
    target = labels.masked_fill((labels < 0) | (labels >= cfg.nclass), -100)
    F.cross_entropy(trainable_segnet(x).float(), target, ignore_index=-100).backward()
    lo, hi = _valid_range(cfg, images.device)
    adv = torch.maximum(torch.minimum(x.detach() + cfg.epsilon * x.grad.sign() * mask, hi), lo)
    trainable_segnet.zero_grad(set_to_none=True)
    return torch.where(mask > 0, adv, images)


class Clock:
    """Seconds between successive ``lap`` calls, waiting for the GPU first."""

    def __init__(self, device):
        self.device, self.times = device, {}
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        """Charge the time since the previous lap to ``name``."""
        sync(self.device)
        now = time.perf_counter()
        self.times[name], self.last = now - self.last, now


def timed_step(batch_iter, nets, attack, optimizer, scaler, amp, device) -> dict:
    """One observer training step (as ``train.observer_step``), then the same attack on the
    SegNet with its batch norms (not folded), and the original's attack (weight gradients)."""
    segnet, unfolded, trainable, obsnet = nets
    criterion = CRITERIA["bce"](2.0).to(device)
    clock = Clock(device)
    images, labels = next(batch_iter)
    images, labels = images.to(device), labels.to(device)
    clock.lap("data_wait")
    with autocast(device, amp):
        attacked = select_attack(images, labels, segnet, attack).images
        clock.lap("attack")
        with torch.no_grad():
            feats = segnet(attacked, return_feat=True)
            error = (feats[-1].argmax(1) != labels).float()
        clock.lap("segnet_forward")
        loss = criterion(obsnet(attacked, feats).squeeze(1).float(), error)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    clock.lap("obsnet_fwd_bwd")
    clock.times["step"] = sum(clock.times.values())
    clock.last = time.perf_counter()
    with autocast(device, amp):
        select_attack(images, labels, unfolded, attack)
        clock.lap("attack_unfolded")
        attack_with_weight_grads(trainable, images, labels, attack)
    clock.lap("attack_weight_grads")
    return clock.times


def forever(loader):
    """Batches of ``loader``, epoch after epoch."""
    while True:
        yield from loader


def measure_size(root, size, bsize, width, amp, runs, workers, device) -> dict:
    """Spreads of each part over ``runs`` steps after one warm-up step."""
    spec = SPECS["CamVid"]
    loader = build_loader(build_dataset(spec, root, spec.train_split, tuple(size), train=True),
                          bsize, train=True, num_workers=workers)
    unfolded = freeze(SegNet(3, spec.nclass, width_mult=width)).to(device)
    trainable = copy.deepcopy(unfolded).requires_grad_(True)
    segnet = fold_batchnorm(copy.deepcopy(unfolded))  # as the observer stage does
    obsnet = Obsnet_Seg(3, 1, width_mult=width).to(device).train()
    attack = attack_config("min_random_patch", 0.025, tuple(size), spec.nclass, spec)
    optimizer = torch.optim.SGD(obsnet.parameters(), lr=0.01)
    batches = forever(loader)
    steps = [timed_step(batches, (segnet, unfolded, trainable, obsnet), attack, optimizer,
                        make_scaler(device, amp), amp, device) for _ in range(runs + 1)][1:]
    out = {k: Spread.of(s[k] for s in steps) for k in PARTS}
    out["attack_speedup"] = statistics.median(s["attack_weight_grads"] / s["attack"] for s in steps)
    out["attack_speedup_no_fold"] = statistics.median(
        s["attack_weight_grads"] / s["attack_unfolded"] for s in steps)
    return out


def run(configs, runs: int = 3, workers: int = 2) -> list[dict]:
    """One row per (size, bsize, width, amp) in ``configs``."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for size, bsize, width, amps in configs:
        with tempfile.TemporaryDirectory() as tmp:
            root = make_folder(Path(tmp), max(2 * bsize, 16), tuple(size))
            for amp in amps:
                parts = measure_size(root, size, bsize, width, amp, runs, workers, device)
                rows.append({"device": device.type, "size": tuple(size), "bsize": bsize,
                             "width": width, "amp": amp, "workers": workers, **parts})
    return rows


def main() -> None:
    """Print the median of each part, without and with AMP."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, nargs=2, default=[360, 480])
    p.add_argument("--bsize", type=int, default=8)
    p.add_argument("--width_mult", type=float, default=1.0)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    for r in run([(args.size, args.bsize, args.width_mult, (False, True))], args.runs, args.workers):
        parts = ", ".join(f"{k} {r[k].median * 1000:.0f} ms" for k in PARTS)
        print(f"{r['device']} {r['size'][0]}x{r['size'][1]} bsize {r['bsize']} width {r['width']} "
              f"amp={r['amp']}: {parts}; attack x{r['attack_speedup']:.2f} faster than with weight "
              f"grads (x{r['attack_speedup_no_fold']:.2f} without folding the batch norms)")


if __name__ == "__main__":
    main()
