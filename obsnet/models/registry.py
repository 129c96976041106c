"""Model registry and checkpoint files (atomic writes, safe loads)."""
import pickle
import pickletools
import re
from pathlib import Path

import torch
import torch.nn as nn

from Models.deeplab_v3plus import DeepLabV3Plus, Obsnet_DeepLab
from Models.obsnet import Obsnet_Seg, Obsnet_Small
from Models.segnet import SegNet, freeze
from Utils.outputs import atomic_write


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read or does not fit the model."""


# Segmentation networks: builder(nclass, width_mult, backbone_weights). ``backbone_weights``
# (None, "imagenet" or a torchvision state_dict file) initialises the encoder: VGG16 for the
# SegNet, ResNet-101 for DeepLabv3+.
SEGMENTERS = {
    "segnet": lambda nclass, width_mult, backbone_weights=None: SegNet(
        3, nclass, width_mult=width_mult, vgg_weights=backbone_weights),
    "deeplabv3plus": lambda nclass, width_mult, backbone_weights=None: DeepLabV3Plus(
        3, nclass, backbone_weights=backbone_weights, width_mult=width_mult),
}
# Observers: builder(width_mult, head); "<model>_small" is the --obs_mlp variant of "<model>".
# ``head`` (Models.obsnet.HEADS) is the SegNet observers' last block; DeepLab's has no tie.
OBSERVERS = {
    "segnet": lambda width_mult, head: Obsnet_Seg(3, 1, width_mult=width_mult, head=head),
    "segnet_small": lambda width_mult, head: Obsnet_Small(512, 1, width_mult=width_mult, head=head),
    "deeplabv3plus": lambda width_mult, head: Obsnet_DeepLab(3, 1, width_mult=width_mult),
}


def build_models(model: str, nclass: int, width_mult: float, obs_mlp: bool,
                 backbone_weights=None, head: str = "linear"):
    """Return (segnet, obsnet) for a registry name.

    ``backbone_weights``: None (random init), "imagenet" (torchvision download) or a
    torchvision state_dict file for the segmentation network's encoder (see SEGMENTERS).
    ``head``: the observer's last block (``Models.obsnet.HEADS``).
    """
    if model not in SEGMENTERS:
        raise ValueError(f"--model {model}: unknown (available: {', '.join(sorted(SEGMENTERS))})")
    observer = f"{model}_small" if obs_mlp else model
    if observer not in OBSERVERS:  # checked before building the (possibly large) network
        raise ValueError(f"--obs_mlp is not available with --model {model}: the light observer "
                         f"reads one SegNet map; use the default observer (drop --obs_mlp)")
    segnet = SEGMENTERS[model](nclass, width_mult, backbone_weights)
    obsnet = OBSERVERS[observer](width_mult, head)
    return segnet, obsnet


def save_checkpoint(path, state: dict, label: str | None = None) -> None:
    """Write ``state`` with torch.save atomically (``Utils.outputs.atomic_write``); a failed
    write is one line naming ``label`` (the flag) and the file, the previous file intact."""
    atomic_write(path, lambda f: torch.save(state, f), label)


def _where(path, label) -> str:
    """How messages name a checkpoint: the flag that gave it (when known), then the path."""
    return f"{label} {path}" if label else str(path)


# weights_only's words for a pickle that names a callable or class: loading it could run code
RUNS_CODE = re.compile(r"GLOBAL|allowlist|add_safe_globals")


def load_checkpoint(path, label: str | None = None) -> dict:
    """Load a checkpoint without executing code (``weights_only=True``); one-line
    CheckpointError (naming ``label``, the flag, and the file) when it cannot be."""
    path, where = Path(path), _where(path, label)
    if not path.is_file():
        raise CheckpointError(f"{where}: checkpoint file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise CheckpointError(f"{where}: cannot be read ({exc.strerror or exc})") from None
    except pickle.UnpicklingError as exc:
        if RUNS_CODE.search(str(exc)) or _names_code(path):  # objects that could run code
            raise CheckpointError(f"{where}: cannot be loaded as a checkpoint (refused: it "
                                  f"holds Python objects other than tensors, which could run "
                                  f"code)") from None
        raise CheckpointError(f"{where}: not a checkpoint (not a PyTorch file: "
                              f"{_first_line(exc)})") from None
    except Exception as exc:  # truncated, corrupted or not a PyTorch file
        raise CheckpointError(f"{where}: cannot be loaded as a checkpoint (not a readable "
                              f"PyTorch file: {_first_line(exc)})") from None


CODE_OPCODES = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX"}


def _names_code(path: Path) -> bool:
    """Whether ``path`` is a pickle that names callables or classes: read with pickletools,
    which only parses opcodes and runs nothing (weights_only stops earlier at opcodes it does
    not know, e.g. those of pickle protocol 4)."""
    try:
        with open(path, "rb") as f:
            return any(op.name in CODE_OPCODES for op, _, _ in pickletools.genops(f))
    except Exception:  # not a pickle: random bytes, another format
        return False


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type when it has none); for
    weights_only's long messages, the line that says what was found."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    detail = [line for line in lines if line.startswith("Unsupported operand")]
    return (detail or lines or [type(exc).__name__])[0]


def _kind(value) -> str:
    """"a list", "a tensor", "the number 5" ... for messages about a checkpoint's content."""
    if isinstance(value, torch.Tensor):
        return "a tensor"
    if isinstance(value, (int, float)):
        return f"the number {value}"
    return f"a {type(value).__name__}"


def model_state(checkpoint) -> dict:
    """The model weights of a full checkpoint or of a plain state_dict (original format);
    CheckpointError when it is no dict (a bare tensor, a list, ``{"model": 5}`` ...)."""
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else checkpoint
    if not isinstance(state, dict):
        what = _kind(state) if state is checkpoint else f"{_kind(state)} as its 'model'"
        raise CheckpointError(f"not a model checkpoint (it holds {what}, not a state_dict "
                              f"of weights)")
    # DataParallel / DDP checkpoints prefix every key with "module."
    return {str(k).removeprefix("module."): v for k, v in state.items()}


def first_nonfinite(state: dict) -> str | None:
    """The key of the first floating-point tensor of ``state`` holding a NaN or an infinity,
    or None. One host synchronisation."""
    keys = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point()]
    if not keys:
        return None
    finite = torch.stack([torch.isfinite(state[k]).all() for k in keys]).cpu()
    return None if bool(finite.all()) else keys[int((~finite).nonzero()[0])]


def describe_mismatch(state: dict, model: nn.Module) -> str:
    """The first difference between a state_dict and a model: a missing, unexpected or
    differently shaped tensor (both shapes given)."""
    target = model.state_dict()
    shape = lambda t: "x".join(map(str, t.shape)) or "scalar"  # noqa: E731
    for key, value in state.items():
        if key in target and not torch.is_tensor(value):
            return f"{key} is {_kind(value)} in the file, a tensor in the model"
        if key in target and value.shape != target[key].shape:
            return f"{key} is {shape(value)} in the file, {shape(target[key])} in the model"
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    if missing:
        return f"{len(missing)} tensors missing from the file, e.g. {missing[0]}"
    if unexpected:
        return f"{len(unexpected)} unexpected tensors in the file, e.g. {unexpected[0]}"
    return "tensors of another type"


def load_weights(model: nn.Module, path, label: str | None = None) -> dict:
    """Load weights from ``path`` into ``model`` strictly; return the whole checkpoint.

    One-line CheckpointError (naming ``label``, the flag, and the file) for a file without
    model weights, weights of another model, or weights holding NaN or infinite values."""
    where = _where(path, label)
    checkpoint = load_checkpoint(path, label)
    try:
        state = model_state(checkpoint)
    except CheckpointError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError:
        raise CheckpointError(f"{where}: does not fit the {type(model).__name__} built from the "
                              f"command line ({describe_mismatch(state, model)}); check --model, "
                              f"--nclass, --width_mult and --obs_mlp") from None
    bad = first_nonfinite(state)
    if bad is not None:
        raise CheckpointError(f"{where}: holds NaN or infinite weights (first: {bad}); it was "
                              f"saved from a diverged run and cannot be used")
    return checkpoint


OBSERVER_FLAGS = ("obs_mlp", "no_residual", "no_img")  # what changes how an observer is run
DEFAULT_HEAD = "linear"  # of new observers; checkpoints that record no head have the original's


def observer_path(obsnet_file) -> Path:
    """An observer checkpoint: the file itself, or a folder's ``best.pth``."""
    path = Path(obsnet_file)
    return path / "best.pth" if path.is_dir() else path


def observer_record(args) -> dict:
    """What an observer checkpoint records of how to build and run it: ``OBSERVER_FLAGS`` and
    the ``head`` (``args.obs_head``, None meaning the default)."""
    record = {flag: bool(getattr(args, flag)) for flag in OBSERVER_FLAGS}
    return record | {"head": getattr(args, "obs_head", None) or DEFAULT_HEAD}


def observer_flags(obsnet_file) -> dict | None:
    """The flags and head recorded in an observer checkpoint (see ``observer_record``), or
    None for a checkpoint that records none (the original's plain state_dicts)."""
    checkpoint = load_checkpoint(observer_path(obsnet_file))
    recorded = checkpoint.get("observer") if isinstance(checkpoint, dict) else None
    if not isinstance(recorded, dict):
        return None
    return {k: bool(recorded.get(k, False)) for k in OBSERVER_FLAGS} | \
        {"head": recorded.get("head", "original")}


def merge_observer_flags(given: dict, obsnet_file) -> dict:
    """The observer flags and head to run a checkpoint with: those it records, else ``given``
    (the command line's; a plain state_dict has the original head unless ``given["head"]``
    says otherwise). A flag given on the command line that the checkpoint was trained
    without, or another head, is a CheckpointError (exit 1): it would score with another
    network."""
    recorded = observer_flags(obsnet_file)
    path = observer_path(obsnet_file)
    if recorded is None:
        return dict(given) | {"head": given.get("head") or "original"}
    for flag in OBSERVER_FLAGS:
        if given.get(flag) and not recorded[flag]:
            raise CheckpointError(f"{path}: this observer was trained without --{flag}; drop "
                                  f"--{flag} (its checkpoint records how it was trained)")
    if given.get("head") not in (None, recorded["head"]):
        raise CheckpointError(f"{path}: this observer has the {recorded['head']} head, not "
                              f"--obs_head {given['head']}; drop --obs_head (its checkpoint "
                              f"records its head)")
    return recorded


def load_networks(model: str, nclass: int, width_mult: float, obs_mlp: bool, segnet_file,
                  obsnet_file=None, device="cpu", head: str = DEFAULT_HEAD,
                  segnet_label: str = "--segnet_file"):
    """(frozen SegNet loaded from ``segnet_file``, ObsNet with ``head``) on ``device``.

    ``obsnet_file``: a checkpoint file, or a folder whose ``best.pth`` is loaded; None leaves
    the observer freshly initialised (for training). ``segnet_label``: how messages name the
    SegNet file (the flag that gave it, e.g. "--ensemble member").
    """
    segnet, obsnet = build_models(model, nclass, width_mult, obs_mlp, head=head)
    if not Path(segnet_file).is_file():
        hint = " (train one with --train_segnet)" if segnet_label == "--segnet_file" else ""
        raise CheckpointError(f"{segnet_label} {segnet_file}: file not found{hint}")
    load_weights(segnet, segnet_file, segnet_label)
    if obsnet_file is not None:
        load_weights(obsnet, observer_path(obsnet_file), "--obsnet_file")
    return freeze(segnet.to(device)), obsnet.to(device)


def torchvision_state(source, imagenet_weights, what: str) -> tuple[dict, str]:
    """A torchvision model's state_dict, and a label saying where it came from.

    ``source``: "imagenet" downloads ``imagenet_weights`` (a torchvision ``Weights`` enum
    member) through torchvision's weights API; anything else is a file path holding a plain
    state_dict or a dict with a "model" / "state_dict" entry ("module." prefixes dropped).
    ``what`` names the expected network in error messages (e.g. "ResNet-101").
    """
    if source == "imagenet":
        try:
            state = imagenet_weights.get_state_dict(progress=False, check_hash=True)
        except Exception as exc:  # no network, proxy, interrupted download ...
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(
                f"--backbone_weights imagenet: cannot download torchvision's {what} weights "
                f"({imagenet_weights}: {reason}); download {imagenet_weights.url} on a machine "
                f"with network access and pass --backbone_weights PATH") from None
        return state, f"torchvision {imagenet_weights}"
    checkpoint = load_checkpoint(source)
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    try:
        state = model_state(checkpoint)
    except CheckpointError:
        raise CheckpointError(f"{source}: not a torchvision {what} state_dict") from None
    return state, str(source)


def init_from_segnet(obsnet: nn.Module, segnet: nn.Module) -> int:
    """Copy every SegNet tensor whose key and shape match into ``obsnet``; return the count."""
    target = obsnet.state_dict()
    matched = {k: v for k, v in segnet.state_dict().items()
               if k in target and target[k].shape == v.shape}
    obsnet.load_state_dict(matched, strict=False)
    return len(matched)
