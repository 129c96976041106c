"""An observer's calibration as its checkpoint records it (``main.py --calibrate``): Platt
scaling of its logit, ``p = sigmoid(a * logit + b)``, and the observer that applies it.

A leaf of ``obsnet.models`` (the registry wraps a calibrated observer when it loads one, so
--test_only, inference.py and the ONNX export all see the calibrated logit)."""
import math

import torch
import torch.nn as nn

from obsnet.models.checkpoint import CheckpointError

CALIBRATION_KEY = "calibration"  # the checkpoint entry --calibrate writes
# what the entry holds besides a and b (the fit's split, pixels, ECE / ACE before and after)
NUMBERS = ("pixels", "fit_pixels", "ece_before", "ece_after", "ace_before", "ace_after")


class CalibratedObserver(nn.Module):
    """``observer``'s logit scaled by ``a`` (> 0, so the ranking is unchanged) and shifted by
    ``b``; ``record`` is the checkpoint's calibration entry (for results files)."""

    def __init__(self, observer: nn.Module, a: float, b: float, record: dict):
        super().__init__()
        self.observer = observer
        self.record = dict(record)
        # buffers: they follow .to(device) and are constants of an exported graph
        self.register_buffer("a", torch.tensor(float(a), dtype=torch.float32))
        self.register_buffer("b", torch.tensor(float(b), dtype=torch.float32))

    def forward(self, *args, **kwargs):
        """The wrapped observer's logit, calibrated (same arguments, same shape)."""
        return self.observer(*args, **kwargs) * self.a + self.b


def _finite_number(value) -> bool:
    """A finite int or float (bool excluded: True is no calibration value)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_calibration(checkpoint, where: str) -> dict | None:
    """The calibration entry of a loaded checkpoint (None when it has none), each value checked
    as data: ``a`` finite and > 0, ``b`` finite, the other numbers finite when present, ``split``
    a string; otherwise a one-line CheckpointError naming ``where`` (the flag and file) and
    the entry."""
    record = checkpoint.get(CALIBRATION_KEY) if isinstance(checkpoint, dict) else None
    if record is None:
        return None
    entry = f"{where}: its '{CALIBRATION_KEY}' entry"
    if not isinstance(record, dict):
        raise CheckpointError(f"{entry} is not a mapping (a {type(record).__name__})")
    for key in ("a", "b", *NUMBERS):
        if (key in ("a", "b") or key in record) and not _finite_number(record.get(key)):
            raise CheckpointError(f"{entry}: '{key}' is not a finite number ({record.get(key)!r})")
    if record["a"] <= 0:
        raise CheckpointError(f"{entry}: 'a' must be > 0 (got {record['a']}): a calibration "
                              f"never reverses the observer's ranking")
    if not isinstance(record.get("split", ""), str):
        raise CheckpointError(f"{entry}: 'split' is not a split name")
    return record


def calibrated(observer: nn.Module, checkpoint, where: str) -> nn.Module:
    """``observer`` wrapped in its checkpoint's calibration (``read_calibration``), or as it is
    when the checkpoint records none."""
    record = read_calibration(checkpoint, where)
    if record is None:
        return observer
    return CalibratedObserver(observer, record["a"], record["b"], record)


def calibration_of(observer: nn.Module) -> dict | None:
    """The calibration entry a loaded observer applies, or None."""
    return observer.record if isinstance(observer, CalibratedObserver) else None
