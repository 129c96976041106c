"""What every streaming meter shares: the device its collectives use, and NaN for an
undefined figure."""
import torch
import torch.distributed as dist


NAN = float("nan")


def dist_device():
    """Device that collectives of the current process group accept."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
