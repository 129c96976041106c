"""The stages main.py runs, from resolved command-line arguments: train the SegNet, train the
observer (here, with their stop signals and checkpoints), evaluate (``eval_stages``)."""
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from obsnet.attacks import AttackConfig, parse_attack
from obsnet.data.class_weights import WEIGHTING_POWERS, class_frequencies, median_frequency_weights
from obsnet.data.loaders import build_dataset
from obsnet.distributed import cleanup, device_for, init_distributed_mode, unwrap
from obsnet.errors import UsageError
from obsnet.eval_stages import stage_fit_stats, stage_test
from obsnet.evaluate import evaluate
from obsnet.losses import CRITERIA
from obsnet.methods import MethodConfig
from obsnet.models.blocks import fold_batchnorm
from obsnet.models.checkpoint import first_nonfinite, save_checkpoint, weights_fingerprint
from obsnet.models.generic import is_generic
from obsnet.models.registry import (DEFAULT_HEAD, DEFAULT_INPUTS, DEFAULT_KIND, build_models,
                                    init_from_segnet, load_networks, merge_observer_flags)
from obsnet.report import NullWriter, log_preview, log_scalars, write_json
from obsnet.run_checks import stage_outputs_exist, start_run, tboard_files
from obsnet.runtime import (Runtime, loader_for, log, observer_given, refuse_missing_dropout,
                            segnet_last, set_epoch, wrap_ddp)
from obsnet.signals import Interrupted, StopSignal, signal_name
from obsnet.train import (ObserverConfig, TrainingStopped, make_scaler, train_observer_epoch,
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


def stop_check(flag: StopSignal, rt):
    """A callable true once a stop signal arrived; under DDP true on every rank as soon as
    one rank got it (so all ranks leave at the same step), and ``flag.signum`` is set."""
    if not rt.distributed:
        return flag

    def stop() -> bool:
        value = torch.tensor([flag.signum or 0], device=rt.device)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        flag.signum = int(value.item()) or None
        return flag.signum is not None
    return stop


def stopped_during(flag: StopSignal, what: str, epoch: int, last: Path) -> Interrupted:
    """The exception of a stop in the middle of ``epoch``: nothing new is written, since the
    ``last`` file of the previous epoch is the exact point to restart that epoch from."""
    where = f"interrupted ({signal_name(flag.signum)}) during {what} epoch {epoch}"
    if epoch == 0 or not last.is_file():
        return Interrupted(flag.signum, f"{where}: no epoch finished, nothing saved; "
                                        f"run again without --resume to start over")
    return Interrupted(flag.signum, f"{where}: {last} holds the state after epoch {epoch - 1}; "
                                    f"run again with --resume to restart epoch {epoch}")


def stopped_after(flag: StopSignal, what: str, epoch: int, last: Path) -> Interrupted:
    """The exception of a stop noticed once ``epoch`` was finished and saved."""
    return Interrupted(flag.signum, f"interrupted ({signal_name(flag.signum)}) after {what} "
                                    f"epoch {epoch}: state saved to {last}; run again with "
                                    f"--resume to continue at epoch {epoch + 1}")


def log_skipped(rt, skipped: list[str], seen: dict) -> None:
    """Warn about the samples --skip_bad_samples left out this epoch; ``seen`` counts them."""
    for message in skipped:
        if message not in seen:
            log(rt, f"warning: skipped unreadable sample: {message}")
        seen[message] = seen.get(message, 0) + 1


def skipped_summary(rt, seen: dict) -> None:
    """The run summary line of --skip_bad_samples (nothing when no sample was skipped)."""
    if seen:
        log(rt, f"skipped {len(seen)} unreadable sample(s) ({sum(seen.values())} time(s) in "
                f"all): " + "; ".join(seen))


def unlabelled_note(stats: dict) -> str:
    """The end of an epoch line when batches with every pixel ignored were skipped."""
    n = stats.get("unlabelled_batches", 0)
    return f" ({n} batch(es) skipped: every pixel is the ignore label)" if n else ""


def train_or_stop(train_epoch, flag: StopSignal, rt, seen: dict, where: tuple) -> dict:
    """``train_epoch()``, with a stop signal in its middle turned into Interrupted and the
    samples it skipped reported; ``where`` = (stage name, epoch, resume file)."""
    try:
        stats = train_epoch()
    except TrainingStopped:
        skipped_summary(rt, seen)
        raise stopped_during(flag, *where) from None
    log_skipped(rt, stats["skipped"], seen)
    return stats


def check_weights(net, what: str, epoch: int) -> None:
    """FloatingPointError when ``net`` holds a NaN or infinite tensor after training ``epoch``:
    checked (one synchronisation) before validation and before anything is saved."""
    bad = first_nonfinite(unwrap(net).state_dict())
    if bad is not None:
        raise FloatingPointError(f"{what} training diverged: its weights hold NaN or infinite "
                                 f"values after epoch {epoch} (first: {bad}); nothing of epoch "
                                 f"{epoch} was saved (lower --lr)")


def stop_if_asked(stop, flag: StopSignal, rt, seen: dict, where: tuple) -> None:
    """Interrupted when a stop signal arrived while the epoch ``where`` was being finished."""
    if stop():
        skipped_summary(rt, seen)
        raise stopped_after(flag, *where)


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
    last: Path  # the resume file, written after every epoch
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
    folder: Path
    segmenter_fingerprint: str  # of ``segnet`` before its batch norms were folded, recorded


def stage_train_segnet(args, spec, rt, writer) -> None:
    """Train the SegNet with cross-entropy; keep the best validation mIoU in --segnet_file and
    the state of the last epoch in ``segnet_last(--segnet_file)`` (for --resume)."""
    train_loader = loader_for(args, spec, spec.train_split, True, rt)
    val_loader = loader_for(args, spec, spec.val_split, False, rt)
    weights = args.vgg_weights if args.model == "segnet" else args.backbone_weights
    segnet = build_models(args.model, args.nclass, args.width_mult, args.obs_mlp,
                          backbone_weights=weights, layers=args.observe_layers,
                          probe_size=args.size)[0]
    segnet = segnet.to(rt.device, memory_format=rt.memory_format)
    optimizer, scheduler = make_optimizer(args, segnet.parameters(), schedule="cosine")
    run = SegNetRun(net=segnet, model=segnet, train_loader=train_loader, val_loader=val_loader,
                    optimizer=optimizer, scheduler=scheduler, scaler=make_scaler(rt.device, args.amp),
                    class_weights=segnet_class_weights(args, spec, rt), stop_flag=StopSignal(),
                    last=segnet_last(args.segnet_file))
    if args.resume:
        run.start, run.best = resume(run.last, segnet, optimizer, scheduler, run.scaler)
    run.model = wrap_ddp(segnet, rt)
    with run.stop_flag:
        _segnet_epochs(args, spec, rt, writer, run)


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


def _segnet_epochs(args, spec, rt, writer, run: SegNetRun) -> None:
    """The SegNet stage's epochs from ``run.start``: train, validate, save, stop if asked."""
    segnet, flag, last, best = run.net, run.stop_flag, run.last, run.best
    stop, seen, warned = stop_check(flag, rt), {}, False
    for epoch in tqdm(range(run.start, args.epoch), desc="SegNet epochs", disable=not rt.is_main):
        set_epoch(run.train_loader, epoch, args.seed)
        stats = train_or_stop(partial(
            train_segnet_epoch, epoch, run.model, run.train_loader, run.optimizer, args.nclass,
            rt.device, writer, rt.is_main, scaler=run.scaler, amp=args.amp, stop=stop,
            class_weights=run.class_weights), flag, rt, seen, ("SegNet", epoch, last))
        check_weights(segnet, "SegNet", epoch)
        results, _, _ = evaluate(segnet, None, run.val_loader, [], spec, rt.device, MethodConfig(),
                                 args.nclass, spec.val_split, amp=args.amp, progress=rt.is_main)
        miou = results["segnet"]["miou"]
        writer.add_scalar("Val/segnet_miou", miou, epoch)
        warned = log_data_wait(rt, writer, stats, epoch, warned)
        log(rt, f"SegNet epoch {epoch}: loss {stats['loss']:.4f}, train acc "
                f"{stats['segnet_acc']:.3f}, val mIoU {miou:.3f}{unlabelled_note(stats)}")
        run.scheduler.step()
        state = training_state(segnet, run.optimizer, run.scheduler, run.scaler, epoch,
                               max(best, miou), args)
        if rt.is_main:
            if improves(miou, best):
                save_checkpoint(args.segnet_file, state, "--segnet_file")
            save_checkpoint(last, state, "--segnet_file")
        best = max(best, miou)
        stop_if_asked(stop, flag, rt, seen, ("SegNet", epoch, last))
    log(rt, f"SegNet saved to {args.segnet_file} (best val mIoU {best:.3f})")
    skipped_summary(rt, seen)


def improves(value: float, best: float) -> bool:
    """Whether a validation metric is worth keeping a best checkpoint for: it beats ``best``,
    or nothing was kept yet (``best`` < 0). The second case keeps a first checkpoint when the
    metric is undefined (NaN, e.g. a SegNet that made no error on the validation split)."""
    return value > best or best < 0


def save_observer(folder: Path, state: dict, epoch: int, improved: bool, rt) -> None:
    """best.pth when the validation AUROC improved, epochNNN.pth every 5 epochs, last.pth."""
    if not rt.is_main:
        return
    if improved:
        save_checkpoint(folder / "best.pth", state, "--obsnet_file")
    if (epoch + 1) % 5 == 0:
        save_checkpoint(folder / f"epoch{epoch + 1:03d}.pth", state, "--obsnet_file")
    save_checkpoint(folder / "last.pth", state, "--obsnet_file")


def stage_train_obsnet(args, spec, rt, writer) -> None:
    """Train the observer against the frozen SegNet; validate every epoch; keep best.pth."""
    train_loader = loader_for(args, spec, spec.train_split, True, rt)
    val_loader = loader_for(args, spec, spec.val_split, False, rt)
    folder = Path(args.obsnet_file)
    given = observer_given(args)
    if args.resume:  # the run goes on with the network it started with
        recorded = merge_observer_flags(given, folder / "last.pth")
        args.obs_head, args.observe_layers = recorded["head"], recorded["layers"]
        args.obs_inputs, args.obs_kind = recorded["inputs"], recorded["kind"]
    segnet, obsnet = load_networks(args.model, args.nclass, args.width_mult, args.obs_mlp,
                                   args.segnet_file, device=rt.device,
                                   head=args.obs_head or DEFAULT_HEAD, layers=args.observe_layers,
                                   probe_size=args.size, inputs=args.obs_inputs or DEFAULT_INPUTS,
                                   kind=args.obs_kind or DEFAULT_KIND)
    refuse_missing_dropout(segnet, args.model, ["--drop"] if args.drop else [])
    args.observe_layers = getattr(segnet, "layers", None)  # recorded in the checkpoints
    segnet, obsnet = (m.to(memory_format=rt.memory_format) for m in (segnet, obsnet))
    if not (args.no_pretrained or args.resume or is_generic(args.model)):
        log(rt, f"ObsNet initialised from the SegNet: {init_from_segnet(obsnet, segnet)} tensors")
    fingerprint = weights_fingerprint(segnet)  # of the weights loaded, before folding
    # The frozen SegNet is never saved here: fold its batch norms (attack 18% faster, BENCHMARKS.md).
    segnet = fold_batchnorm(segnet).to(memory_format=rt.memory_format)
    optimizer, scheduler = make_optimizer(args, obsnet.parameters())
    run = ObserverRun(
        net=obsnet, model=obsnet, segnet=segnet, train_loader=train_loader, val_loader=val_loader,
        optimizer=optimizer, scheduler=scheduler, scaler=make_scaler(rt.device, args.amp),
        criterion=CRITERIA["focal" if args.focal else "bce"](spec.pos_weight).to(rt.device),
        config=ObserverConfig(attack_config(args, spec), args.noise, args.drop, args.no_residual,
                              args.no_img, spec.ignore_id),
        stop_flag=StopSignal(), folder=folder, last=folder / "last.pth",
        segmenter_fingerprint=fingerprint)
    if args.resume:
        run.start, run.best = resume(run.last, obsnet, optimizer, scheduler, run.scaler,
                                     (fingerprint, f"--segnet_file {args.segnet_file}"))
    run.model = wrap_ddp(obsnet, rt)
    with run.stop_flag:
        _observer_epochs(args, spec, rt, writer, run)


def log_data_wait(rt, writer, stats: dict, epoch: int, warned: bool) -> bool:
    """Log the share of the epoch spent waiting for data, and say it once per stage when it is
    over 10%; returns whether that was said (now or before)."""
    share = stats["data_wait_share"]
    writer.add_scalar("Time/data_wait_share", share, epoch)
    writer.add_scalar("Time/epoch_seconds", stats["seconds"], epoch)
    if share > 0.1 and not warned:
        log(rt, f"epoch {epoch}: {share:.0%} of the time went to waiting for data; more "
                f"--num_workers may help (said once; Time/data_wait_share in TensorBoard)")
        return True
    return warned


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


def _observer_epochs(args, spec, rt, writer, run: ObserverRun) -> None:
    """The observer stage's epochs from ``run.start``: train, validate, save, stop if asked."""
    segnet, obsnet, cfg, flag, last, best = (run.segnet, run.net, run.config, run.stop_flag,
                                             run.last, run.best)
    stop, seen, warned = stop_check(flag, rt), {}, False
    for epoch in tqdm(range(run.start, args.epoch), desc="ObsNet epochs", disable=not rt.is_main):
        set_epoch(run.train_loader, epoch, args.seed)
        stats = train_or_stop(partial(
            train_observer_epoch, epoch, run.model, segnet, run.train_loader, run.optimizer,
            run.criterion, rt.device, cfg, writer, rt.is_main, run.scaler, args.amp, stop=stop),
            flag, rt, seen, ("ObsNet", epoch, last))
        check_weights(obsnet, "ObsNet", epoch)
        results, preview, _ = evaluate(segnet, obsnet, run.val_loader, ["obsnet"], spec, rt.device,
                                       MethodConfig(no_residual=cfg.no_residual, no_img=cfg.no_img),
                                       args.nclass, spec.val_split,
                                       amp=args.amp, progress=rt.is_main)
        auroc = results["methods"]["obsnet"]["error"]["auroc"]
        log_scalars(writer, results, "Val", epoch)
        log_preview(writer, preview, spec.colors, spec.mean, spec.std, "Val", epoch)
        warned = log_data_wait(rt, writer, stats, epoch, warned)
        log(rt, f"ObsNet epoch {epoch}: loss {stats['loss']:.4f}, obsnet acc "
                f"{stats['obsnet_acc']:.3f}{attack_summary(writer, stats, epoch)}, "
                f"val error AUROC {auroc:.4f}{unlabelled_note(stats)}")
        run.scheduler.step()
        state = training_state(obsnet, run.optimizer, run.scheduler, run.scaler, epoch,
                               max(best, auroc), args, segmenter=run.segmenter_fingerprint)
        save_observer(run.folder, state, epoch, improves(auroc, best), rt)
        best = max(best, auroc)
        stop_if_asked(stop, flag, rt, seen, ("ObsNet", epoch, last))
    log(rt, f"ObsNet checkpoints in {run.folder} (best val error AUROC {best:.4f})")
    skipped_summary(rt, seen)


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
