"""One epoch loop for both training stages (``fit``): train an epoch, check the weights,
validate, log, step the schedule, save, stop if asked. A ``Saver`` says where the checkpoints
go and when; a ``Stopper`` turns a stop signal into ``Interrupted`` with the resume advice and
reports the samples ``--skip_bad_samples`` left out."""
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from obsnet.distributed import unwrap
from obsnet.models.checkpoint import first_nonfinite, save_checkpoint
from obsnet.runtime import Runtime, log, set_epoch
from obsnet.signals import Interrupted, StopSignal, signal_name
from obsnet.train import TrainingStopped


@dataclass(frozen=True)
class Saver:
    """Where a stage's checkpoints go and when; rank 0 only, each file written atomically
    (``save_checkpoint``), never from a diverged network (``check``)."""

    what: str  # the network, in messages ("SegNet", "ObsNet")
    flag: str  # the flag naming the files, in write errors
    best: Path  # written when the validation metric improves
    last: Path  # written after every epoch: --resume continues from it
    every: int = 0  # also epochNNN.pth next to ``last`` every ``every`` epochs (0: never)

    def check(self, net, epoch: int) -> None:
        """FloatingPointError when ``net`` holds a NaN or infinite tensor after training
        ``epoch``: checked (one synchronisation) before validation and before anything is saved."""
        bad = first_nonfinite(unwrap(net).state_dict())
        if bad is not None:
            raise FloatingPointError(f"{self.what} training diverged: its weights hold NaN or "
                                     f"infinite values after epoch {epoch} (first: {bad}); "
                                     f"nothing of epoch {epoch} was saved (lower --lr)")

    def save(self, state: dict, epoch: int, improved: bool, is_main: bool) -> None:
        """best (when ``improved``), epochNNN every ``every`` epochs, then last."""
        if not is_main:
            return
        if improved:
            save_checkpoint(self.best, state, self.flag)
        if self.every and (epoch + 1) % self.every == 0:
            save_checkpoint(self.last.with_name(f"epoch{epoch + 1:03d}.pth"), state, self.flag)
        save_checkpoint(self.last, state, self.flag)


def improves(value: float, best: float) -> bool:
    """Whether a validation metric is worth keeping a best checkpoint for: it beats ``best``,
    or nothing was kept yet (``best`` < 0). The second case keeps a first checkpoint when the
    metric is undefined (NaN, e.g. a SegNet that made no error on the validation split)."""
    return value > best or best < 0


def stop_check(flag: StopSignal, rt: Runtime):
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


class Stopper:
    """A stage's stop signal and skipped samples: ``check`` is what the epoch worker polls;
    a stop becomes ``Interrupted``, whose message says what ``last`` holds and how to go on."""

    def __init__(self, flag: StopSignal, rt: Runtime, what: str, last: Path):
        self.flag, self.rt, self.what, self.last = flag, rt, what, last
        self.check = stop_check(flag, rt)
        self.seen: dict[str, int] = {}  # skipped sample -> times

    def train(self, train_epoch: Callable[[], dict], epoch: int) -> dict:
        """``train_epoch()``, with a stop signal in its middle turned into Interrupted and the
        samples it skipped reported."""
        try:
            stats = train_epoch()
        except TrainingStopped:
            self.summary()
            raise self.stopped_during(epoch) from None
        self.log_skipped(stats["skipped"])
        return stats

    def after(self, epoch: int) -> None:
        """Interrupted when a stop signal arrived while ``epoch`` was being finished."""
        if self.check():
            self.summary()
            raise Interrupted(self.flag.signum, f"interrupted ({signal_name(self.flag.signum)}) "
                                                f"after {self.what} epoch {epoch}: state saved to "
                                                f"{self.last}; run again with --resume to "
                                                f"continue at epoch {epoch + 1}")

    def stopped_during(self, epoch: int) -> Interrupted:
        """The exception of a stop in the middle of ``epoch``: nothing new is written, since
        ``last`` (of the previous epoch) is the exact point to restart that epoch from."""
        where = (f"interrupted ({signal_name(self.flag.signum)}) during {self.what} epoch "
                 f"{epoch}")
        if epoch == 0 or not self.last.is_file():
            return Interrupted(self.flag.signum, f"{where}: no epoch finished, nothing saved; "
                                                 f"run again without --resume to start over")
        return Interrupted(self.flag.signum, f"{where}: {self.last} holds the state after epoch "
                                             f"{epoch - 1}; run again with --resume to restart "
                                             f"epoch {epoch}")

    def log_skipped(self, skipped: list[str]) -> None:
        """Warn about the samples --skip_bad_samples left out this epoch, once each."""
        for message in skipped:
            if message not in self.seen:
                log(self.rt, f"warning: skipped unreadable sample: {message}")
            self.seen[message] = self.seen.get(message, 0) + 1

    def summary(self) -> None:
        """The run summary line of --skip_bad_samples (nothing when no sample was skipped)."""
        if self.seen:
            log(self.rt, f"skipped {len(self.seen)} unreadable sample(s) "
                         f"({sum(self.seen.values())} time(s) in all): " + "; ".join(self.seen))


@dataclass(frozen=True)
class Stage:
    """What ``fit`` asks of a stage, each epoch: train (``train_epoch(epoch, stop)``: its
    stats), validate (``validate(epoch, stats)``: the metric to keep the best of and the
    epoch line), the checkpoint (``state(epoch, best)``); and the closing line (``done(best)``).
    Its name and files are its run's ``saver``'s."""

    train_epoch: Callable[[int, Callable[[], bool]], dict]
    validate: Callable[[int, dict], tuple[float, str]]
    state: Callable[[int, float], dict]
    done: Callable[[float], str]


def fit(stage: Stage, run, rt: Runtime, writer, epochs: int, seed: int) -> float:
    """The epochs of ``run`` (``obsnet.stages.TrainingRun``) from ``run.start`` to ``epochs``,
    saved by ``run.saver``; returns the best validation metric. A stop signal ends it at the
    next step (nothing of the epoch saved) or once the epoch is saved; a diverged network ends
    it before anything is."""
    saver, what = run.saver, run.saver.what
    stopper, best, warned = Stopper(run.stop_flag, rt, what, saver.last), run.best, False
    for epoch in tqdm(range(run.start, epochs), desc=f"{what} epochs", disable=not rt.is_main):
        set_epoch(run.train_loader, epoch, seed)
        stats = stopper.train(partial(stage.train_epoch, epoch, stopper.check), epoch)
        saver.check(run.net, epoch)
        metric, line = stage.validate(epoch, stats)
        warned = log_data_wait(rt, writer, stats, epoch, warned)
        log(rt, f"{what} epoch {epoch}: {line}{unlabelled_note(stats)}")
        run.scheduler.step()
        saver.save(stage.state(epoch, max(best, metric)), epoch, improves(metric, best), rt.is_main)
        best = max(best, metric)
        stopper.after(epoch)
    log(rt, stage.done(best))
    stopper.summary()
    return best


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


def unlabelled_note(stats: dict) -> str:
    """The end of an epoch line when batches with every pixel ignored were skipped."""
    n = stats.get("unlabelled_batches", 0)
    return f" ({n} batch(es) skipped: every pixel is the ignore label)" if n else ""
