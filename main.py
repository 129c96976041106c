"""ObsNet command line: train the SegNet, train the observer with local adversarial attacks,
or evaluate uncertainty methods. ``python main.py`` alone runs the CPU demo."""
import argparse
import random
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from Dataset.load_data import build_dataset, build_loader
from Dataset.specs import LOADABLE, SPECS
from Dataset.synthetic import ensure_synthetic, is_complete
from evaluation import evaluate
from Models.load_net import build_models, init_from_segnet, load_networks, load_weights, save_checkpoint
from train import ObserverConfig, train_observer_epoch, train_segnet_epoch
from Utils.adv_attack import ATTACK_CHOICES, AttackConfig, parse_attack
from Utils.cli import UsageError, run_friendly
from Utils.loss import CRITERIA
from Utils.report import (format_table, log_pr_curves, log_preview, log_scalars, write_csv,
                          write_json)
from Utils.uncertainty import ALIASES, METHODS, MethodConfig, parse_methods

MODELS = ("segnet", "deeplabv3plus")
NOT_YET = {  # flags accepted by the parser whose feature is planned, not built yet
    "model": ("deeplabv3plus", "--model deeplabv3plus is not implemented yet; use --model segnet"),
    "num_nodes": (None, "--num_nodes > 1 (multi-node training) is not implemented yet"),
}

# `python main.py` with no argument: the three stages of the demo, each a plain command line.
DEMO_COMMON = ["--data", "Synthetic", "--dset_folder", "data/Synthetic", "--segnet_file",
               "ckpt/demo/segnet.pth", "--obsnet_file", "ckpt/demo/", "--tboard", "logs/demo",
               "--width_mult", "0.125", "--seed", "0", "--bsize", "8"]
DEMO_STAGES = [
    ["--train_segnet", "--epoch", "24", "--optim", "AdamW", "--lr", "0.003"],
    ["--adv", "min_random_patch", "--epsilon", "0.025", "--epoch", "10", "--lr", "0.5"],
    ["--test_only", "--test_multi", "obsnet,mcp,mc_dropout", "--T", "20"],
]


def build_parser() -> argparse.ArgumentParser:
    """The original project's flags plus --nclass, --width_mult, --size, --train_segnet."""
    p = argparse.ArgumentParser(description=__doc__)
    a = p.add_argument
    a("--dset_folder", default=None, help="dataset root (Synthetic: generated there if absent)")
    a("--segnet_file", default=None, help="SegNet checkpoint (default ckpt/<data>/segnet.pth)")
    a("--obsnet_file", default=None,
      help="ObsNet checkpoint folder, or a file to test (default ckpt/<data>/)")
    a("--model", default="segnet", choices=MODELS, help="segmentation network")
    a("--data", default="CamVid", choices=sorted(SPECS), help="dataset preset")
    a("--tboard", default=None, help="TensorBoard / results folder (default logs/<data>)")
    a("--T", type=int, default=50, help="forward passes of MC dropout")
    a("--seed", type=int, default=-1, help="random seed; -1: not seeded")
    a("--bsize", type=int, default=8, help="batch size")
    a("--lr", type=float, default=2e-2, help="learning rate")
    a("--Temp", type=float, default=1.2, help="temperature of temperature scaling")
    a("--noise", type=float, default=0.0, help="std of Gaussian noise added to training inputs")
    a("--epsilon", type=float, default=0.1, help="FGSM step size of the attack")
    a("--gauss_lambda", type=float, default=0.002, help="std of the Gaussian weight perturbation")
    a("--odin_eps", type=float, default=0.001, help="ODIN input perturbation size")
    a("--odin_temp", type=float, default=1000.0, help="ODIN temperature")
    a("--ensemble", default=None, help="comma-separated SegNet checkpoints for --test_multi ensemble")
    a("--epoch", type=int, default=50, help="number of epochs")
    a("--num_workers", type=int, default=0, help="data loading workers")
    a("--num_nodes", type=int, default=1, help="number of nodes")
    a("--adv", default="none", choices=ATTACK_CHOICES, help="local adversarial attack")
    a("--optim", default="SGD", choices=("SGD", "AdamW"), help="optimizer")
    a("--test_multi", default="obsnet",
      help="comma-separated methods: " + ",".join(list(METHODS) + list(ALIASES)))
    a("--drop", action="store_true", help="dropout active in the SegNet while training ObsNet")
    a("--no_img", action="store_true", help="ablation: ObsNet does not see the image")
    a("--resume", action="store_true", help="continue training from <obsnet_file>/last.pth")
    a("--obs_mlp", action="store_true", help="small observer reading one SegNet map")
    a("--test_only", action="store_true", help="evaluate the methods of --test_multi")
    a("--no_residual", action="store_true", help="ablation: ObsNet without the SegNet's maps")
    a("--no_pretrained", action="store_true", help="do not start ObsNet from the SegNet's weights")
    a("--nclass", type=int, default=None, help="SegNet outputs (default: the dataset's classes)")
    a("--width_mult", type=float, default=1.0, help="channel width multiplier (1.0 = original)")
    a("--size", type=int, nargs=2, metavar=("H", "W"), default=None, help="image size (default: preset)")
    a("--train_segnet", action="store_true", help="train the SegNet and save it to --segnet_file")
    a("--focal", action="store_true", help="focal loss instead of weighted BCE for ObsNet")
    a("--debug", action="store_true", help="show tracebacks")
    return p


def check_args(args, spec) -> None:
    """Reject values that cannot work, before any heavy work."""
    for flag, (bad, message) in NOT_YET.items():
        value = getattr(args, flag)
        if (bad is not None and value == bad) or (flag == "num_nodes" and value > 1):
            raise UsageError(message)
    for flag in ("bsize", "epoch", "T"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be at least 1 (got {getattr(args, flag)})")
    for flag in ("lr", "epsilon", "width_mult", "Temp", "odin_temp"):
        if getattr(args, flag) <= 0:
            raise UsageError(f"--{flag} must be positive (got {getattr(args, flag)})")
    for flag in ("odin_eps", "gauss_lambda", "noise"):
        if getattr(args, flag) < 0:
            raise UsageError(f"--{flag} must be >= 0 (got {getattr(args, flag)})")
    if args.nclass is not None and args.nclass < spec.nclass:
        raise UsageError(f"--nclass {args.nclass} is smaller than the {spec.nclass} classes of {spec.name}")
    if args.size is not None and min(args.size) < 32:
        raise UsageError(f"--size {args.size[0]} {args.size[1]}: both sides must be at least 32")
    if args.num_workers < 0:
        raise UsageError("--num_workers must be >= 0")


def resolve_args(args):
    """Fill per-dataset defaults in place; returns the dataset spec."""
    spec = SPECS[args.data]
    check_args(args, spec)
    if args.data not in LOADABLE:
        raise UsageError(f"--data {args.data}: loader not implemented yet "
                         f"(loadable: {', '.join(LOADABLE)})")
    tag = args.data.lower()
    args.dset_folder = args.dset_folder or (f"data/{args.data}" if args.data == "Synthetic" else None)
    if args.dset_folder is None:
        raise UsageError(f"--dset_folder is required for --data {args.data}")
    args.segnet_file = args.segnet_file or f"ckpt/{tag}/segnet.pth"
    args.obsnet_file = args.obsnet_file or f"ckpt/{tag}/"
    args.tboard = args.tboard or f"logs/{tag}"
    args.nclass = args.nclass or spec.nclass
    args.size = tuple(args.size or spec.size)
    try:
        names = parse_methods(args.test_multi)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if "ensemble" in names and not args.ensemble:
        raise UsageError("--test_multi ensemble needs --ensemble FILE,FILE,... (SegNet checkpoints)")
    if "void" in names and spec.void_id is None:
        raise UsageError(f"--test_multi void: {spec.name} has no void class")
    return spec


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (every device); -1 leaves everything unseeded."""
    if seed >= 0:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)


def loader_for(args, spec, split: str, train: bool):
    """A data loader over one split of the dataset."""
    dataset = build_dataset(spec, args.dset_folder, split, args.size, train=train)
    return build_loader(dataset, args.bsize, train=train, num_workers=args.num_workers,
                        seed=max(args.seed, 0))


def attack_config(args, spec):
    """The attack of --adv at the run's image size (patch sizes scale with the image)."""
    parsed = parse_attack(args.adv)
    if parsed is None:
        return None
    factor = min(args.size[0] / spec.size[0], args.size[1] / spec.size[1])
    patch = tuple(max(1, round(v * factor)) for v in spec.patch_size)
    return AttackConfig(mode=parsed[0], mask=parsed[1], epsilon=args.epsilon, patch_size=patch,
                        nclass=args.nclass, mean=spec.mean, std=spec.std)


def make_optimizer(args, params, schedule: str = "multistep"):
    """--optim with --lr (plain SGD, as the original) and a learning-rate schedule.

    "multistep": the original observer schedule, x0.2 at epoch//2 and epoch-5;
    "cosine": cosine decay over --epoch, used for the SegNet stage.
    """
    if args.optim == "SGD":
        optimizer = torch.optim.SGD(params, lr=args.lr)
    else:
        optimizer = torch.optim.AdamW(params, lr=args.lr)
    if schedule == "cosine":
        return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epoch)
    milestones = sorted({m for m in (args.epoch // 2, args.epoch - 5) if m > 0})
    return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.2)


def training_state(model, optimizer, scheduler, epoch, best, args) -> dict:
    """Everything needed to resume: weights, optimizer, scheduler, epoch, best metric, args."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "epoch": epoch, "best": best,
            "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}}


def stage_train_segnet(args, spec, device, writer) -> None:
    """Train the SegNet with cross-entropy; keep the best validation mIoU in --segnet_file."""
    segnet, _ = build_models(args.model, args.nclass, args.width_mult, args.obs_mlp)
    segnet.to(device)
    train_loader = loader_for(args, spec, spec.train_split, train=True)
    val_loader = loader_for(args, spec, spec.val_split, train=False)
    optimizer, scheduler = make_optimizer(args, segnet.parameters(), schedule="cosine")
    best = -1.0
    for epoch in tqdm(range(args.epoch), desc="SegNet epochs"):
        stats = train_segnet_epoch(epoch, segnet, train_loader, optimizer, args.nclass, device, writer)
        results, _, _ = evaluate(segnet, None, val_loader, [], spec, device, MethodConfig(),
                                 args.nclass, spec.val_split)
        miou = results["segnet"]["miou"]
        writer.add_scalar("Val/segnet_miou", miou, epoch)
        tqdm.write(f"SegNet epoch {epoch}: loss {stats['loss']:.4f}, train acc "
                   f"{stats['segnet_acc']:.3f}, val mIoU {miou:.3f}")
        if miou > best:
            best = miou
            save_checkpoint(args.segnet_file, training_state(segnet, optimizer, scheduler, epoch, best, args))
        scheduler.step()
    print(f"SegNet saved to {args.segnet_file} (best val mIoU {best:.3f})")


def stage_train_obsnet(args, spec, device, writer) -> None:
    """Train the observer against the frozen SegNet; validate every epoch; keep best.pth."""
    train_loader = loader_for(args, spec, spec.train_split, train=True)
    val_loader = loader_for(args, spec, spec.val_split, train=False)
    segnet, obsnet = load_networks(args.model, args.nclass, args.width_mult, args.obs_mlp,
                                   args.segnet_file, device=device)
    if not (args.no_pretrained or args.resume):
        print(f"ObsNet initialised from the SegNet: {init_from_segnet(obsnet, segnet)} tensors")
    folder = Path(args.obsnet_file)
    optimizer, scheduler = make_optimizer(args, obsnet.parameters())
    criterion = CRITERIA["focal" if args.focal else "bce"](spec.pos_weight).to(device)
    cfg = ObserverConfig(attack_config(args, spec), args.noise, args.drop, args.no_residual,
                         args.no_img, spec.ignore_id)
    start, best = 0, -1.0
    if args.resume:
        state = load_weights(obsnet, folder / "last.pth")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start, best = state["epoch"] + 1, state["best"]
        print(f"Resumed from {folder / 'last.pth'} at epoch {start}")
    for epoch in tqdm(range(start, args.epoch), desc="ObsNet epochs"):
        stats = train_observer_epoch(epoch, obsnet, segnet, train_loader, optimizer, criterion,
                                     device, cfg, writer)
        results, preview, _ = evaluate(segnet, obsnet, val_loader, ["obsnet"], spec, device,
                                       MethodConfig(), args.nclass, spec.val_split)
        auroc = results["methods"]["obsnet"]["error"]["auroc"]
        log_scalars(writer, results, "Val", epoch)
        log_preview(writer, preview, spec.colors, spec.mean, spec.std, "Val", epoch)
        tqdm.write(f"ObsNet epoch {epoch}: loss {stats['loss']:.4f}, obsnet acc "
                   f"{stats['obsnet_acc']:.3f}, val error AUROC {auroc:.4f}")
        scheduler.step()
        state = training_state(obsnet, optimizer, scheduler, epoch, max(best, auroc), args)
        if auroc > best:
            best = auroc
            save_checkpoint(folder / "best.pth", state)
        if (epoch + 1) % 5 == 0:
            save_checkpoint(folder / f"epoch{epoch + 1:03d}.pth", state)
        save_checkpoint(folder / "last.pth", state)
    print(f"ObsNet checkpoints in {folder} (best val error AUROC {best:.4f})")


def method_config(args, spec) -> MethodConfig:
    """Hyper-parameters of the uncertainty methods, from the command line and the spec."""
    return MethodConfig(mc_passes=args.T, temperature=args.Temp, odin_eps=args.odin_eps,
                        odin_temp=args.odin_temp, gauss_lambda=args.gauss_lambda,
                        void_id=spec.void_id, mean=spec.mean, std=spec.std, progress=True)


def load_ensemble(args, device) -> list:
    """The frozen SegNets of --ensemble (comma-separated checkpoint files)."""
    files = [f for f in args.ensemble.split(",") if f.strip()] if args.ensemble else []
    return [load_networks(args.model, args.nclass, args.width_mult, False, f.strip(),
                          device=device)[0] for f in files]


def stage_test(args, spec, device, writer) -> None:
    """Evaluate every method of --test_multi on the test split; table, JSON, CSV, TensorBoard."""
    names = parse_methods(args.test_multi)
    loader = loader_for(args, spec, spec.test_split, train=False)
    segnet, obsnet = load_networks(args.model, args.nclass, args.width_mult, args.obs_mlp,
                                   args.segnet_file, args.obsnet_file if "obsnet" in names else None,
                                   device)
    obsnet = obsnet if "obsnet" in names else None
    results, preview, meters = evaluate(segnet, obsnet, loader, names, spec, device,
                                        method_config(args, spec), args.nclass, spec.test_split,
                                        ensemble=load_ensemble(args, device))
    log_scalars(writer, results, "Test", 0)
    log_pr_curves(writer, meters, "Test", 0)
    log_preview(writer, preview, spec.colors, spec.mean, spec.std, "Test", 0)
    write_json(Path(args.tboard) / "results.json", results)
    write_csv(Path(args.tboard) / "results.csv", results)
    print(format_table(results))
    print(f"results written to {Path(args.tboard) / 'results.json'} and results.csv")


def run_stage(args, spec) -> None:
    """Run the stage the flags ask for, with a TensorBoard writer in --tboard."""
    if args.data == "Synthetic" and not is_complete(args.dset_folder):
        ensure_synthetic(args.dset_folder, seed=0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    write_json(Path(args.tboard) / "config.json", vars(args))
    stage = stage_test if args.test_only else stage_train_segnet if args.train_segnet else stage_train_obsnet
    with SummaryWriter(args.tboard) as writer:
        writer.add_text("config", " ".join(sys.argv), 0)
        stage(args, spec, device, writer)


def run(argv) -> int:
    """Parse, resolve and run one stage; returns the process exit code."""
    args = build_parser().parse_args(argv)
    spec = resolve_args(args)
    seed_everything(args.seed)
    run_stage(args, spec)
    return 0


def run_demo() -> int:
    """The demo: each stage printed as the command it equals, then run."""
    for stage in DEMO_STAGES:
        argv = DEMO_COMMON + stage
        if "--train_segnet" in stage and Path(DEMO_COMMON[5]).is_file():
            print(f"[demo] {DEMO_COMMON[5]} exists: SegNet training skipped")
            continue
        print("[demo] python main.py " + " ".join(argv), flush=True)
        run(argv)
    return 0


def main(argv=None) -> int:
    """Entry point: friendly one-line errors unless --debug."""
    argv = sys.argv[1:] if argv is None else argv
    return run_friendly("main.py", lambda a: run(a) if a else run_demo(), argv)


if __name__ == "__main__":
    sys.exit(main())
