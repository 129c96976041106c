"""``main.py --calibrate``: Platt scaling of the observer's logit on a labelled split (the
dataset's val split by default), stored in the observer's checkpoint.

The fit minimises the mean binary cross-entropy of ``sigmoid(a * logit + b)`` against the
error protocol's targets (the segmenter wrong on a labelled pixel, as ``--test_only``
scores it), in float64, on a uniform sample of at most ``MAX_PIXELS`` of the split's pixels
(drawn with a fixed seed: the same split gives the same fit). Two parameters need no more:
the sample's standard error on ``a`` and ``b`` is far below what moves ECE. ECE and ACE are
measured before and after on every pixel of the split (two passes of ``evaluate``).
"""
import math
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import minimize
from scipy.special import expit

from obsnet.config import RunConfig
from obsnet.data.errors import DatasetError
from obsnet.errors import UsageError
from obsnet.evaluate import EvalHooks, evaluate
from obsnet.methods import MethodConfig
from obsnet.models.calibration import CALIBRATION_KEY, CalibratedObserver, read_calibration
from obsnet.models.checkpoint import CheckpointError, load_checkpoint, model_state, save_checkpoint
from obsnet.models.observer_spec import observer_path
from obsnet.models.registry import load_observed
from obsnet.runtime import loader_for, log
from obsnet.thresholds import thresholds_path

MAX_PIXELS = 1_000_000  # the fit's sample: O(1 / sqrt(n)) on a and b, 16 MB of memory
SAMPLE_SEED = 0
GRADIENT_TOLERANCE = 1e-7  # the fit's optimum: every partial derivative of the mean BCE below it


class PixelSample:
    """A uniform sample without replacement of at most ``size`` (logit, target) pixels of a
    stream, in bounded memory: each pixel draws a random key (seeded generator) and the
    ``size`` smallest keys are kept (a bottom-k sample: every subset equally likely)."""

    def __init__(self, size: int = MAX_PIXELS, seed: int = SAMPLE_SEED):
        self.size = size
        self.generator = torch.Generator().manual_seed(seed)
        self.keys = torch.empty(0)
        self.logits = torch.empty(0)
        self.targets = torch.empty(0, dtype=torch.bool)
        self.seen = 0

    def add(self, logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> None:
        """Offer the ``valid`` pixels of ``logits`` (with their bool ``targets``)."""
        logits = logits[valid].detach().float().cpu()
        targets = targets[valid].cpu()
        self.seen += logits.numel()
        keys = torch.rand(logits.numel(), generator=self.generator)
        if len(self.keys) == self.size:  # only a key below the largest kept one can enter
            enter = keys < self.keys.max()
            keys, logits, targets = keys[enter], logits[enter], targets[enter]
        keys, logits = torch.cat([self.keys, keys]), torch.cat([self.logits, logits])
        targets = torch.cat([self.targets, targets])
        if len(keys) > self.size:
            keep = torch.topk(keys, self.size, largest=False).indices
            keys, logits, targets = keys[keep], logits[keep], targets[keep]
        self.keys, self.logits, self.targets = keys, logits, targets

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(logits float64, targets float64) of the sample."""
        return self.logits.double().numpy(), self.targets.double().numpy()


def _bce(params, z, y):
    """Mean BCE of sigmoid(u * z + v) against ``y``, its gradient and Hessian in (u, v)."""
    u, v = params
    t = u * z + v
    loss = float(np.mean(np.logaddexp(0.0, t) - y * t))
    p = expit(t)
    r, w = p - y, p * (1.0 - p)
    grad = np.array([np.mean(r * z), np.mean(r)])
    hess = np.array([[np.mean(w * z * z), np.mean(w * z)], [np.mean(w * z), np.mean(w)]])
    return loss, grad, hess


def fit_platt(logits: np.ndarray, targets: np.ndarray) -> tuple[float, float]:
    """(a, b) minimising the mean BCE of ``sigmoid(a * logits + b)`` against ``targets`` (0 or
    1), unregularised, in float64. The logits are standardised for the fit (large or tiny
    logits condition it as well as unit ones) and the result mapped back. ValueError (a
    sentence) when the fit is undefined: one class only, constant logits, or logits that
    separate the classes (a would grow without bound)."""
    z, y = np.asarray(logits, np.float64), np.asarray(targets, np.float64)
    if not (0 < y.sum() < len(y)):
        raise ValueError(f"its {len(y)} sampled pixels are all "
                         f"{'errors' if y.sum() else 'correct'}: Platt scaling needs both")
    mu, sd = float(z.mean()), float(z.std())
    if not sd > 0:
        raise ValueError("the observer gives every pixel the same logit: nothing to scale")
    errors, correct = z[y > 0], z[y == 0]
    if errors.min() > correct.max() or errors.max() < correct.min():
        raise ValueError("the logits separate errors from correct pixels: the best scale is "
                         "unbounded, Platt scaling is undefined")
    zs = (z - mu) / sd
    result = minimize(lambda p: _bce(p, zs, y)[:2], np.zeros(2), jac=True,
                      hess=lambda p: _bce(p, zs, y)[2], method="trust-exact",
                      options={"gtol": 1e-9, "maxiter": 200})
    u, v = (float(x) for x in result.x)
    # the optimiser's own flag also fails when float64 rounding stops the last step: judge
    # the optimum by its gradient (of a mean loss over standardised logits: unit scale)
    stationary = np.abs(_bce(result.x, zs, y)[1]).max() < GRADIENT_TOLERANCE
    if not (stationary and math.isfinite(u) and math.isfinite(v) and abs(u) < 1e6):
        raise ValueError(f"the fit does not converge ({result.message})")
    return u / sd, v - u * mu / sd


def check_calibration_target(obsnet_file, overwrite: bool) -> Path:
    """The checkpoint --calibrate writes into (``obsnet_file``, or its folder's best.pth);
    UsageError, before any work, for a file main.py did not write as an observer checkpoint
    (no ``observer`` record: a plain state_dict) or one calibrated already without
    --overwrite. A file that cannot be read is left to the loader's error."""
    path = observer_path(obsnet_file)
    if not path.is_file():
        return path
    checkpoint = load_checkpoint(path, "--obsnet_file")
    if not (isinstance(checkpoint, dict) and isinstance(checkpoint.get("observer"), dict)):
        raise UsageError(f"--calibrate: --obsnet_file {path} records no observer (a plain "
                         f"state_dict, not written by main.py): the calibration is stored only "
                         f"in main.py's observer checkpoints; train one with main.py")
    record = read_calibration(checkpoint, f"--obsnet_file {path}")
    if record is not None and not overwrite:
        raise UsageError(f"--calibrate: --obsnet_file {path} is calibrated already (on "
                         f"{record.get('split', '?')}: a {record['a']:.4g}, b {record['b']:.4g}); "
                         f"add --overwrite to replace its calibration")
    return path


def store_calibration(path: Path, record: dict, observer: torch.nn.Module, overwrite: bool) -> None:
    """Write ``record`` under the checkpoint's calibration entry, atomically, after checking
    again that the file is the one calibrated (its weights those of ``observer``)."""
    check_calibration_target(path, overwrite)
    checkpoint = load_checkpoint(path, "--obsnet_file")
    state, mine = model_state(checkpoint), observer.state_dict()
    if state.keys() != mine.keys() or any(not torch.equal(state[k], mine[k].cpu()) for k in state):
        raise CheckpointError(f"--obsnet_file {path}: its weights changed while it was "
                              f"calibrated; run --calibrate again")
    checkpoint[CALIBRATION_KEY] = record
    save_checkpoint(path, checkpoint, "--obsnet_file")


def _error_calibration(results: dict) -> dict:
    """ECE and ACE of the observer's probability in ``evaluate``'s results."""
    error = results["methods"]["obsnet"]["error"]
    return {"ece": error["ece"], "ace": error["ace"]}


def stage_calibrate(cfg: RunConfig, spec, rt, writer) -> None:
    """--calibrate: fit Platt scaling of --obsnet_file's logit on --test_split (default the
    val split), store it in the checkpoint, print ECE and ACE before and after."""
    if rt.distributed:
        raise UsageError("--calibrate runs in one process: run it without torchrun")
    m, paths, split = cfg.model, cfg.paths, cfg.test.split
    path = observer_path(paths.obsnet_file)
    loader = loader_for(cfg.data, spec, split, False, rt, cfg.seed)
    if not getattr(loader.dataset, "labelled", True):
        raise DatasetError(f"--calibrate --test_split {split}: its labels are hidden; "
                           f"calibrate on a labelled split")
    segnet, observer, _ = load_observed(paths.obsnet_file, m.observer, m.model, m.nclass,
                                        m.width_mult, paths.segnet_file, rt.device, cfg.data.size,
                                        calibrate=False)
    sample = PixelSample()

    def scored(net, on_error=None) -> dict:
        return evaluate(segnet, net, loader, ["obsnet"], spec, rt.device, MethodConfig(),
                        m.nclass, split, amp=cfg.amp, progress=rt.is_main,
                        hooks=EvalHooks(on_error=on_error))[0]

    before = _error_calibration(scored(observer, lambda _, s, e, v: sample.add(s, e, v)))
    try:
        a, b = fit_platt(*sample.arrays())
    except ValueError as exc:
        raise DatasetError(f"--calibrate --test_split {split}: {exc}") from None
    if a <= 0:
        raise DatasetError(f"--calibrate --test_split {split}: the fitted scale is {a:.4g} <= 0 "
                           f"(the observer ranks errors below correct pixels there); not stored")
    after = _error_calibration(scored(CalibratedObserver(observer, a, b, {}).to(rt.device)))
    record = {"a": a, "b": b, "split": split, "pixels": sample.seen, "fit_pixels": len(sample.logits),
              "ece_before": before["ece"], "ece_after": after["ece"],
              "ace_before": before["ace"], "ace_after": after["ace"]}
    store_calibration(path, record, observer, paths.overwrite)
    for key in ("a", "b", "ece_before", "ece_after", "ace_before", "ace_after"):
        writer.add_scalar(f"Calibrate/{key}", record[key], 0)
    log(rt, calibration_summary(record) + f"; stored in {path}")
    if thresholds_path(paths.obsnet_file).is_file():  # fitted on the uncalibrated logit
        log(rt, f"note: {thresholds_path(paths.obsnet_file)} was fitted before this calibration; "
                f"its obsnet thresholds no longer apply: run --fit_threshold again")


def calibration_summary(record: dict) -> str:
    """One line: the fit and, where recorded, its ECE / ACE before and after."""
    a, b = record["a"], record["b"]
    line = (f"calibration on {record.get('split', '?')} ({record.get('pixels', '?')} pixels): "
            f"p = sigmoid({a:.4g} * logit {'-' if b < 0 else '+'} {abs(b):.4g}), temperature "
            f"{1 / a:.4g}")
    for name in ("ece", "ace"):
        before, after = record.get(f"{name}_before"), record.get(f"{name}_after")
        if before is not None and after is not None:
            line += f", {name.upper()} {before:.4f} -> {after:.4f}"
    return line
