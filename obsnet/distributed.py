"""DistributedDataParallel plumbing: process group from torchrun's variables, rank helpers."""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: rank among world_size, device index on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        """True when launched by torchrun with more than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes logs, checkpoints and results."""
        return self.rank == 0


def init_distributed_mode() -> DistInfo:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*).

    NCCL on GPU, gloo on CPU; a single process without those variables is not distributed.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return info


def in_process_group() -> bool:
    """Whether this process is one rank of a joined process group (DDP)."""
    return dist.is_available() and dist.is_initialized()


def device_for(info: DistInfo) -> torch.device:
    """This process's GPU (by local rank) or the CPU."""
    return torch.device("cuda", info.local_rank) if torch.cuda.is_available() else torch.device("cpu")


def cleanup() -> None:
    """Leave the process group if one was joined."""
    if in_process_group():
        dist.destroy_process_group()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
