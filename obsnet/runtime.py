"""What every stage of main.py shares: where the process runs (rank, device), rank-0 logging,
the data loaders, DDP wrapping, and the checks on the networks a stage loads."""
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from obsnet.data.loaders import build_dataset, build_loader
from obsnet.distributed import DistInfo
from obsnet.errors import UsageError

LOG = logging.getLogger(__name__)


def loader_for(args, spec, split: str, train: bool, rt=None):
    """A data loader over one split of the dataset (sharded across DDP ranks)."""
    dataset = build_dataset(spec, args.dset_folder, split, args.size, train=train,
                            scale_jitter=getattr(args, "scale_jitter", 0.0))
    if getattr(args, "cache_frames", False):
        dataset.cache_frames(progress=not rt or rt.is_main)
    return build_loader(dataset, args.bsize, train=train, num_workers=args.num_workers,
                        seed=max(args.seed, 0), distributed=bool(rt and rt.distributed),
                        skip_bad=train and args.skip_bad_samples)


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


def refuse_missing_dropout(segnet, model: str, needs: list[str]) -> None:
    """UsageError when what ``needs`` names (e.g. ["--test_multi mc_dropout"]) keeps dropout
    active in a segmenter that has no dropout layer (``FeatureTap.has_dropout``)."""
    if needs and not getattr(segnet, "has_dropout", True):
        raise UsageError(f"{needs[0]} needs dropout layers in the segmenter, and --model {model} "
                         f"has none; leave it out")


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
    """A message of rank 0 only, to the ``obsnet`` logger (the command line prints it)."""
    if rt.is_main:
        LOG.info(message)
