"""The segmenter's preset, recorded in its checkpoint, for the evaluation-only benchmarks.

A checkpoint written by a training stage records ``preset``: the training data, the model,
its width, its classes (count and names), its normalisation (mean, std) and its image size.
``--test_only`` on RoadAnomaly21 / RoadObstacle21 / FishyscapesLAF then needs nothing more
than ``--segnet_file``: ``adopt_segmenter_preset`` takes the model, width, classes and
normalisation from it, and the size unless ``--size`` is given. Checkpoints of earlier
versions record only their resolved ``args``; the preset is rebuilt from those and the spec
of their ``--data``. A plain state_dict records nothing: the benchmark's defaults (a
Cityscapes segmenter) apply, and the command line must match the network.
"""
from dataclasses import replace
from pathlib import Path

from obsnet.data.specs import BENCHMARK_SPLITS, SPECS, DatasetSpec, anomaly_benchmark
from obsnet.errors import UsageError
from obsnet.models.checkpoint import load_checkpoint

ARCHITECTURE = ("model", "width_mult", "nclass")  # flags the recorded network dictates


def preset_record(args) -> dict:
    """What a training checkpoint records of the segmenter's preset (``args`` resolved)."""
    return preset_of(args.data, args.model, args.width_mult, args.nclass, args.size)


def preset_of(data: str, model: str, width_mult: float, nclass: int, size) -> dict:
    """The preset of a segmenter trained on ``data`` (its spec's names, mean and std)."""
    spec = SPECS[data]
    names = list(spec.class_names) + [f"class {i}" for i in range(spec.nclass, nclass)]
    return {"data": data, "model": model, "width_mult": float(width_mult), "nclass": int(nclass),
            "class_names": names[:nclass], "mean": list(spec.mean), "std": list(spec.std),
            "size": list(size or spec.size)}


def recorded_preset(segnet_file) -> dict | None:
    """The preset a segmenter checkpoint records, rebuilt from its ``args`` for checkpoints
    of earlier versions; None for a file without either (a plain state_dict)."""
    checkpoint = load_checkpoint(segnet_file, "--segnet_file")
    if not isinstance(checkpoint, dict):
        return None
    if isinstance(checkpoint.get("preset"), dict):
        return checkpoint["preset"]
    args = checkpoint.get("args")
    if isinstance(args, dict) and args.get("data") in SPECS and args.get("nclass"):
        return preset_of(args["data"], args.get("model", "segnet"), args.get("width_mult", 1.0),
                         args["nclass"], args.get("size"))
    return None


def adopt_segmenter_preset(args, spec: DatasetSpec, explicit=frozenset()) -> DatasetSpec:
    """For an evaluation-only benchmark ``spec``: set ``args.model``, ``width_mult``,
    ``nclass`` (and ``size`` when not given) from ``--segnet_file``'s preset, and return the
    benchmark spec for its classes and normalisation; ``spec`` itself without a preset.
    ``explicit``: the flags given on the command line; one that contradicts the preset is a
    UsageError (the weights could not be loaded)."""
    if spec.name not in BENCHMARK_SPLITS or not Path(args.segnet_file).is_file():
        return spec
    preset = recorded_preset(args.segnet_file)
    if preset is None:
        return spec
    for flag in ARCHITECTURE:
        if flag in explicit and getattr(args, flag) != preset[flag]:
            raise UsageError(f"--{flag} {getattr(args, flag)}: --segnet_file {args.segnet_file} "
                             f"was trained with --{flag} {preset[flag]}; leave --{flag} out")
        setattr(args, flag, preset[flag])
    args.size = tuple(args.size or preset["size"])
    base = SPECS.get(preset["data"], SPECS["Cityscapes"])
    base = replace(base, class_names=tuple(preset["class_names"]), mean=tuple(preset["mean"]),
                   std=tuple(preset["std"]), size=tuple(preset["size"]))
    return anomaly_benchmark(spec.name, BENCHMARK_SPLITS[spec.name], base)

