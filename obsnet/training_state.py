"""The training state of a stage: optimizer and learning-rate schedule, the checkpoint dict
that --resume continues from, and its checks."""
import logging
from pathlib import Path

import torch

from obsnet.config import OptimConfig, RunConfig
from obsnet.distributed import unwrap
from obsnet.models.checkpoint import (FINGERPRINT_KEY, CheckpointError, check_same_segmenter,
                                     load_weights, recorded_fingerprint)
from obsnet.preset import preset_of
from obsnet.utils import rng_state, set_rng_state

LOG = logging.getLogger(__name__)


def make_optimizer(optim: OptimConfig, params, schedule: str = "multistep"):
    """``optim.optim`` with ``optim.lr`` (plain SGD, as the original) and a learning-rate
    schedule over ``optim.epoch`` epochs.

    "multistep": the original observer schedule, x0.2 at epoch//2 and epoch-5;
    "cosine": cosine decay over --epoch, used for the SegNet stage.
    """
    if optim.optim == "SGD":
        optimizer = torch.optim.SGD(params, lr=optim.lr)
    else:
        optimizer = torch.optim.AdamW(params, lr=optim.lr)
    if schedule == "cosine":
        return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=optim.epoch)
    # As the original: a milestone listed twice decays twice (x0.04 at once for --epoch 10).
    milestones = sorted(m for m in (optim.epoch // 2, optim.epoch - 5) if m > 0)
    return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.2)


def training_state(model, optimizer, scheduler, scaler, epoch, best, cfg: RunConfig,
                   observer: dict | None, segmenter: str | None = None) -> dict:
    """Everything needed to resume: weights, optimizer, scheduler, scaler, epoch, best metric,
    the run config as flags (``args``: ``cfg.as_flags()``) and random generator states; the
    observer's spec (``observer``: its ``ObserverSpec.record()``; None for a SegNet), which
    evaluation and inference.py run it with; the segmenter's preset (``preset``:
    ``obsnet/preset.py``), which the evaluation-only benchmarks adopt; for an
    observer, ``segmenter``: the fingerprint of the segmenter it is trained against
    (``obsnet.models.checkpoint.weights_fingerprint``), checked wherever it is loaded."""
    m = cfg.model
    state = {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
             "observer": observer, "preset": preset_of(cfg.data.name, m.model, m.width_mult,
                                                       m.nclass, cfg.data.size),
             "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
             "best": best, "rng": rng_state(),
             "args": cfg.as_flags()}
    return state | ({FINGERPRINT_KEY: segmenter} if segmenter else {})


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


def resume(path: Path, model, optimizer, scheduler, scaler,
           segmenter: tuple[str, str] | None = None) -> tuple[int, float]:
    """Load the training state file ``path`` (a ``last.pth``) into the training objects;
    returns (next epoch, best metric). ``segmenter``: (fingerprint, how messages name its file)
    of the segmenter an observer run is trained against, which must be the one it started with."""
    state = load_weights(unwrap(model), path, "--resume")
    check_training_state(state, path, optimizer)
    if segmenter is not None:
        where = f"--resume {path}"
        check_same_segmenter(recorded_fingerprint(state, where), segmenter[0], where, segmenter[1],
                             "resume with the --segnet_file this run started with, or start over "
                             "with --overwrite")
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
    LOG.info(f"Resumed from {path} at epoch {state['epoch'] + 1}")
    return state["epoch"] + 1, state["best"]
