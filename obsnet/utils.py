"""Random state: seeding, determinism, and RNG states saved in checkpoints."""
import random
import warnings

import numpy as np
import torch


MAX_SEED = 2**32 - 1  # numpy's limit
# Said once by main.py with --seed (SegNet), instead of torch's warning at every unpooling:
# torch documents max_unpool as non-deterministic only when its indices repeat.
UNPOOL_NOTE = ("note: --seed: PyTorch warns that max_unpool2d may not be deterministic (true only "
               "when its indices repeat); SegNet's come from non-overlapping 2x2 max-pooling and "
               "never repeat, so its unpooling repeats exactly on CPU and GPU")


def seed_everything(seed: int, fastest_kernels: bool = False) -> None:
    """Seed python, numpy and torch (every device) and ask for deterministic algorithms.

    ``seed < 0`` leaves everything unseeded and lets cuDNN pick the fastest kernels; so does
    ``fastest_kernels`` for a seeded run (same start, but no bit-for-bit repeat). Ops
    without a deterministic implementation warn (once) instead of failing, except
    max_unpool2d, which main.py explains itself (``UNPOOL_NOTE``).
    """
    if seed < 0:
        torch.backends.cudnn.benchmark = True
        return
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if fastest_kernels:
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.deterministic = False
        torch.use_deterministic_algorithms(False)
        return
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)
    warnings.filterwarnings("once", message=".*does not have a deterministic implementation.*")
    warnings.filterwarnings("ignore", message="max_unpool.*does not have a deterministic")


def rng_state() -> dict:
    """Python, numpy and torch (CPU and CUDA) generator states, safe for weights_only loads."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(mt), gauss], "torch": torch.get_rng_state(),
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` saved (missing parts are left as they are)."""
    if "python" in state:
        version, mt, gauss = state["python"]
        random.setstate((version, tuple(mt), gauss))
    if "numpy" in state:
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


AMP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def amp_dtype(device: torch.device, amp) -> torch.dtype | None:
    """The autocast dtype of an ``--amp`` value: None/False (off); True or "auto" (the
    device's default: float16 on GPU, bfloat16 on CPU); "float16" or "bfloat16"."""
    if amp is None or amp is False:
        return None
    if amp is True or amp == "auto":
        return torch.float16 if device.type == "cuda" else torch.bfloat16
    return AMP_DTYPES[amp]


def autocast(device: torch.device, amp):
    """Mixed precision in the dtype of ``amp_dtype(device, amp)``; off when that is None."""
    dtype = amp_dtype(device, amp)
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)
