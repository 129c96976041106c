"""The stages main.py runs, from resolved command-line arguments: train the SegNet, train the
observer, evaluate; plus the run-time plumbing they share (DDP, checkpoints, stop signals)."""
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
from obsnet.cli_common import Interrupted, StopSignal, UsageError, signal_name
from obsnet.component_eval import wants_components
from obsnet.data.class_weights import WEIGHTING_POWERS, class_frequencies, median_frequency_weights
from obsnet.data.loaders import build_dataset, build_loader
from obsnet.data.synthetic import UNTOUCHED, ensure_synthetic, is_complete
from obsnet.data.synthetic import refusal as synthetic_refusal
from obsnet.distributed import DistInfo, cleanup, device_for, init_distributed_mode, unwrap
from obsnet.evaluate import evaluate
from obsnet.losses import CRITERIA
from obsnet.methods import MethodConfig, parse_methods
from obsnet.models.blocks import fold_batchnorm
from obsnet.models.generic import is_generic
from obsnet.models.checkpoint import CheckpointError, first_nonfinite, load_weights, save_checkpoint
from obsnet.models.registry import (DEFAULT_HEAD, OBSERVER_FLAGS, build_models, init_from_segnet,
                                    load_networks, merge_observer_flags, observer_record)
from obsnet.outputs import Output, OutputLock
from obsnet.preset import preset_record
from obsnet.stats import FITTED_METHODS, fit_class_stats, load_stats, save_stats, stats_path
from obsnet.report import (NullWriter, format_table, log_pr_curves, log_preview, log_scalars, write_csv,
                           write_json)
from obsnet.score_export import ScoreExport, check_export_targets
from obsnet.train import (ObserverConfig, TrainingStopped, make_scaler, train_observer_epoch,
                          train_segnet_epoch)
from obsnet.utils import rng_state, set_rng_state


def loader_for(args, spec, split: str, train: bool, rt=None):
    """A data loader over one split of the dataset (sharded across DDP ranks)."""
    dataset = build_dataset(spec, args.dset_folder, split, args.size, train=train,
                            scale_jitter=getattr(args, "scale_jitter", 0.0))
    return build_loader(dataset, args.bsize, train=train, num_workers=args.num_workers,
                        seed=max(args.seed, 0), distributed=bool(rt and rt.distributed),
                        skip_bad=train and args.skip_bad_samples)


def attack_config(args, spec):
    """The attack of --adv at the run's image size (patch sizes scale with the image)."""
    parsed = parse_attack(args.adv)
    if parsed is None:
        return None
    factor = min(args.size[0] / spec.size[0], args.size[1] / spec.size[1])
    patch = tuple(max(1, round(v * factor)) for v in spec.patch_size)
    real = tuple(c for c in range(spec.nclass) if c != spec.void_id)
    return AttackConfig(mode=parsed[0], mask=parsed[1], epsilon=args.epsilon, patch_size=patch,
                        nclass=args.nclass, mean=spec.mean, std=spec.std, target_classes=real)


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
    # As the original: a milestone listed twice decays twice (x0.04 at once for --epoch 10).
    milestones = sorted(m for m in (args.epoch // 2, args.epoch - 5) if m > 0)
    return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.2)


def training_state(model, optimizer, scheduler, scaler, epoch, best, args) -> dict:
    """Everything needed to resume: weights, optimizer, scheduler, scaler, epoch, best metric,
    resolved arguments and random generator states; the observer's architecture flags and head
    (``observer``), which evaluation and inference.py run it with; the segmenter's preset
    (``preset``: ``obsnet/preset.py``), which the evaluation-only benchmarks adopt."""
    return {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
            "observer": observer_record(args), "preset": preset_record(args),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
            "best": best, "rng": rng_state(),
            "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}}


TRAINING_STATE = ("optimizer", "epoch", "best")  # what --resume needs beyond the weights


def check_training_state(state, path: Path, optimizer) -> None:
    """CheckpointError (one line) unless ``state`` is a training state this run can resume:
    written by this program (not plain weights), with this run's --optim."""
    missing = [k for k in TRAINING_STATE if k not in state]
    if missing:
        raise CheckpointError(f"--resume {path}: holds weights but no training state "
                              f"({', '.join(missing)} missing); --resume continues from the "
                              f"last.pth a training run wrote: start over with --overwrite")
    saved = saved_optimizer(state)
    if saved not in (None, type(optimizer).__name__):
        raise CheckpointError(f"--resume {path}: this run was trained with --optim {saved}, not "
                              f"--optim {type(optimizer).__name__}; resume with --optim {saved}, "
                              f"or start over with --overwrite")


OPTIMIZER_KEYS = {"SGD": "momentum", "AdamW": "betas"}  # a hyper-parameter only each one has


def saved_optimizer(state: dict) -> str | None:
    """The --optim a training state was written with (None when it cannot be told)."""
    args = state.get("args")
    if isinstance(args, dict) and args.get("optim") in OPTIMIZER_KEYS:
        return args["optim"]
    groups = state["optimizer"].get("param_groups") if isinstance(state["optimizer"], dict) else None
    group = groups[0] if isinstance(groups, list) and groups and isinstance(groups[0], dict) else {}
    return next((name for name, key in OPTIMIZER_KEYS.items() if key in group), None)


def resume(path: Path, model, optimizer, scheduler, scaler) -> tuple[int, float]:
    """Load the training state file ``path`` (a ``last.pth``) into the training objects;
    returns (next epoch, best metric)."""
    state = load_weights(unwrap(model), path, "--resume")
    check_training_state(state, path, optimizer)
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"--resume {path}: its optimizer state does not fit this run "
                              f"({exc}); start over with --overwrite") from None
    # The learning-rate schedule follows this command's --epoch (which may extend the run):
    # the scheduler is placed after the epochs done and the rates recomputed in closed form.
    scheduler.last_epoch = state["epoch"] + 1
    for group, lr in zip(optimizer.param_groups, scheduler._get_closed_form_lr()):
        group["lr"] = lr
    if "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    if "rng" in state:
        set_rng_state(state["rng"])
    print(f"Resumed from {path} at epoch {state['epoch'] + 1}")
    return state["epoch"] + 1, state["best"]


def wrap_ddp(model, rt):
    """DistributedDataParallel around ``model`` when running under torchrun."""
    if not rt.distributed:
        return model
    ids = [rt.device.index] if rt.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def set_epoch(loader, epoch: int, seed: int) -> None:
    """The epoch's shuffle and worker seeds depend on (seed, epoch) only, so a resumed run
    reads the same batches as an uninterrupted one."""
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    if loader.generator is not None:
        loader.generator.manual_seed(max(seed, 0) * 100_003 + epoch)


def segnet_last(segnet_file) -> Path:
    """The SegNet stage's resume file: ``ckpt/segnet.pth`` -> ``ckpt/segnet.last.pth``."""
    path = Path(segnet_file)
    return path.with_name(f"{path.stem}.last{path.suffix or '.pth'}")


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


def stage_train_segnet(args, spec, rt, writer) -> None:
    """Train the SegNet with cross-entropy; keep the best validation mIoU in --segnet_file and
    the state of the last epoch in ``segnet_last(--segnet_file)`` (for --resume)."""
    train_loader = loader_for(args, spec, spec.train_split, True, rt)
    val_loader = loader_for(args, spec, spec.val_split, False, rt)
    weights = args.vgg_weights if args.model == "segnet" else args.backbone_weights
    segnet = build_models(args.model, args.nclass, args.width_mult, args.obs_mlp,
                          backbone_weights=weights, layers=args.observe_layers)[0]
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


def observer_given(args) -> dict:
    """The observer flags and head the command line asks for (head None: not given)."""
    return {flag: getattr(args, flag) for flag in OBSERVER_FLAGS} | \
        {"head": args.obs_head, "model": args.model, "layers": args.observe_layers}


def stage_train_obsnet(args, spec, rt, writer) -> None:
    """Train the observer against the frozen SegNet; validate every epoch; keep best.pth."""
    train_loader = loader_for(args, spec, spec.train_split, True, rt)
    val_loader = loader_for(args, spec, spec.val_split, False, rt)
    folder = Path(args.obsnet_file)
    given = observer_given(args)
    if args.resume:  # the run goes on with the network it started with
        recorded = merge_observer_flags(given, folder / "last.pth")
        args.obs_head, args.observe_layers = recorded["head"], recorded["layers"]
    segnet, obsnet = load_networks(args.model, args.nclass, args.width_mult, args.obs_mlp,
                                   args.segnet_file, device=rt.device,
                                   head=args.obs_head or DEFAULT_HEAD, layers=args.observe_layers)
    refuse_missing_dropout(segnet, args.model, ["--drop"] if args.drop else [])
    args.observe_layers = getattr(segnet, "layers", None)  # recorded in the checkpoints
    segnet, obsnet = (m.to(memory_format=rt.memory_format) for m in (segnet, obsnet))
    if not (args.no_pretrained or args.resume or is_generic(args.model)):
        log(rt, f"ObsNet initialised from the SegNet: {init_from_segnet(obsnet, segnet)} tensors")
    # The frozen SegNet is never saved here: fold its batch norms (attack 18% faster, BENCHMARKS.md).
    segnet = fold_batchnorm(segnet).to(memory_format=rt.memory_format)
    optimizer, scheduler = make_optimizer(args, obsnet.parameters())
    run = ObserverRun(
        net=obsnet, model=obsnet, segnet=segnet, train_loader=train_loader, val_loader=val_loader,
        optimizer=optimizer, scheduler=scheduler, scaler=make_scaler(rt.device, args.amp),
        criterion=CRITERIA["focal" if args.focal else "bce"](spec.pos_weight).to(rt.device),
        config=ObserverConfig(attack_config(args, spec), args.noise, args.drop, args.no_residual,
                              args.no_img, spec.ignore_id),
        stop_flag=StopSignal(), folder=folder, last=folder / "last.pth")
    if args.resume:
        run.start, run.best = resume(run.last, obsnet, optimizer, scheduler, run.scaler)
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
                ("segnet_error_outside_mask", "outside"))


def attack_summary(writer, stats: dict, epoch: int) -> str:
    """What the attack did this epoch, as TensorBoard scalars (Train/...) and as a piece of the
    epoch line ("" when training on clean images)."""
    if "attack_flip_rate" not in stats:
        return ""
    for key, _ in ATTACK_STATS:
        writer.add_scalar(f"Train/{key}", stats[key], epoch)
    return "".join(f", {label} {stats[key]:.1%}" for key, label in ATTACK_STATS)


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
                               max(best, auroc), args)
        save_observer(run.folder, state, epoch, improves(auroc, best), rt)
        best = max(best, auroc)
        stop_if_asked(stop, flag, rt, seen, ("ObsNet", epoch, last))
    log(rt, f"ObsNet checkpoints in {run.folder} (best val error AUROC {best:.4f})")
    skipped_summary(rt, seen)


def method_config(args, spec, observer: dict) -> MethodConfig:
    """Hyper-parameters of the uncertainty methods, from the command line, the spec and the
    observer's flags (``observer``, as its checkpoint records them)."""
    void = None if spec.void_logit is None else spec.void_logit % args.nclass
    return MethodConfig(mc_passes=args.T, temperature=args.Temp, odin_eps=args.odin_eps,
                        odin_temp=args.odin_temp, gauss_lambda=args.gauss_lambda,
                        void_class=void, sampling_score=args.sampling_score, mean=spec.mean,
                        std=spec.std, progress=True, no_residual=observer["no_residual"],
                        no_img=observer["no_img"], class_stats=class_stats_for(args))


def class_stats_for(args):
    """The --fit_stats statistics of --segnet_file when --test_multi asks for them, else None."""
    asked = getattr(args, "test_multi", None)
    wanted = [n for n in parse_methods(asked) if n in FITTED_METHODS] if asked else []
    if not wanted:
        return None
    return load_stats(stats_path(args.segnet_file), args.nclass, wanted[0])


def stage_fit_stats(args, spec, rt, writer) -> None:
    """--fit_stats: one pass of the frozen --segnet_file over the training split; writes the
    statistics of sml and mahalanobis to ``<segnet stem>.stats.pth``."""
    if rt.distributed:
        raise UsageError("--fit_stats runs in one process: run it without torchrun")
    loader = loader_for(args, spec, spec.train_split, False, rt)
    segnet = load_networks(args.model, args.nclass, args.width_mult, False, args.segnet_file,
                           device=rt.device, layers=args.observe_layers)[0]
    stats = fit_class_stats(segnet, loader, args.nclass, rt.device, spec.ignore_id,
                            progress=rt.is_main)
    path = stats_path(args.segnet_file)
    save_stats(stats, path)
    log(rt, f"statistics of {int(stats.label_counts.sum())} labelled training pixels "
            f"({stats.nclass} classes, {stats.feat_dim}-channel features) written to {path}")


def refuse_missing_dropout(segnet, model: str, needs: list[str]) -> None:
    """UsageError when what ``needs`` names (e.g. ["--test_multi mc_dropout"]) keeps dropout
    active in a segmenter that has no dropout layer (``FeatureTap.has_dropout``)."""
    if needs and not getattr(segnet, "has_dropout", True):
        raise UsageError(f"{needs[0]} needs dropout layers in the segmenter, and --model {model} "
                         f"has none; leave it out")


def load_ensemble(args, device) -> list:
    """The frozen SegNets of --ensemble (comma-separated checkpoint files)."""
    files = [f for f in args.ensemble.split(",") if f.strip()] if args.ensemble else []
    return [load_networks(args.model, args.nclass, args.width_mult, False, f.strip(),
                          device=device, segnet_label="--ensemble member")[0] for f in files]


def stage_test(args, spec, rt, writer) -> None:
    """Evaluate every method of --test_multi on the test split; table, JSON, CSV, TensorBoard
    (and --export_scores' files)."""
    if rt.distributed and wants_components(spec):  # the kept frames are not gathered across ranks
        raise UsageError(f"--test_only --data {spec.name}: the component metrics need every "
                         f"frame in one process; run it without torchrun (one process)")
    names = parse_methods(args.test_multi)
    loader = loader_for(args, spec, args.test_split, False, rt)
    export_dir = getattr(args, "export_scores", None)
    if export_dir is not None:  # refused before any work: files of an earlier export
        check_export_targets(export_dir, spec.name, names, loader.dataset.samples, args.overwrite)
    observer = observer_given(args)
    if "obsnet" in names:
        observer = merge_observer_flags(observer, args.obsnet_file)
    segnet, obsnet = load_networks(args.model, args.nclass, args.width_mult, observer["obs_mlp"],
                                   args.segnet_file, args.obsnet_file if "obsnet" in names else None,
                                   rt.device, head=observer["head"] or DEFAULT_HEAD,
                                   layers=observer["layers"])
    refuse_missing_dropout(segnet, args.model,
                           [f"--test_multi {n}" for n in names if n == "mc_dropout"])
    segnet, obsnet = (m.to(memory_format=rt.memory_format) for m in (segnet, obsnet))
    obsnet = obsnet if "obsnet" in names else None
    export = None
    if export_dir is not None and rt.is_main:
        export = ScoreExport(export_dir, spec.name, names, loader.dataset.samples)
    try:
        results, preview, meters = evaluate(
            segnet, obsnet, loader, names, spec, rt.device, method_config(args, spec, observer),
            args.nclass, args.test_split, amp=args.amp, progress=rt.is_main,
            ensemble=load_ensemble(args, rt.device), on_scores=export and export.add)
        if getattr(loader.dataset, "labelled", True):
            report_test(args, rt, writer, results, preview, meters, spec)
        else:  # nothing scored: the results files of a labelled run stay as they are
            log(rt, f"--test_split {args.test_split}: no labels, nothing scored; "
                    f"results.json and results.csv not written")
        if export is not None:
            files = export.finish()
            log(rt, f"--export_scores: {len(files)} file(s) written under "
                    f"{Path(export_dir) / 'anomaly_p'}")
    finally:
        if export is not None:
            export.discard()


def report_test(args, rt, writer, results, preview, meters, spec) -> None:
    """The test results: printed table, TensorBoard, results.json and results.csv."""
    log(rt, format_table(results))  # first: a file that cannot be written must not hide it
    log_scalars(writer, results, "Test", 0)
    log_pr_curves(writer, meters, "Test", 0)
    log_preview(writer, preview, spec.colors, spec.mean, spec.std, "Test", 0)
    if rt.is_main:
        write_json(Path(args.tboard) / "results.json", results, "--tboard")
        write_csv(Path(args.tboard) / "results.csv", results, "--tboard")
    log(rt, f"results written to {Path(args.tboard) / 'results.json'} and results.csv")


@dataclass(frozen=True)
class Runtime:
    """Where this process runs: its DDP rank and its device."""

    dist: DistInfo
    device: torch.device
    memory_format: torch.memory_format = torch.contiguous_format

    @property
    def distributed(self) -> bool:
        return self.dist.distributed

    @property
    def is_main(self) -> bool:
        return self.dist.is_main


def log(rt: Runtime, message: str) -> None:
    """Print on rank 0 only, without breaking the progress bars."""
    if rt.is_main:
        tqdm.write(message)


def stage_outputs(args) -> list[Output]:
    """The locations the stage of ``args`` writes: probed and locked before it starts."""
    outputs = [Output("--tboard", Path(args.tboard), folder=True)]
    if getattr(args, "fit_stats", False):
        return [Output("--fit_stats", stats_path(args.segnet_file), folder=False), *outputs]
    if args.test_only:
        return outputs
    if args.train_segnet:
        return [Output("--segnet_file", Path(args.segnet_file), folder=False), *outputs]
    return [Output("--obsnet_file", Path(args.obsnet_file), folder=True), *outputs]


def earlier_checkpoints(args) -> tuple[str, Path, Path, list[Path]]:
    """(flag, location, resume file, checkpoint files already there) of a training stage."""
    if args.train_segnet:
        last = segnet_last(args.segnet_file)
        files = [Path(args.segnet_file), last]
        return "--segnet_file", Path(args.segnet_file), last, [f for f in files if f.is_file()]
    folder = Path(args.obsnet_file)
    names = ["best.pth", "last.pth"] + sorted(p.name for p in folder.glob("epoch[0-9]*.pth")) \
        if folder.is_dir() else []
    return "--obsnet_file", folder, folder / "last.pth", [folder / n for n in names
                                                          if (folder / n).is_file()]


def check_earlier_run(args) -> None:
    """UsageError, before any work, when a training run would replace the checkpoints of an
    earlier run without --resume or --overwrite, or --resume has nothing to continue."""
    if getattr(args, "fit_stats", False):
        path = stats_path(args.segnet_file)
        if path.is_file() and not args.overwrite:
            raise UsageError(f"--fit_stats: {path} already exists; add --overwrite to replace it")
        return
    if args.test_only:
        return
    flag, where, last, existing = earlier_checkpoints(args)
    if args.resume and args.overwrite:
        raise UsageError(f"--resume continues the run in {where}, --overwrite starts it over: "
                         f"give one of them")
    if args.resume and not last.is_file():
        raise UsageError(f"--resume: {last} not found (no earlier run to continue); run "
                         f"without --resume to start")
    if existing and not (args.resume or args.overwrite):
        names = ", ".join(p.name for p in existing)
        raise UsageError(f"{flag} {where}: checkpoints of an earlier run are there ({names}); "
                         f"add --resume to continue that run or --overwrite to replace them")


def check_dataset_folder(args) -> None:
    """--data Synthetic writes its data only where that loses nothing (UsageError)."""
    if args.data != "Synthetic":
        return
    reason = synthetic_refusal(args.dset_folder)
    if reason is not None:
        raise UsageError(f"--dset_folder {args.dset_folder}: {reason}; {UNTOUCHED}")


def start_run(args, rt) -> OutputLock:
    """Rank 0 checks the flags against what is on disk, probes and locks the outputs and
    generates synthetic data, all before any training; then every rank learns whether that
    went well, so no rank waits for one that stopped. Returns the held lock."""
    lock, failure = OutputLock(stage_outputs(args) if rt.is_main else []), None
    try:
        if rt.is_main:
            check_earlier_run(args)
            check_dataset_folder(args)
            lock.acquire()
            if args.data == "Synthetic" and not is_complete(args.dset_folder):
                ensure_synthetic(args.dset_folder, seed=0)
    except BaseException as exc:
        lock.release()
        failure = exc
    if rt.distributed:  # also the barrier the other ranks wait at for the generated data
        ok = torch.tensor([0 if failure else 1], device=rt.device)
        torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
        if not ok.item() and failure is None:
            failure = UsageError("rank 0 could not start the run (see its message)")
    if failure is not None:
        raise failure
    return lock


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
            write_json(Path(args.tboard) / "config.json", vars(args), "--tboard")
            with SummaryWriter(args.tboard) as writer:
                writer.add_text("config", " ".join(sys.argv), 0)
                stage(args, spec, rt, writer)
        finally:
            lock.release()
    finally:
        cleanup()
