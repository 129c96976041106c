"""Dataset registry and DataLoader construction."""
import atexit
import multiprocessing
import random
import signal
import sys
import threading
import time
import weakref
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, default_collate

from obsnet.data.base import PairDataset
from obsnet.data.bdd_anomaly import BddAnomaly
from obsnet.data.bravo import BRAVO
from obsnet.data.camvid import CamVid
from obsnet.data.cityscapes import Cityscapes
from obsnet.data.errors import DatasetError, WorkerDied
from obsnet.data.native import collate_native
from obsnet.data.smiyc import FishyscapesLAF, RoadAnomaly21, RoadObstacle21
from obsnet.data.specs import SPECS, DatasetSpec
from obsnet.data.street_hazard import StreetHazard
from obsnet.data.transforms import eval_transform, train_transform

__all__ = ["DATASETS", "DatasetError", "SkipBadSamples", "WatchedLoader", "build_dataset",
           "build_loader", "data_loader", "init_worker", "seed_worker"]

# name -> builder(root, split, transform, spec) -> Dataset; each builder also exposes
# read_pairs / load / splits, which obsnet.data.check uses. Synthetic shares CamVid's layout.
DATASETS: dict[str, type[PairDataset]] = {"CamVid": CamVid, "Synthetic": CamVid,
                                          "StreetHazard": StreetHazard,
                                          "BddAnomaly": BddAnomaly, "Cityscapes": Cityscapes,
                                          "RoadAnomaly21": RoadAnomaly21,
                                          "RoadObstacle21": RoadObstacle21,
                                          "FishyscapesLAF": FishyscapesLAF, "BRAVO": BRAVO}
assert set(DATASETS) <= set(SPECS), "every loader of DATASETS needs its spec in specs.SPECS"


def dataset_builder(name: str) -> type[PairDataset]:
    """The registered builder of ``name``; DatasetError for unknown or not-yet-loadable names."""
    if name in DATASETS:
        return DATASETS[name]
    if name in SPECS:
        raise DatasetError(f"dataset '{name}': loader not implemented yet "
                           f"(loadable: {', '.join(DATASETS)})")
    raise DatasetError(f"unknown dataset '{name}' (known: {', '.join(SPECS)})")


def build_dataset(spec: DatasetSpec, root: str | Path, split: str,
                  size: tuple[int, int] | None = None, train: bool = False,
                  scale_jitter: float = 0.0) -> Dataset:
    """One split of ``spec``'s dataset at ``size`` (H, W), with training or eval transforms
    (``scale_jitter``: see ``train_transform``). The evaluation of a ``test_only`` preset
    (SegmentMeIfYouCan, Fishyscapes) keeps each label at its file's resolution.

    Label ids are checked against ``spec`` as samples are read (DatasetError otherwise).
    """
    builder = dataset_builder(spec.name)
    transform = (train_transform(spec, size, scale_jitter=scale_jitter) if train
                 else eval_transform(spec, size))
    return builder(Path(root).expanduser(), split, transform, spec,
                   native_labels=bool(spec.test_only) and not train)


def seed_worker(worker_id: int) -> None:
    """Seed python and numpy in a DataLoader worker from its torch seed (base seed + id)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def init_worker(worker_id: int) -> None:
    """A DataLoader worker's start: seeded (``seed_worker``), and deaf to SIGINT and SIGTERM.

    Ctrl-C, SLURM's scancel and systemd signal the whole process group: the main process
    stops training gracefully and then shuts its workers down; a worker dying of the signal
    first would turn that stop into a crash.
    """
    seed_worker(worker_id)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    sys.excepthook = _quiet_dropped_connection


def _quiet_dropped_connection(exc_type, value, traceback) -> None:
    """A worker's uncaught exception, printed unless it is a connection the main process
    dropped: a second signal stops it at once, possibly while it was receiving a batch from
    this worker's fd-sharing thread (multiprocessing.resource_sharer, which reports through
    sys.excepthook), whose traceback would then bury the one line."""
    if not issubclass(exc_type, ConnectionError):
        sys.__excepthook__(exc_type, value, traceback)


_OUR_WORKERS: "weakref.WeakSet[multiprocessing.Process]" = weakref.WeakSet()


def remember_workers(batches) -> None:
    """Note the worker processes of a loader iterator, ours, for ``stop_leftover_workers``; the
    exit hook is registered with the first ones, after multiprocessing's own (atexit runs the
    last registered first, so ours runs before it)."""
    workers = getattr(batches, "_workers", ())
    if workers and not _OUR_WORKERS:
        atexit.unregister(stop_leftover_workers)
        atexit.register(stop_leftover_workers)
    _OUR_WORKERS.update(workers)


def stop_leftover_workers() -> None:
    """At exit, kill the DataLoader workers of our loaders still alive (no other process).

    Workers ignore SIGTERM (``init_worker``), the signal multiprocessing's exit hook stops
    them with; a loader not shut down yet (an error's traceback can keep it alive to the
    end) would otherwise make the exit wait for them forever. torch's SIGCHLD check is
    switched off first: these deaths are no error.
    """
    alive = [worker for worker in list(_OUR_WORKERS) if worker.is_alive()]
    if not alive:
        return
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for worker in alive:
        worker.kill()
        worker.join(1)


def dead_worker(batches, wait: float = 1.0) -> WorkerDied | None:
    """A WorkerDied for the first worker of the loader iterator ``batches`` that exited with
    an error (waiting up to ``wait`` seconds for a dying one to be gone); None if all live."""
    deadline = time.monotonic() + wait
    for worker in getattr(batches, "_workers", ()):
        worker.join(max(0.0, deadline - time.monotonic()))
        if worker.exitcode not in (None, 0):
            return WorkerDied(worker.pid, worker.exitcode)
    return None


class WatchedLoader(DataLoader):
    """A DataLoader whose worker deaths are one WorkerDied naming the signal.

    A worker killed (SIGKILL from the out-of-memory killer) makes torch raise whatever the
    broken pipe gave: a reset connection, an end of file, "exited unexpectedly"; the dead
    worker is then looked for and named instead.
    """

    def __iter__(self):
        batches = super().__iter__()
        remember_workers(batches)
        if self.num_workers > 0 and threading.current_thread() is threading.main_thread():
            # torch's SIGCHLD handler raises its error wherever the main thread happens to
            # be, a __del__ included ("Exception ignored in ..." and a traceback); without
            # it a death is found when a batch is awaited (within 5 s) and named below.
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except (OSError, EOFError, RuntimeError) as exc:
                died = dead_worker(batches) if self.num_workers > 0 else None
                if died is None:
                    raise
                raise died from exc
            yield batch


class ShardSampler(Sampler):
    """Evaluation under DDP: rank r reads images r, r + world, ... once each, with no padding,
    so metrics summed across ranks count every image exactly once."""

    def __init__(self, dataset: Dataset):
        self.indices = list(range(len(dataset)))[torch.distributed.get_rank()::
                                                  torch.distributed.get_world_size()]

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class SkipBadSamples(Dataset):
    """``dataset`` whose samples that raise DatasetError (unreadable or truncated image,
    invalid label, size mismatch) come back as their error message instead of a sample;
    ``collate_skipping`` leaves them out of the batch and lists them as its third element."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            return self.dataset[index]
        except DatasetError as exc:
            return str(exc)

    def __getattr__(self, name):  # list_file, samples, ... of the wrapped dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def collate_skipping(items: list) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(images, labels, messages of the skipped samples); images and labels are empty
    tensors when every sample of the batch was skipped."""
    good = [item for item in items if not isinstance(item, str)]
    skipped = [item for item in items if isinstance(item, str)]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    images, labels = default_collate(good)
    return images, labels, skipped


def _sampler(dataset: Dataset, train: bool, seed: int, distributed: bool) -> Sampler | None:
    """Under DDP: a shuffled DistributedSampler dropping the tail in training, a ShardSampler
    in evaluation; None otherwise.

    Callers must call ``loader.sampler.set_epoch(epoch)`` each training epoch for a new shuffle.
    """
    if not distributed:
        return None
    if not train:
        return ShardSampler(dataset)
    return DistributedSampler(dataset, shuffle=True, seed=seed, drop_last=True)


def _rank(distributed: bool) -> int:
    """This process's rank under DDP, 0 otherwise."""
    return torch.distributed.get_rank() if distributed else 0


def build_loader(dataset: Dataset, bsize: int, train: bool, num_workers: int = 0,
                 seed: int = 0, distributed: bool = False,
                 skip_bad: bool = False) -> DataLoader:
    """DataLoader over ``dataset``: shuffled full batches in training, ordered and complete in eval.

    Under ``distributed`` each rank reads its share: a DistributedSampler in training, a
    ShardSampler (every image exactly once over all ranks) in evaluation.
    Worker processes get seeds derived from ``seed`` (and the rank), so augmentations are
    reproducible; numpy and python are seeded per worker by ``seed_worker``, and workers
    ignore SIGINT / SIGTERM (``init_worker``); a worker's death is a WorkerDied.
    With ``skip_bad`` a sample raising DatasetError is left out of its batch (which is then
    smaller) and each batch is ``(images, labels, skipped messages)`` (see SkipBadSamples).
    A dataset with ``native_labels`` gives ``(images, padded labels, sizes)`` batches
    (``obsnet.data.native.collate_native``).
    """
    sampler = _sampler(dataset, train, seed, distributed)
    per_rank = len(sampler) if sampler is not None else len(dataset)
    if train and per_rank < bsize:
        source = getattr(dataset, "list_file", type(dataset).__name__)
        raise DatasetError(f"{source}: training split has {per_rank} image(s) per process, "
                           f"fewer than one batch of {bsize}; lower the batch size")
    generator = torch.Generator().manual_seed(seed + _rank(distributed))
    collate = None
    if getattr(dataset, "native_labels", False):
        if skip_bad:
            raise ValueError("skip_bad (training) and native-resolution labels (evaluation) "
                             "do not go together")
        collate = partial(collate_native, pad_value=dataset.spec.ignore_id)
    if skip_bad:
        dataset, collate = SkipBadSamples(dataset), collate_skipping
    return WatchedLoader(dataset, batch_size=bsize, collate_fn=collate,
                         shuffle=train and sampler is None, sampler=sampler, drop_last=train,
                         num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                         persistent_workers=num_workers > 0, worker_init_fn=init_worker,
                         generator=generator)


def data_loader(spec: DatasetSpec, root: str | Path, size: tuple[int, int] | None, bsize: int,
                num_workers: int = 0, seed: int = 0,
                distributed: bool = False) -> tuple[DataLoader, DataLoader, DataLoader]:
    """Train, validation and test loaders of ``spec`` (its train/val/test split names)."""
    loaders = []
    for split, train in ((spec.train_split, True), (spec.val_split, False),
                         (spec.test_split, False)):
        dataset = build_dataset(spec, root, split, size, train)
        loaders.append(build_loader(dataset, bsize, train, num_workers, seed, distributed))
    return tuple(loaders)
