"""The segmenter's preset, recorded in its checkpoint, adopted wherever the checkpoint is used.

A checkpoint written by a training stage records ``preset``: the training data, the model,
its width, its classes (count and names), its normalisation (mean, std) and its image size.
``--test_only`` on RoadAnomaly21 / RoadObstacle21 / FishyscapesLAF then needs nothing more
than ``--segnet_file`` (``adopt_segmenter_preset``), and so do ``python -m obsnet.export`` and
``inference.py`` on any data (``adopt_recorded_preset``): the model, width, classes and
normalisation come from it, and the size unless ``--size`` is given. Checkpoints of earlier
versions record only their resolved ``args``; the preset is rebuilt from those and the spec
of their ``--data``. A plain state_dict records nothing: the command line's flags apply.

A checkpoint is data: every recorded field is checked before use (``check_preset``), and its
model may only be one of this package's or torchvision's; a ``package.module:factory`` is
used only when the command line itself names it (``check_recorded_model``): a checkpoint never
chooses code to run.
"""
import math
import re
from dataclasses import replace
from pathlib import Path
from typing import Mapping

from obsnet.data.specs import (BENCHMARK_SPLITS, SPECS, UNLABELLED_PRESETS, DatasetSpec,
                               anomaly_benchmark)
from obsnet.errors import UsageError
from obsnet.model_flags import MIN_SIDE
from obsnet.models.checkpoint import CheckpointError, load_checkpoint
from obsnet.models.generic import TORCHVISION, torchvision_segmenters
from obsnet.models.registry import SEGMENTERS

ARCHITECTURE = ("model", "width_mult", "nclass")  # flags the recorded network dictates
MAX_NCLASS = 1024  # more classes than any segmentation dataset has: a recorded count above is junk
MAX_SIDE = 16384  # the largest recorded image side taken (the ONNX graph's own limit)
MAX_WIDTH = 8.0  # the widest recorded network built (8x the original's channels: GBs of weights)
# package.module:factory, as data: dotted Python names, one colon
USER_FACTORY = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")


def preset_of(data: str, model: str, width_mult: float, nclass: int, size) -> dict:
    """The preset of a segmenter trained on ``data`` (its spec's names, mean and std)."""
    return {"data": data, "model": model, "width_mult": float(width_mult), "nclass": int(nclass),
            **_spec_fields(data, nclass), "size": list(size or SPECS[data].size)}


def _spec_fields(data: str, nclass: int) -> dict:
    """The class names (the spec's, then "class N" up to ``nclass``), mean and std of ``data``."""
    spec = SPECS[data]
    names = list(spec.class_names) + [f"class {i}" for i in range(spec.nclass, nclass)]
    return {"class_names": names[:nclass], "mean": list(spec.mean), "std": list(spec.std)}


# ------------------------------------------------------------------------ checks of a record

def is_builtin_model(model: str) -> bool:
    """This package's segmenters and torchvision's own (``torchvision:<name>`` of its list):
    the model specs that run no code but the installed packages'."""
    if model in SEGMENTERS:
        return True
    return model.startswith(TORCHVISION) and model[len(TORCHVISION):] in torchvision_segmenters()


def _shown(value) -> str:
    """A recorded value as messages show it (short: a hostile file may hold anything)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _numbers(value, count: int) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == count and all(map(_is_number, value))


def preset_problem(preset: dict) -> tuple[str, str] | None:
    """(field, what it should be) of the first invalid field of a recorded preset, or None."""
    data, nclass = preset.get("data"), preset.get("nclass")
    if not (isinstance(data, str) and data in SPECS and not SPECS[data].test_only):
        return "data", "one of the training presets " + ", ".join(
            name for name, spec in SPECS.items() if not spec.test_only)
    model = preset.get("model")
    if not (isinstance(model, str) and (is_builtin_model(model) or (
            not model.startswith(TORCHVISION) and USER_FACTORY.fullmatch(model)))):
        return "model", (f"{', '.join(sorted(SEGMENTERS))}, torchvision:<name> of torchvision's "
                         f"segmentation models, or package.module:factory")
    if not (_is_number(preset.get("width_mult")) and 0 < preset["width_mult"] <= MAX_WIDTH):
        return "width_mult", f"a number above 0, at most {MAX_WIDTH:g}"
    if not (_is_int(nclass) and SPECS[data].nclass <= nclass <= MAX_NCLASS):
        return "nclass", f"an integer in {SPECS[data].nclass}..{MAX_NCLASS}"
    size = preset.get("size")
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(map(_is_int, size))
            and all(MIN_SIDE <= side <= MAX_SIDE for side in size)):
        return "size", f"two integers in {MIN_SIDE}..{MAX_SIDE}"
    if not _numbers(preset.get("mean"), 3):
        return "mean", "three finite numbers"
    if not (_numbers(preset.get("std"), 3) and all(s > 0 for s in preset["std"])):
        return "std", "three finite numbers above 0"
    names = preset.get("class_names")
    if not (isinstance(names, (list, tuple)) and len(names) == nclass
            and all(isinstance(n, str) for n in names)):
        return "class_names", f"{nclass} strings (one per class)"
    return None


def check_preset(preset: dict, where: str, entry: str = "preset") -> dict:
    """``preset`` when every field is valid data; else a CheckpointError naming the file
    (``where``), the checkpoint's ``entry`` and the field."""
    problem = preset_problem(preset)
    if problem is not None:
        field, expected = problem
        raise CheckpointError(f"{where}: its recorded {entry} has an invalid {field} "
                              f"({_shown(preset.get(field))}; expected {expected})")
    return preset


def _preset_from_args(flags: dict, where: str) -> dict:
    """The preset of a checkpoint of an earlier version, rebuilt from its resolved ``args``
    (each field checked before it is used)."""
    data, nclass = flags.get("data"), flags.get("nclass")
    raw = {"data": data, "model": flags.get("model", "segnet"),
           "width_mult": flags.get("width_mult", 1.0), "nclass": nclass}
    if isinstance(data, str) and data in SPECS and _is_int(nclass) and 0 <= nclass <= MAX_NCLASS:
        raw |= _spec_fields(data, nclass) | {"size": flags.get("size") or list(SPECS[data].size)}
    check_preset(raw, where, "args")  # data and nclass are checked before what they give
    return preset_of(data, raw["model"], raw["width_mult"], nclass, raw["size"])


def recorded_preset(segnet_file, label: str = "--segnet_file") -> dict | None:
    """The preset a segmenter checkpoint records (checked: ``check_preset``), rebuilt from its
    ``args`` for checkpoints of earlier versions; None for a file without either (a plain
    state_dict)."""
    checkpoint = load_checkpoint(segnet_file, label)
    where = f"{label} {segnet_file}"
    if not isinstance(checkpoint, dict):
        return None
    if isinstance(checkpoint.get("preset"), dict):
        return check_preset(checkpoint["preset"], where)
    flags = checkpoint.get("args")
    if isinstance(flags, dict) and "data" in flags and "nclass" in flags:
        return _preset_from_args(flags, where)
    return None


def check_recorded_model(preset: dict, given: str, explicit, segnet_file) -> None:
    """UsageError when the recorded model is a user's factory (``package.module:factory``) that
    the command line does not name itself (``explicit``: the flags given; ``given``: its
    --model): a checkpoint never chooses code to run."""
    model = preset["model"]
    if is_builtin_model(model) or ("model" in explicit and given == model):
        return
    raise UsageError(f"--segnet_file {segnet_file} records --model {model}, a user factory: a "
                     f"checkpoint never chooses code to run; pass --model {model} yourself if "
                     f"you trust it")


# ------------------------------------------------------------------------------- adoption

def adopted_architecture(given: Mapping, explicit, preset: dict) -> dict:
    """The flags the checked ``preset`` dictates: ``model``, ``width_mult``, ``nclass``, and
    ``size`` unless given. ``given``: the command line's values (``--segnet_file`` among them);
    a flag of ``explicit`` that contradicts the preset is a UsageError."""
    segnet_file = given["segnet_file"]
    for flag in ARCHITECTURE:
        if flag in explicit and given[flag] != preset[flag]:
            hint = (f"leave --{flag} out" if flag != "model" or is_builtin_model(preset[flag])
                    else f"pass --model {preset[flag]} if you trust it")
            raise UsageError(f"--{flag} {given[flag]}: --segnet_file {segnet_file} "
                             f"was trained with --{flag} {preset[flag]}; {hint}")
    check_recorded_model(preset, given["model"], explicit, segnet_file)
    return {flag: preset[flag] for flag in ARCHITECTURE} | \
        {"size": tuple(given.get("size") or preset["size"])}


def preset_spec(data: str, preset: dict) -> DatasetSpec:
    """The spec of ``data`` for a segmenter of ``preset``: an evaluation-only benchmark built on
    its training data's spec, or that spec itself; with the preset's classes, normalisation
    and size."""
    base = SPECS[preset["data"]]
    names = tuple(preset["class_names"])
    grey = [(128, 128, 128)] * max(0, len(names) + 1 - len(base.colors))  # classes + anomaly
    base = replace(base, class_names=names, mean=tuple(preset["mean"]), std=tuple(preset["std"]),
                   size=tuple(preset["size"]), colors=(*base.colors, *grey))
    if data in BENCHMARK_SPLITS:
        return anomaly_benchmark(data, BENCHMARK_SPLITS[data], base)
    if data in UNLABELLED_PRESETS:
        return UNLABELLED_PRESETS[data](base)
    return base


def adopt_preset(given: Mapping, explicit, preset: dict | None,
                 data: str) -> tuple[DatasetSpec, dict]:
    """The one adoption of main.py, export and inference: with a ``preset`` (checked), the spec
    of ``data`` with its classes and normalisation, and the flags it dictates
    (``adopted_architecture``); without one, ``SPECS[data]`` as it is and nothing."""
    if preset is None:
        return SPECS[data], {}
    return preset_spec(data, preset), adopted_architecture(given, explicit, preset)


def _preset_of_file(segnet_file) -> dict | None:
    """The checked preset of an existing ``segnet_file``; None for a plain state_dict or a
    missing file (the loading stage says it is missing)."""
    return recorded_preset(segnet_file) if Path(segnet_file).is_file() else None


def adopt_segmenter_preset(given: Mapping, spec: DatasetSpec,
                           explicit=frozenset()) -> tuple[DatasetSpec, dict]:
    """main.py, for an evaluation-only benchmark ``spec``: ``adopt_preset`` with
    ``--segnet_file``'s preset; ``spec`` itself (and nothing adopted) for other data or
    without a preset. ``given``: the command line's values; ``explicit``: the flags it gave,
    one that contradicts the preset is a UsageError (the weights could not be loaded)."""
    if spec.name not in (*BENCHMARK_SPLITS, *UNLABELLED_PRESETS):
        return spec, {}
    preset = _preset_of_file(given["segnet_file"])
    return (spec, {}) if preset is None else adopt_preset(given, explicit, preset, spec.name)


DEFAULT_DATA = "CamVid"  # of export and inference without --data, for a file without a preset


def adopt_recorded_preset(given: Mapping, explicit=frozenset()) -> tuple[DatasetSpec, dict]:
    """python -m obsnet.export and inference.py: ``data`` (``given["data"]`` None: not given)
    is the recorded training data (``DEFAULT_DATA`` without a preset), and ``adopt_preset``
    applies; the adopted flags include ``data``. A --data that is neither the recorded one nor
    an evaluation-only benchmark is a UsageError: the normalisation and classes would be
    another dataset's."""
    segnet_file = given["segnet_file"]
    preset = _preset_of_file(segnet_file)
    recorded = preset["data"] if preset else None
    data = given["data"]
    if data is None:
        data = recorded or DEFAULT_DATA
    elif recorded and data not in (recorded, *BENCHMARK_SPLITS, *UNLABELLED_PRESETS):
        raise UsageError(f"--data {data}: --segnet_file {segnet_file} was trained on "
                         f"{recorded}, whose classes and normalisation (mean, std) it needs; "
                         f"leave --data out (or give --data {recorded})")
    spec, adopted = adopt_preset(given, explicit, preset, data)
    return spec, adopted | {"data": data}
