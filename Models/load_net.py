"""Model registry and checkpoint files (atomic writes, safe loads)."""
import os
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from Models.obsnet import Obsnet_Seg, Obsnet_Small
from Models.segnet import SegNet, freeze


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read or does not fit the model."""


SEGMENTERS = {"segnet": lambda nclass, width_mult: SegNet(3, nclass, width_mult=width_mult)}
OBSERVERS = {
    "segnet": lambda width_mult: Obsnet_Seg(3, 1, width_mult=width_mult),
    "segnet_small": lambda width_mult: Obsnet_Small(512, 1, width_mult=width_mult),
}


def build_models(model: str, nclass: int, width_mult: float, obs_mlp: bool):
    """Return (segnet, obsnet) for a registry name."""
    segnet = SEGMENTERS[model](nclass, width_mult)
    obsnet = OBSERVERS[f"{model}_small" if obs_mlp else model](width_mult)
    return segnet, obsnet


def save_checkpoint(path, state: dict) -> None:
    """Write ``state`` with torch.save to a temporary file, then atomically rename it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path) -> dict:
    """Load a checkpoint without executing code (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, corrupted or unsafe pickle
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: cannot be loaded as a checkpoint ({reason})") from None


def model_state(checkpoint: dict) -> dict:
    """The model weights of a full checkpoint or of a plain state_dict (original format)."""
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError("not a state_dict")
    # DataParallel / DDP checkpoints prefix every key with "module."
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_weights(model: nn.Module, path) -> dict:
    """Load weights from ``path`` into ``model`` strictly; return the whole checkpoint."""
    checkpoint = load_checkpoint(path)
    try:
        state = model_state(checkpoint)
        model.load_state_dict(state, strict=True)
    except (CheckpointError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"{path}: does not fit the {type(model).__name__} built from the "
                              f"command line ({first}); check --model, --nclass, --width_mult "
                              f"and --obs_mlp") from None
    return checkpoint


def load_networks(model: str, nclass: int, width_mult: float, obs_mlp: bool, segnet_file,
                  obsnet_file=None, device="cpu"):
    """(frozen SegNet loaded from ``segnet_file``, ObsNet) on ``device``.

    ``obsnet_file``: a checkpoint file, or a folder whose ``best.pth`` is loaded; None leaves
    the observer freshly initialised (for training).
    """
    segnet, obsnet = build_models(model, nclass, width_mult, obs_mlp)
    if not Path(segnet_file).is_file():
        raise CheckpointError(f"--segnet_file {segnet_file}: file not found "
                              f"(train one with --train_segnet)")
    load_weights(segnet, segnet_file)
    if obsnet_file is not None:
        path = Path(obsnet_file)
        load_weights(obsnet, path / "best.pth" if path.is_dir() else path)
    return freeze(segnet.to(device)), obsnet.to(device)


def init_from_segnet(obsnet: nn.Module, segnet: nn.Module) -> int:
    """Copy every SegNet tensor whose key and shape match into ``obsnet``; return the count."""
    target = obsnet.state_dict()
    matched = {k: v for k, v in segnet.state_dict().items()
               if k in target and target[k].shape == v.shape}
    obsnet.load_state_dict(matched, strict=False)
    return len(matched)
