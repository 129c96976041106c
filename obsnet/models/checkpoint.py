"""Checkpoint files: atomic writes, safe loads (``weights_only=True``), one-line errors.

A leaf of ``obsnet.models``: the networks import it (for their torchvision initialisations),
it imports none of them."""
import hashlib
import pickle
import pickletools
import re
from pathlib import Path

import torch
import torch.nn as nn

from obsnet.outputs import atomic_write


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read or does not fit the model."""


def save_checkpoint(path, state: dict, label: str | None = None) -> None:
    """Write ``state`` with torch.save atomically (``obsnet.outputs.atomic_write``); a failed
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


# ------------------------------------------------------------------ which segmenter a file is of

FINGERPRINT_KEY = "segmenter"  # where a derived file (observer, statistics) records its segmenter
FINGERPRINT_HEX = 16  # hex digits kept of the sha256: 64 bits


def weights_fingerprint(model: nn.Module) -> str:
    """A short hex digest of ``model``'s weights: sha256 over its state_dict's sorted keys,
    with each tensor's dtype, shape and bytes. Taken from the loaded module (before
    ``fold_batchnorm``, which changes the keys), so it is the same whichever file format,
    prefix or device the weights came from."""
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        digest.update(f"{key}\0".encode())
        if not torch.is_tensor(value):
            digest.update(f"{value!r}\0".encode())
            continue
        tensor = value.detach().to("cpu").contiguous()
        digest.update(f"{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:FINGERPRINT_HEX]


def recorded_fingerprint(checkpoint, where: str) -> str | None:
    """The segmenter fingerprint a derived file records, or None for a file without one (of
    an earlier version, or the original's plain state_dicts); CheckpointError for a value that
    is no fingerprint."""
    value = checkpoint.get(FINGERPRINT_KEY) if isinstance(checkpoint, dict) else None
    if value is None:
        return None
    if not (isinstance(value, str) and re.fullmatch(f"[0-9a-f]{{{FINGERPRINT_HEX}}}", value)):
        raise CheckpointError(f"{where}: its '{FINGERPRINT_KEY}' entry is not a segmenter "
                              f"fingerprint ({_kind(value)})")
    return value


def check_same_segmenter(recorded: str | None, fingerprint: str, where: str,
                         segmenter_where: str, remedy: str) -> None:
    """CheckpointError (one line naming both files) when the file ``where`` was made from
    another segmenter than the one loaded from ``segmenter_where``; a file that records no
    fingerprint (``recorded`` None) is accepted."""
    if recorded is not None and recorded != fingerprint:
        raise CheckpointError(f"{where}: belongs to another segmenter than {segmenter_where} "
                              f"(segmenter fingerprint {recorded} recorded, {fingerprint} "
                              f"loaded); {remedy}")
