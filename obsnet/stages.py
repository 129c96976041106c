"""The stages main.py runs, from resolved command-line arguments: train the SegNet, train the
observer (here: what each builds, and its steps for the one epoch loop of ``obsnet.fit``, which
also saves and stops), evaluate (``eval_stages``)."""
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter

from obsnet.attacks import AttackConfig, parse_attack
from obsnet.data.class_weights import WEIGHTING_POWERS, class_frequencies, median_frequency_weights
from obsnet.data.loaders import build_dataset
from obsnet.distributed import cleanup, device_for, init_distributed_mode
from obsnet.errors import UsageError
from obsnet.eval_stages import stage_fit_stats, stage_test
from obsnet.evaluate import evaluate
from obsnet.fit import Saver, Stage, fit
from obsnet.losses import CRITERIA
from obsnet.methods import MethodConfig
from obsnet.models.blocks import fold_batchnorm
from obsnet.models.checkpoint import weights_fingerprint
from obsnet.models.generic import is_generic
from obsnet.model_flags import observer_request
from obsnet.models.observer_spec import ObserverSpec, new_observer_spec, resolve_observer
from obsnet.models.registry import build_observer, build_segmenter, init_from_segnet, load_segmenter
from obsnet.report import NullWriter, log_preview, log_scalars, write_json
from obsnet.run_checks import stage_outputs_exist, start_run, tboard_files
from obsnet.runtime import Runtime, loader_for, log, refuse_missing_dropout, segnet_last, wrap_ddp
from obsnet.signals import StopSignal
from obsnet.train import (ObserverConfig, ObserverJob, SegNetJob, make_scaler, train_observer_epoch,
                          train_segnet_epoch)
from obsnet.training_state import make_optimizer, resume, training_state


def attack_config(args, spec):
    """The attack of --adv at the run's image size (patch sizes scale with the image)."""
    parsed = parse_attack(args.adv)
    if parsed is None:
        return None
    factor = min(args.size[0] / spec.size[0], args.size[1] / spec.size[1])
    patch = tuple(max(1, round(v * factor)) for v in spec.patch_size)
    real = tuple(c for c in range(spec.nclass) if c != spec.void_id)
    return AttackConfig(**parsed._asdict(), epsilon=args.epsilon, patch_size=patch,
                        nclass=args.nclass, mean=spec.mean, std=spec.std, target_classes=real)


@dataclass(kw_only=True)
class TrainingRun:
    """What a training stage builds once and its epoch loop works with."""

    net: nn.Module  # the network trained: checked for NaN or infinite weights, saved
    model: nn.Module  # ``net``, wrapped for DDP when distributed: what takes the steps
    train_loader: DataLoader
    val_loader: DataLoader
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    stop_flag: StopSignal
    saver: Saver  # where the checkpoints go (its ``last``: the resume file, every epoch)
    start: int = 0  # the first epoch to run (with --resume: the one after the saved one)
    best: float = -1.0  # the best validation metric so far (< 0: none yet)


@dataclass(kw_only=True)
class SegNetRun(TrainingRun):
    """A SegNet training run: cross-entropy with ``class_weights`` (None: unweighted)."""

    class_weights: torch.Tensor | None = None


@dataclass(kw_only=True)
class ObserverRun(TrainingRun):
    """An observer training run against the frozen ``segnet``, checkpoints in ``folder``."""

    segnet: nn.Module
    criterion: nn.Module
    config: ObserverConfig
    segmenter_fingerprint: str  # of ``segnet`` before its batch norms were folded, recorded
    observer: ObserverSpec  # what the checkpoints record of the observer trained


def stage_train_segnet(args, spec, rt, writer) -> None:
    """Train the SegNet with cross-entropy; keep the best validation mIoU in --segnet_file and
    the state of the last epoch in ``segnet_last(--segnet_file)`` (for --resume)."""
    train_loader = loader_for(args, spec, spec.train_split, True, rt)
    val_loader = loader_for(args, spec, spec.val_split, False, rt)
    weights = args.vgg_weights if args.model == "segnet" else args.backbone_weights
    segnet = build_segmenter(args.model, args.nclass, args.width_mult, backbone_weights=weights,
                             layers=args.observe_layers, probe_size=args.size)
    segnet = segnet.to(rt.device, memory_format=rt.memory_format)
    optimizer, scheduler = make_optimizer(args, segnet.parameters(), schedule="cosine")
    saver = Saver("SegNet", "--segnet_file", Path(args.segnet_file), segnet_last(args.segnet_file))
    run = SegNetRun(net=segnet, model=segnet, train_loader=train_loader, val_loader=val_loader,
                    optimizer=optimizer, scheduler=scheduler, scaler=make_scaler(rt.device, args.amp),
                    class_weights=segnet_class_weights(args, spec, rt), stop_flag=StopSignal(),
                    saver=saver)
    if args.resume:
        run.start, run.best = resume(saver.last, segnet, optimizer, scheduler, run.scaler)
    run.model = wrap_ddp(segnet, rt)
    with run.stop_flag:
        fit(segnet_stage(args, spec, rt, writer, run), run, rt, writer, args.epoch, args.seed)


def segnet_class_weights(args, spec, rt):
    """--class_weights: None, or the (square-rooted) median-frequency weights of the training
    labels (said)."""
    if args.class_weights == "none":
        return None
    dataset = build_dataset(spec, args.dset_folder, spec.train_split)
    weights = median_frequency_weights(class_frequencies(dataset, args.nclass, rt.is_main),
                                       WEIGHTING_POWERS[args.class_weights])
    log(rt, f"{args.class_weights} class weights: " + ", ".join(
        f"{name} {w:.2f}" for name, w in zip(spec.class_names, weights.tolist())))
    return weights


def segnet_stage(args, spec, rt, writer, run: SegNetRun) -> Stage:
    """The SegNet stage's steps for ``fit``: an epoch of cross-entropy, validation mIoU."""
    job = SegNetJob(model=run.model, loader=run.train_loader, optimizer=run.optimizer,
                    device=rt.device, scaler=run.scaler, amp=args.amp, writer=writer,
                    progress=rt.is_main, nclass=args.nclass, class_weights=run.class_weights)

    def validate(epoch: int, stats: dict) -> tuple[float, str]:
        results, _, _ = evaluate(run.net, None, run.val_loader, [], spec, rt.device, MethodConfig(),
                                 args.nclass, spec.val_split, amp=args.amp, progress=rt.is_main)
        miou = results["segnet"]["miou"]
        writer.add_scalar("Val/segnet_miou", miou, epoch)
        return miou, (f"loss {stats['loss']:.4f}, train acc {stats['segnet_acc']:.3f}, "
                      f"val mIoU {miou:.3f}")

    return Stage(lambda epoch, stop: train_segnet_epoch(job, epoch, stop), validate,
                 lambda epoch, best: training_state(run.net, run.optimizer, run.scheduler,
                                                    run.scaler, epoch, best, args),
                 lambda best: f"SegNet saved to {args.segnet_file} (best val mIoU {best:.3f})")


def stage_train_obsnet(args, spec, rt, writer) -> None:
    """Train the observer against the frozen SegNet; validate every epoch; keep best.pth."""
    train_loader = loader_for(args, spec, spec.train_split, True, rt)
    val_loader = loader_for(args, spec, spec.val_split, False, rt)
    folder = Path(args.obsnet_file)
    given = observer_request(args)
    observer = new_observer_spec(given, args.model)
    if args.resume:  # the run goes on with the network it started with
        observer = resolve_observer(folder / "last.pth", given)
        args.obs_head, args.observe_layers = observer.head, observer.layers
        args.obs_inputs, args.obs_kind = observer.inputs, observer.kind
    segnet = load_segmenter(args.model, args.nclass, args.width_mult, args.segnet_file, rt.device,
                            layers=observer.layers, probe_size=args.size)
    obsnet = build_observer(observer, segnet, args.nclass, args.width_mult).to(rt.device)
    refuse_missing_dropout(segnet, args.model, ["--drop"] if args.drop else [])
    args.observe_layers = getattr(segnet, "layers", None)  # recorded in the checkpoints
    observer = replace(observer, layers=args.observe_layers)
    segnet, obsnet = (m.to(memory_format=rt.memory_format) for m in (segnet, obsnet))
    if not (args.no_pretrained or args.resume or is_generic(args.model)):
        log(rt, f"ObsNet initialised from the SegNet: {init_from_segnet(obsnet, segnet)} tensors")
    fingerprint = weights_fingerprint(segnet)  # of the weights loaded, before folding
    # The frozen SegNet is never saved here: fold its batch norms (attack 18% faster, BENCHMARKS.md).
    segnet = fold_batchnorm(segnet).to(memory_format=rt.memory_format)
    optimizer, scheduler = make_optimizer(args, obsnet.parameters())
    saver = Saver("ObsNet", "--obsnet_file", folder / "best.pth", folder / "last.pth", every=5)
    run = ObserverRun(
        net=obsnet, model=obsnet, segnet=segnet, train_loader=train_loader, val_loader=val_loader,
        optimizer=optimizer, scheduler=scheduler, scaler=make_scaler(rt.device, args.amp),
        criterion=CRITERIA["focal" if args.focal else "bce"](spec.pos_weight).to(rt.device),
        config=ObserverConfig(attack_config(args, spec), args.noise, args.drop, spec.ignore_id),
        stop_flag=StopSignal(), saver=saver, segmenter_fingerprint=fingerprint, observer=observer)
    if args.resume:
        run.start, run.best = resume(saver.last, obsnet, optimizer, scheduler, run.scaler,
                                     (fingerprint, f"--segnet_file {args.segnet_file}"))
    run.model = wrap_ddp(obsnet, rt)
    with run.stop_flag:
        fit(observer_stage(args, spec, rt, writer, run), run, rt, writer, args.epoch, args.seed)


ATTACK_STATS = (("attack_flip_rate", "attack flip rate"),
                ("segnet_error_in_mask", "SegNet error in mask"),
                ("pasted_share", "pasted"),
                ("segnet_error_outside_mask", "outside"))


def attack_summary(writer, stats: dict, epoch: int) -> str:
    """What the attack (and the paste) did this epoch, as TensorBoard scalars (Train/...) and
    as a piece of the epoch line ("" when training on clean images)."""
    present = [(key, label) for key, label in ATTACK_STATS if key in stats]
    for key, _ in present:
        writer.add_scalar(f"Train/{key}", stats[key], epoch)
    return "".join(f", {label} {stats[key]:.1%}" for key, label in present)


def observer_stage(args, spec, rt, writer, run: ObserverRun) -> Stage:
    """The observer stage's steps for ``fit``: an epoch against the frozen SegNet (attack or
    paste as --adv says), validation error AUROC."""
    cfg = run.config
    job = ObserverJob(model=run.model, loader=run.train_loader, optimizer=run.optimizer,
                      device=rt.device, scaler=run.scaler, amp=args.amp, writer=writer,
                      progress=rt.is_main, segnet=run.segnet, criterion=run.criterion, config=cfg)

    def validate(epoch: int, stats: dict) -> tuple[float, str]:
        results, preview, _ = evaluate(run.segnet, run.net, run.val_loader, ["obsnet"], spec,
                                       rt.device, MethodConfig(), args.nclass, spec.val_split,
                                       amp=args.amp, progress=rt.is_main)
        auroc = results["methods"]["obsnet"]["error"]["auroc"]
        log_scalars(writer, results, "Val", epoch)
        log_preview(writer, preview, spec.colors, spec.mean, spec.std, "Val", epoch)
        return auroc, (f"loss {stats['loss']:.4f}, obsnet acc {stats['obsnet_acc']:.3f}"
                       f"{attack_summary(writer, stats, epoch)}, val error AUROC {auroc:.4f}")

    return Stage(lambda epoch, stop: train_observer_epoch(job, epoch, stop), validate,
                 lambda epoch, best: training_state(run.net, run.optimizer, run.scheduler,
                                                    run.scaler, epoch, best, args,
                                                    segmenter=run.segmenter_fingerprint,
                                                    observer=run.observer.record()),
                 lambda best: f"ObsNet checkpoints in {run.saver.last.parent} (best val error "
                              f"AUROC {best:.4f})")


def run_stage(args, spec) -> None:
    """Run the stage the flags ask for; only rank 0 writes the TensorBoard log and files."""
    info = init_distributed_mode()
    rt = Runtime(info, device_for(info),
                 torch.channels_last if args.channels_last else torch.contiguous_format)
    if info.world_size < args.num_nodes:
        raise UsageError(f"--num_nodes {args.num_nodes}: launch with torchrun --nnodes "
                         f"{args.num_nodes} (this run has {info.world_size} process(es))")
    stage = stage_test if args.test_only else stage_train_segnet if args.train_segnet else stage_train_obsnet
    if getattr(args, "fit_stats", False):
        stage = stage_fit_stats
    try:
        lock = start_run(args, rt)
        try:
            if not rt.is_main:
                stage(args, spec, rt, NullWriter())
                return
            run_logged(args, spec, rt, stage)
        finally:
            lock.release()
    finally:
        cleanup()


def run_logged(args, spec, rt, stage) -> None:
    """Rank 0's ``stage``: its config_<stage>.json, then the stage with its TensorBoard log.
    A run that stops (an error, a signal) before its stage has any output on disk withdraws its
    config: nothing of it is left to describe, and a rerun needs no --overwrite."""
    files = tboard_files(args)
    write_json(files.claim(files.config), vars(args), "--tboard")
    try:
        with SummaryWriter(args.tboard) as writer:
            writer.add_text("config", " ".join(sys.argv), 0)
            stage(args, spec, rt, writer)
    except BaseException:
        if not stage_outputs_exist(args):
            files.withdraw(files.config)
        raise
