"""One training epoch: of the observer against the frozen SegNet, or of the SegNet itself."""
import time
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from obsnet.attacks import AttackConfig, perturb
from obsnet.data.errors import DatasetError
from obsnet.distributed import in_process_group
from obsnet.utils import amp_dtype, autocast


@dataclass(frozen=True)
class ObserverConfig:
    """What an observer training step needs beyond the networks (from the command line)."""

    attack: AttackConfig | None  # None: train on clean images (--adv none)
    noise: float = 0.0  # std of Gaussian noise added to the inputs (--noise)
    drop: bool = False  # dropout active in the SegNet (--drop)
    ignore_id: int | None = None  # label of pixels that count nowhere (spec.ignore_id)


@dataclass(frozen=True, kw_only=True)
class EpochJob:
    """What a training epoch works with: the network that takes the steps, its data and how."""

    model: nn.Module  # trained (wrapped for DDP when distributed)
    loader: Iterable
    optimizer: torch.optim.Optimizer
    device: torch.device
    scaler: torch.amp.GradScaler | None = None  # None: a disabled one (float32, bfloat16)
    amp: bool | str = False  # autocast (``obsnet.utils.autocast``)
    writer: object = None  # a TensorBoard SummaryWriter, or None
    progress: bool = True  # the epoch's progress bar
    log_every: int = 10  # steps between loss logs (and non-finite checks)
    lr_name: str = "--lr"  # how a divergence message names the learning rate (``NonFinite``)


@dataclass(frozen=True, kw_only=True)
class SegNetJob(EpochJob):
    """A SegNet epoch: cross-entropy over ``nclass`` classes, weighted by ``class_weights``."""

    nclass: int
    class_weights: torch.Tensor | None = None


@dataclass(frozen=True, kw_only=True)
class ObserverJob(EpochJob):
    """An observer epoch against the frozen ``segnet``."""

    segnet: nn.Module
    criterion: nn.Module
    config: ObserverConfig


def make_scaler(device: torch.device, amp) -> torch.amp.GradScaler:
    """A GradScaler, active for float16 autocast (on any device: float16 gradients underflow
    without it); bfloat16 has float32's range and needs none."""
    return torch.amp.GradScaler(device.type, enabled=amp_dtype(device, amp) == torch.float16)


def _step(loss, optimizer, scaler) -> None:
    """Backward and optimizer step through the (possibly disabled) GradScaler."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


ATTACK_COUNTS = 6  # see observer_step


class TrainingStopped(Exception):
    """``stop()`` became true after an optimizer step: the epoch was left unfinished."""

    def __init__(self, epoch: int, step: int):
        super().__init__(f"stopped at epoch {epoch}, after step {step}")
        self.epoch, self.step = epoch, step


def _unpack(batch, skipped: list):
    """(images, labels) of a batch; a third element (``--skip_bad_samples``) lists the
    messages of the samples left out, appended to ``skipped``."""
    if len(batch) > 2:
        skipped.extend(batch[2])
    return batch[0], batch[1]


class NonFinite:
    """Where the first non-finite loss of an epoch happened, kept on the device: ``update``
    runs every step without a host synchronisation, ``check`` synchronises once (at log points
    and at the end of the epoch, before anything is saved) and raises FloatingPointError.

    Under DDP the end-of-epoch check takes the earliest step over the ranks, so that every
    rank stops together. ``lr_name``: how the message names the learning rate (the command
    line's flag, or the Python API's setting).
    """

    NONE = 2 ** 62  # no non-finite loss yet

    def __init__(self, tag: str, epoch: int, device, lr_name: str = "--lr"):
        self.tag, self.epoch, self.lr_name = tag, epoch, lr_name
        self.first = torch.full((), self.NONE, dtype=torch.int64, device=device)
        self.value = torch.zeros((), dtype=torch.float32, device=device)

    def update(self, loss: torch.Tensor, step: int) -> None:
        """Record ``step`` if ``loss`` is the first non-finite loss (device-side only)."""
        loss = loss.detach().float()
        new = ~torch.isfinite(loss) & (self.first == self.NONE)
        self.first = torch.where(new, step, self.first)
        self.value = torch.where(new, loss, self.value)

    def check(self, all_ranks: bool = False) -> None:
        """FloatingPointError naming the epoch and step of the first non-finite loss."""
        first = self.first
        if all_ranks and in_process_group():
            first = first.clone()
            torch.distributed.all_reduce(first, op=torch.distributed.ReduceOp.MIN)
        step = int(first.item())
        if step == self.NONE:
            return
        value = self.value.item() if step == int(self.first.item()) else "not finite"
        raise FloatingPointError(
            f"{self.tag} training diverged: the loss is {value} at epoch {self.epoch}, step "
            f"{step}; nothing of epoch {self.epoch} was saved (lower {self.lr_name})")


def observer_step(images, labels, segnet, obsnet, criterion, cfg: ObserverConfig):
    """Perturbation (paste and / or attack, ``obsnet.attacks.perturb``), SegNet forward on the
    perturbed images, error map, observer forward.

    The error map is ``pred != label``, and 1 on pasted pixels whatever the SegNet predicts
    there (an unseen object: the SegNet cannot be right); pasted pixels are never ignored.
    Returns (loss, error map, logits, attack counts): the counts are a float64 tensor of
    (attacked pixels, of them flipped by the attack, SegNet errors inside the mask, pixels
    outside the mask and the pasted object, SegNet errors there, pasted pixels), over labelled
    pixels; zeros without a perturbation. The attack's mask never holds pasted pixels.
    """
    if cfg.noise > 0:
        images = images + cfg.noise * torch.randn_like(images)
    attack = pasted = None
    if cfg.attack is not None:
        images, attack, pasted = perturb(images, labels, segnet, cfg.attack)
    with torch.no_grad():
        feats = segnet(images, mc_drop=cfg.drop, return_feat=True)
        pred = feats[-1].argmax(dim=1)
        error = (pred != labels).float()
        if pasted is not None:
            error = error.masked_fill(pasted, 1.0)
    logits = obsnet(images, feats).squeeze(1)
    valid = None if cfg.ignore_id is None else labels != cfg.ignore_id
    if valid is not None and pasted is not None:
        valid = valid | pasted
    counts = attack_counts(attack, pred, error, valid, pasted)
    if valid is None:
        return criterion(logits.float(), error), error, logits, counts
    return criterion(logits.float()[valid], error[valid]), error, logits, counts


@torch.no_grad()
def attack_counts(attack, pred, error, valid, pasted=None) -> torch.Tensor:
    """(attacked, flipped, errors inside, outside, errors outside, pasted) pixel counts; see
    ``observer_step``. Flipped: the SegNet's class after the attack differs from before.
    Outside: neither attacked nor pasted."""
    if attack is None and pasted is None:
        return error.new_zeros(ATTACK_COUNTS, dtype=torch.float64)
    none = torch.zeros_like(error, dtype=torch.bool)
    inside = attack.mask[:, 0] > 0 if attack is not None else none
    outside = ~inside
    if pasted is not None:
        inside, outside = inside & ~pasted, outside & ~pasted
    if valid is not None:
        inside, outside = inside & valid, outside & valid
    flipped = (pred != attack.pred_before) & inside if attack is not None else none
    n_pasted = (pasted if pasted is not None else none).sum()
    return torch.stack([inside.sum(), flipped.sum(), (error.bool() & inside).sum(),
                        outside.sum(), (error.bool() & outside).sum(), n_pasted]).double()


def _run_epoch(job: EpochJob, tag: str, epoch: int, batch_loss, has_target, stop) -> dict:
    """The loop both stages share: ``batch_loss(images, labels)`` returns the loss and a
    tensor of counts (observer correct, SegNet correct, pixels, then the attack's counts of
    ``observer_step`` for the observer); backward through the GradScaler, sums
    kept on the device, ``.item()`` only every ``job.log_every`` steps. The summary also gives
    the epoch's ``seconds`` and the part spent waiting for the loader (``data_wait``, ``_share``).

    A batch where ``has_target(labels)`` (on the CPU labels: no device sync) is false, every
    pixel ignored, is skipped (its loss would be NaN) and counted (``unlabelled_batches``);
    under DDP it still takes part in the step, with zero gradients from this rank. An epoch
    without any optimizer step is a DatasetError, raised before anything is saved.
    ``stop``: a callable checked after every optimizer step; when true, TrainingStopped."""
    device, loader, optimizer = job.device, job.loader, job.optimizer
    scaler = job.scaler or make_scaler(device, False)
    # loss, observer correct, SegNet correct, pixels, the attack's counts (zeros for the SegNet)
    totals = torch.zeros(4 + ATTACK_COUNTS, device=device, dtype=torch.float64)
    nonfinite = NonFinite(tag, epoch, device, job.lr_name)
    skipped: list[str] = []
    bar = tqdm(loader, desc=f"{tag} epoch {epoch}", leave=False, disable=not job.progress)
    clock = {"data_wait": 0.0, "start": time.perf_counter()}
    steps = unlabelled = 0
    for step, batch in enumerate(_timed_batches(bar, clock)):
        images, labels = _unpack(batch, skipped)
        if len(images) == 0:
            continue
        labelled = has_target(labels)
        if not labelled:
            unlabelled += 1
            if not in_process_group():
                continue
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast(device, job.amp):
            loss, counts = batch_loss(images, labels)
        if not labelled:
            # Under DDP every rank must take part in each step's gradient all-reduce: this
            # rank adds zero gradients (the NaN loss of an empty selection made 0) and steps.
            _step(loss.nan_to_num(0.0) * 0.0, optimizer, scaler)
            continue
        steps += 1
        _step(loss, optimizer, scaler)
        totals[: 1 + len(counts)] += torch.cat([loss.detach().double().view(1), counts.double()])
        nonfinite.update(loss, step)
        if step % job.log_every == 0:
            nonfinite.check()
            _log_step(job.writer, bar, f"Train/{tag.lower()}_loss", loss, epoch * len(loader) + step)
        if stop is not None and stop():
            raise TrainingStopped(epoch, step)
    nonfinite.check(all_ranks=True)
    if steps == 0:
        raise _no_step_error(tag, epoch, loader, skipped, unlabelled)
    seconds = time.perf_counter() - clock["start"]
    return {**_epoch_summary(totals, steps), "skipped": skipped, "unlabelled_batches": unlabelled,
            "seconds": seconds,
            "data_wait": clock["data_wait"], "data_wait_share": clock["data_wait"] / max(seconds, 1e-9)}


def _no_step_error(tag: str, epoch: int, loader, skipped: list, unlabelled: int) -> DatasetError:
    """The error of an epoch that made no optimizer step: every batch was left out."""
    source = getattr(getattr(loader, "dataset", None), "list_file", "the training split")
    example = f"; first: {skipped[0]}" if skipped else ""
    return DatasetError(f"{source}: {tag} epoch {epoch} made no training step, every batch was "
                        f"left out ({len(skipped)} unreadable sample(s) skipped, {unlabelled} "
                        f"batch(es) with every pixel ignored); nothing saved{example}")


def _timed_batches(batches, clock: dict):
    """Yield from ``batches``, adding to ``clock["data_wait"]`` the seconds spent waiting for
    each batch: near 0 when the loader's workers keep ahead of the training step."""
    iterator = iter(batches)
    while True:
        start = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            return
        clock["data_wait"] += time.perf_counter() - start
        yield batch


def train_observer_epoch(job: ObserverJob, epoch: int, stop=None) -> dict:
    """Train the observer for one epoch; returns mean loss, accuracies and ``skipped`` (the
    messages of unreadable samples left out by ``--skip_bad_samples``).

    ``stop``: a callable checked after every optimizer step; when true, TrainingStopped.
    """
    job.model.train()
    job.segnet.eval()

    def batch_loss(images, labels):
        loss, error, logits, attacked = observer_step(images, labels, job.segnet, job.model,
                                                      job.criterion, job.config)
        with torch.no_grad():
            counts = torch.stack([((logits > 0).float() == error).sum().double(),
                                  (error == 0).sum().double(),
                                  error.new_tensor(error.numel(), dtype=torch.float64)])
        return loss, torch.cat([counts, attacked])

    return _run_epoch(job, "ObsNet", epoch, batch_loss,
                      partial(_has_pixel_besides, job.config.ignore_id), stop)


def train_segnet_epoch(job: SegNetJob, epoch: int, stop=None) -> dict:
    """Train the SegNet with cross-entropy for one epoch (labels outside the classes ignored),
    weighted per class by ``job.class_weights`` (a tensor of ``nclass`` weights) when given.

    ``stop`` and the ``skipped`` entry of the result: as in ``train_observer_epoch``.
    """
    job.model.train()
    nclass = job.nclass
    weight = None if job.class_weights is None else job.class_weights.to(job.device)

    def batch_loss(images, labels):
        target = labels.masked_fill((labels < 0) | (labels >= nclass), -100)
        logits = job.model(images)
        loss = F.cross_entropy(logits.float(), target, weight=weight, ignore_index=-100)
        with torch.no_grad():
            valid = target >= 0
            correct = ((logits.argmax(1) == target) & valid).sum()
            counts = torch.stack([correct, correct, valid.sum()]).double()
        return loss, counts

    return _run_epoch(job, "SegNet", epoch, batch_loss,
                      lambda labels: bool(((labels >= 0) & (labels < nclass)).any()), stop)


def _has_pixel_besides(ignore_id: int | None, labels: torch.Tensor) -> bool:
    """Whether the observer has a pixel to learn from: one whose label is not ``ignore_id``."""
    return ignore_id is None or bool((labels != ignore_id).any())


def _log_step(writer, bar, tag, loss, global_step):
    value = loss.item()
    bar.set_postfix(loss=f"{value:.4f}")
    if writer is not None:
        writer.add_scalar(tag, value, global_step)


def _share(part: float, whole: float) -> float:
    return part / whole if whole > 0 else float("nan")


def _epoch_summary(totals: torch.Tensor, n_steps: int) -> dict:
    """Reduce across DDP ranks and turn the running sums into means and shares.

    With the attack's counts: ``attack_flip_rate`` (share of attacked pixels whose SegNet class
    the attack changed), ``segnet_error_in_mask`` and ``segnet_error_outside_mask`` (outside
    the mask and the pasted object); with a paste, ``pasted_share`` (share of the observer's
    training pixels that are pasted, all errors) and ``segnet_error_outside_mask``.
    """
    if in_process_group():
        steps = torch.tensor([float(n_steps)], dtype=torch.float64, device=totals.device)
        torch.distributed.all_reduce(totals)
        torch.distributed.all_reduce(steps)  # ranks may have skipped different batches
        n_steps = int(steps.item())
    loss, obs_ok, seg_ok, pixels, *attack = totals.tolist()
    out = {"loss": loss / max(n_steps, 1), "obsnet_acc": obs_ok / max(pixels, 1),
           "segnet_acc": seg_ok / max(pixels, 1)}
    if not attack:
        return out
    inside, flipped, err_in, outside, err_out, pasted = attack
    if inside > 0:
        out.update(attack_flip_rate=flipped / inside, segnet_error_in_mask=err_in / inside)
    if pasted > 0:
        out.update(pasted_share=pasted / (inside + outside + pasted))
    if inside > 0 or pasted > 0:
        out.update(segnet_error_outside_mask=_share(err_out, outside))
    return out
