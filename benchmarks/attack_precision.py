"""What the attack does in float32, float16 and bfloat16 autocast, on the same batches.

    python -m benchmarks.attack_precision --segnet_file ckpt/demo/segnet.pth --width_mult 0.125 \\
        --dset_folder data/Synthetic --batches 10

For each batch, the same mask and the same noise (one seed per batch) are attacked under each
precision, as the observer stage does (``select_attack`` then the SegNet's forward in the same
autocast). Measured: the share of masked input values the signed step moved, the flip rate
(share of attacked pixels whose SegNet class changed, as ``Train/attack_flip_rate``) and the
agreement of the step's signs with float32's. The row "float16, mean loss in autocast" is the
attack before it ran in float32 under float16 (mean cross-entropy inside autocast), for
comparison. Without ``--segnet_file`` a randomly initialised SegNet on random images is used.
"""
import argparse

import torch
import torch.nn.functional as F

from obsnet.attacks import MASKS, _valid_range, select_attack
from obsnet.data.loaders import build_dataset, build_loader
from obsnet.data.specs import SPECS
from obsnet.models.blocks import fold_batchnorm
from obsnet.models.registry import load_segmenter
from obsnet.models.segnet import SegNet, freeze
from obsnet.stages import attack_config
from obsnet.utils import autocast

PRECISIONS = ("float32", "float16", "bfloat16", "float16, mean loss in autocast")


def old_float16_attack(segnet, images, labels, cfg):
    """The attack as it was: mean cross-entropy, forward and backward inside the autocast."""
    mask = MASKS[cfg.mask](images, labels, cfg)
    x = (images + cfg.noise_std * torch.randn_like(images) * mask).detach().requires_grad_(True)
    logits = segnet(x)
    target = labels.masked_fill((labels < 0) | (labels >= cfg.nclass), -100)
    (grad,) = torch.autograd.grad(F.cross_entropy(logits.float(), target, ignore_index=-100), x)
    lo, hi = _valid_range(cfg, images.device)
    adv = torch.maximum(torch.minimum(x.detach() + cfg.epsilon * grad.sign() * mask, hi), lo)
    return torch.where(mask > 0, adv, images), mask, logits.detach().argmax(dim=1), x.detach()


def attack_once(segnet, images, labels, cfg, precision: str, seed: int):
    """(moved, signs, mask, predicted before, predicted after) for one precision, seeded so that
    every precision draws the same mask and noise."""
    amp = None if precision == "float32" else precision.split(",")[0]
    torch.manual_seed(seed)
    with autocast(images.device, amp):
        if precision.endswith("autocast"):
            adv, mask, before, noisy = old_float16_attack(segnet, images, labels, cfg)
        else:
            torch.manual_seed(seed)
            mask = MASKS[cfg.mask](images, labels, cfg)
            noisy = images + cfg.noise_std * torch.randn_like(images) * mask
            torch.manual_seed(seed)
            adv, _, before = select_attack(images, labels, segnet, cfg)
        with torch.no_grad():
            after = segnet(adv).argmax(dim=1)
    step = (adv.float() - noisy.float()) * mask
    return step != 0, step.sign(), mask[:, 0] > 0, before, after


def measure_batch(segnet, images, labels, cfg, seed: int) -> dict:
    """Per precision: [moved values, masked values, flipped pixels, attacked pixels, sign agreement
    with float32 among masked values]."""
    out, reference = {}, None
    for precision in PRECISIONS:
        moved, signs, inside, before, after = attack_once(segnet, images, labels, cfg, precision, seed)
        masked = inside.unsqueeze(1).expand_as(moved)
        reference = signs if reference is None else reference
        out[precision] = torch.tensor([
            moved[masked].sum().item(), masked.sum().item(),
            ((after != before) & inside).sum().item(), inside.sum().item(),
            (signs == reference)[masked].sum().item()], dtype=torch.float64)
    return out


def batches(args, spec):
    """The first ``args.batches`` training batches (eval transforms, in order), or random images
    without a folder."""
    if args.dset_folder is None:
        gen = torch.Generator().manual_seed(0)
        for _ in range(args.batches):
            yield (torch.randn(args.bsize, 3, *args.size, generator=gen),
                   torch.randint(0, spec.nclass, (args.bsize, *args.size), generator=gen))
        return
    dataset = build_dataset(spec, args.dset_folder, spec.train_split, tuple(args.size))
    for step, (images, labels) in enumerate(build_loader(dataset, args.bsize, train=False)):
        if step == args.batches:
            return
        yield images, labels


def run(args) -> dict:
    """Summed counts over the batches, as rates per precision."""
    spec = SPECS[args.data]
    if args.segnet_file:
        segnet = load_segmenter("segnet", spec.nclass, args.width_mult, args.segnet_file)
    else:
        torch.manual_seed(0)
        segnet = SegNet(3, spec.nclass, width_mult=args.width_mult)
    segnet = fold_batchnorm(freeze(segnet).eval())
    cfg = attack_config(args.adv, args.epsilon, tuple(args.size), spec.nclass, spec)
    totals = {p: torch.zeros(5, dtype=torch.float64) for p in PRECISIONS}
    for i, (images, labels) in enumerate(batches(args, spec)):
        for precision, counts in measure_batch(segnet, images, labels, cfg, seed=i).items():
            totals[precision] += counts
    return {p: {"moved": t[0].item() / t[1].item(), "flip_rate": t[2].item() / t[3].item(),
                "sign_agreement": t[4].item() / t[1].item()} for p, t in totals.items()}


def main(argv=None) -> None:
    """Print one line per precision."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="Synthetic", choices=list(SPECS))
    p.add_argument("--dset_folder", default=None, help="dataset root (default: random images)")
    p.add_argument("--segnet_file", default=None, help="SegNet checkpoint (default: random weights)")
    p.add_argument("--width_mult", type=float, default=0.125)
    p.add_argument("--size", type=int, nargs=2, default=[96, 128])
    p.add_argument("--adv", default="min_random_patch")
    p.add_argument("--epsilon", type=float, default=0.025)
    p.add_argument("--bsize", type=int, default=8)
    p.add_argument("--batches", type=int, default=5)
    args = p.parse_args(argv)
    for precision, r in run(args).items():
        print(f"{precision:<32} moved {r['moved']:7.2%}  flip rate {r['flip_rate']:7.2%}  "
              f"signs as float32 {r['sign_agreement']:7.2%}")


if __name__ == "__main__":
    main()
