"""The stages main.py runs, from a resolved run config (``obsnet.config.RunConfig``): train
the SegNet, train the observer (here: what each builds, and its steps for the one epoch loop of
``obsnet.fit``, which also saves and stops), evaluate (``eval_stages``)."""
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter

from obsnet.attacks import AttackConfig, parse_attack
from obsnet.calibration import stage_calibrate
from obsnet.config import RunConfig
from obsnet.data.class_weights import WEIGHTING_POWERS, class_frequencies, median_frequency_weights
from obsnet.data.loaders import build_dataset
from obsnet.distributed import cleanup, device_for, init_distributed_mode
from obsnet.errors import UsageError
from obsnet.eval_stages import stage_fit_stats, stage_fit_threshold, stage_test
from obsnet.evaluate import evaluate
from obsnet.fit import Saver, Stage, fit
from obsnet.losses import CRITERIA
from obsnet.methods import MethodConfig
from obsnet.models.blocks import fold_batchnorm
from obsnet.models.checkpoint import weights_fingerprint
from obsnet.models.generic import is_generic
from obsnet.models.observer_spec import ObserverSpec, new_observer_spec, resolve_observer
from obsnet.models.registry import build_observer, build_segmenter, init_from_segnet, load_segmenter
from obsnet.report import NullWriter, log_preview, log_scalars, write_json
from obsnet.run_checks import stage_outputs_exist, start_run, tboard_files
from obsnet.runtime import Runtime, loader_for, log, refuse_missing_dropout, wrap_ddp
from obsnet.signals import StopSignal
from obsnet.train import (ObserverConfig, ObserverJob, SegNetJob, make_scaler, train_observer_epoch,
                          train_segnet_epoch)
from obsnet.training_state import make_optimizer, resume, training_state


def attack_config(adv: str, epsilon: float, size, nclass: int, spec) -> AttackConfig | None:
    """The attack ``adv`` (--adv; None for "none") with step ``epsilon`` for a segmenter of
    ``nclass`` outputs at the image ``size`` (H, W: patch sizes scale with the image)."""
    parsed = parse_attack(adv)
    if parsed is None:
        return None
    factor = min(size[0] / spec.size[0], size[1] / spec.size[1])
    patch = tuple(max(1, round(v * factor)) for v in spec.patch_size)
    real = tuple(c for c in range(spec.nclass) if c != spec.void_id)
    return AttackConfig(**parsed._asdict(), epsilon=epsilon, patch_size=patch,
                        nclass=nclass, mean=spec.mean, std=spec.std, target_classes=real)


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


def stage_train_segnet(cfg: RunConfig, spec, rt, writer) -> None:
    """Train the SegNet with cross-entropy; keep the best validation mIoU in --segnet_file and
    the state of the last epoch in ``cfg.paths.segnet_last`` (for --resume)."""
    m, paths = cfg.model, cfg.paths
    train_loader = loader_for(cfg.data, spec, spec.train_split, True, rt, cfg.seed)
    val_loader = loader_for(cfg.data, spec, spec.val_split, False, rt, cfg.seed)
    segnet = build_segmenter(m.model, m.nclass, m.width_mult, backbone_weights=m.encoder_weights,
                             layers=m.observe_layers, probe_size=cfg.data.size)
    segnet = segnet.to(rt.device, memory_format=rt.memory_format)
    optimizer, scheduler = make_optimizer(cfg.optim, segnet.parameters(), schedule="cosine")
    saver = Saver("SegNet", "--segnet_file", Path(paths.segnet_file), paths.segnet_last)
    run = SegNetRun(net=segnet, model=segnet, train_loader=train_loader, val_loader=val_loader,
                    optimizer=optimizer, scheduler=scheduler, scaler=make_scaler(rt.device, cfg.amp),
                    class_weights=segnet_class_weights(cfg, spec, rt), stop_flag=StopSignal(),
                    saver=saver)
    if paths.resume:
        run.start, run.best = resume(saver.last, segnet, optimizer, scheduler, run.scaler)
    run.model = wrap_ddp(segnet, rt)
    with run.stop_flag:
        fit(segnet_stage(cfg, spec, rt, writer, run), run, rt, writer, cfg.optim.epoch, cfg.seed)


def segnet_class_weights(cfg: RunConfig, spec, rt):
    """--class_weights: None, or the (square-rooted) median-frequency weights of the training
    labels (said)."""
    weighting = cfg.optim.class_weights
    if weighting == "none":
        return None
    dataset = build_dataset(spec, cfg.data.folder, spec.train_split)
    weights = median_frequency_weights(class_frequencies(dataset, cfg.model.nclass, rt.is_main),
                                       WEIGHTING_POWERS[weighting])
    log(rt, f"{weighting} class weights: " + ", ".join(
        f"{name} {w:.2f}" for name, w in zip(spec.class_names, weights.tolist())))
    return weights


def segnet_stage(cfg: RunConfig, spec, rt, writer, run: SegNetRun) -> Stage:
    """The SegNet stage's steps for ``fit``: an epoch of cross-entropy, validation mIoU."""
    nclass = cfg.model.nclass
    job = SegNetJob(model=run.model, loader=run.train_loader, optimizer=run.optimizer,
                    device=rt.device, scaler=run.scaler, amp=cfg.amp, writer=writer,
                    progress=rt.is_main, nclass=nclass, class_weights=run.class_weights)

    def validate(epoch: int, stats: dict) -> tuple[float, str]:
        results, _, _ = evaluate(run.net, None, run.val_loader, [], spec, rt.device, MethodConfig(),
                                 nclass, spec.val_split, amp=cfg.amp, progress=rt.is_main)
        miou = results["segnet"]["miou"]
        writer.add_scalar("Val/segnet_miou", miou, epoch)
        return miou, (f"loss {stats['loss']:.4f}, train acc {stats['segnet_acc']:.3f}, "
                      f"val mIoU {miou:.3f}")

    return Stage(lambda epoch, stop: train_segnet_epoch(job, epoch, stop), validate,
                 lambda epoch, best: training_state(run.net, run.optimizer, run.scheduler,
                                                    run.scaler, epoch, best, cfg, None),
                 lambda best: f"SegNet saved to {cfg.paths.segnet_file} (best val mIoU {best:.3f})")


def stage_train_obsnet(cfg: RunConfig, spec, rt, writer) -> None:
    """Train the observer against the frozen SegNet; validate every epoch; keep best.pth."""
    m, paths, optim = cfg.model, cfg.paths, cfg.optim
    train_loader = loader_for(cfg.data, spec, spec.train_split, True, rt, cfg.seed)
    val_loader = loader_for(cfg.data, spec, spec.val_split, False, rt, cfg.seed)
    folder = Path(paths.obsnet_file)
    given = m.observer
    # --resume: the run goes on with the network it started with
    observer = resolve_observer(folder / "last.pth", given) if paths.resume \
        else new_observer_spec(given, m.model)
    segnet = load_segmenter(m.model, m.nclass, m.width_mult, paths.segnet_file, rt.device,
                            layers=observer.layers, probe_size=cfg.data.size)
    obsnet = build_observer(observer, segnet, m.nclass, m.width_mult).to(rt.device)
    refuse_missing_dropout(segnet, m.model, ["--drop"] if optim.drop else [])
    # the layers the tap reads (a generic model's default too) are recorded in the checkpoints
    observer = replace(observer, layers=getattr(segnet, "layers", None))
    segnet, obsnet = (net.to(memory_format=rt.memory_format) for net in (segnet, obsnet))
    if not (optim.no_pretrained or paths.resume or is_generic(m.model)):
        log(rt, f"ObsNet initialised from the SegNet: {init_from_segnet(obsnet, segnet)} tensors")
    fingerprint = weights_fingerprint(segnet)  # of the weights loaded, before folding
    # The frozen SegNet is never saved here: fold its batch norms (attack 18% faster, BENCHMARKS.md).
    segnet = fold_batchnorm(segnet).to(memory_format=rt.memory_format)
    optimizer, scheduler = make_optimizer(optim, obsnet.parameters())
    saver = Saver("ObsNet", "--obsnet_file", folder / "best.pth", folder / "last.pth", every=5)
    attack = attack_config(optim.adv, optim.epsilon, cfg.data.size, m.nclass, spec)
    run = ObserverRun(
        net=obsnet, model=obsnet, segnet=segnet, train_loader=train_loader, val_loader=val_loader,
        optimizer=optimizer, scheduler=scheduler, scaler=make_scaler(rt.device, cfg.amp),
        criterion=CRITERIA["focal" if optim.focal else "bce"](spec.pos_weight).to(rt.device),
        config=ObserverConfig(attack, optim.noise, optim.drop, spec.ignore_id),
        stop_flag=StopSignal(), saver=saver, segmenter_fingerprint=fingerprint, observer=observer)
    if paths.resume:
        run.start, run.best = resume(saver.last, obsnet, optimizer, scheduler, run.scaler,
                                     (fingerprint, f"--segnet_file {paths.segnet_file}"))
    run.model = wrap_ddp(obsnet, rt)
    with run.stop_flag:
        fit(observer_stage(cfg, spec, rt, writer, run), run, rt, writer, optim.epoch, cfg.seed)


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


def observer_stage(cfg: RunConfig, spec, rt, writer, run: ObserverRun) -> Stage:
    """The observer stage's steps for ``fit``: an epoch against the frozen SegNet (attack or
    paste as --adv says), validation error AUROC."""
    obs = run.config
    job = ObserverJob(model=run.model, loader=run.train_loader, optimizer=run.optimizer,
                      device=rt.device, scaler=run.scaler, amp=cfg.amp, writer=writer,
                      progress=rt.is_main, segnet=run.segnet, criterion=run.criterion, config=obs)

    def validate(epoch: int, stats: dict) -> tuple[float, str]:
        results, preview, _ = evaluate(run.segnet, run.net, run.val_loader, ["obsnet"], spec,
                                       rt.device, MethodConfig(), cfg.model.nclass,
                                       spec.val_split, amp=cfg.amp, progress=rt.is_main)
        auroc = results["methods"]["obsnet"]["error"]["auroc"]
        log_scalars(writer, results, "Val", epoch)
        log_preview(writer, preview, spec.colors, spec.mean, spec.std, "Val", epoch)
        return auroc, (f"loss {stats['loss']:.4f}, obsnet acc {stats['obsnet_acc']:.3f}"
                       f"{attack_summary(writer, stats, epoch)}, val error AUROC {auroc:.4f}")

    return Stage(lambda epoch, stop: train_observer_epoch(job, epoch, stop), validate,
                 lambda epoch, best: training_state(run.net, run.optimizer, run.scheduler,
                                                    run.scaler, epoch, best, cfg,
                                                    run.observer.record(),
                                                    segmenter=run.segmenter_fingerprint),
                 lambda best: f"ObsNet checkpoints in {run.saver.last.parent} (best val error "
                              f"AUROC {best:.4f})")


STAGE_RUNNERS = {"train_segnet": stage_train_segnet, "train_obsnet": stage_train_obsnet,
                 "test": stage_test, "fit_stats": stage_fit_stats,
                 "fit_threshold": stage_fit_threshold, "calibrate": stage_calibrate}


def run_stage(cfg: RunConfig, spec) -> None:
    """Run the stage of ``cfg``; only rank 0 writes the TensorBoard log and files. Callable
    from Python: ``cfg`` as ``obsnet.cli.resolve_config`` gives it."""
    info = init_distributed_mode()
    rt = Runtime(info, device_for(info),
                 torch.channels_last if cfg.channels_last else torch.contiguous_format)
    if info.world_size < cfg.num_nodes:
        raise UsageError(f"--num_nodes {cfg.num_nodes}: launch with torchrun --nnodes "
                         f"{cfg.num_nodes} (this run has {info.world_size} process(es))")
    stage = STAGE_RUNNERS[cfg.stage]
    try:
        lock = start_run(cfg, rt)
        try:
            if not rt.is_main:
                stage(cfg, spec, rt, NullWriter())
                return
            run_logged(cfg, spec, rt, stage)
        finally:
            lock.release()
    finally:
        cleanup()


def run_logged(cfg: RunConfig, spec, rt, stage) -> None:
    """Rank 0's ``stage``: its config_<stage>.json, then the stage with its TensorBoard log.
    A run that stops (an error, a signal) before its stage has any output on disk withdraws its
    config: nothing of it is left to describe, and a rerun needs no --overwrite."""
    files = tboard_files(cfg)
    write_json(files.claim(files.config), cfg.as_flags(), "--tboard")
    try:
        with SummaryWriter(cfg.paths.tboard) as writer:
            writer.add_text("config", " ".join(sys.argv), 0)
            stage(cfg, spec, rt, writer)
    except BaseException:
        if not stage_outputs_exist(cfg):
            files.withdraw(files.config)
        raise
