"""Export a segmenter and its observer as one ONNX graph, then check it against PyTorch.

    python -m obsnet.export --data CamVid --segnet_file ckpt/camvid/segnet.pth \\
        --obsnet_file ckpt/camvid/best.pth --out obsnet.onnx

The graph takes ``image``, float32 RGB in [0, 1], B×3×H×W, normalises it with the mean and std
of the segmenter's recorded preset (``obsnet.preset``; else of --data), and returns ``logits``
(B×C×H×W, the segmenter's) and ``observer_prob`` (B×1×H×W, the sigmoid of the observer's
logit: the probability that the segmenter is wrong). Batch, height and width are dynamic
(each side at least 32 pixels). The model's ``metadata_props`` record the fingerprints of both
networks' weights and that minimum (``ExportGraph.metadata``).
"""
import argparse
import logging
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from obsnet.data.specs import SPECS
from obsnet.errors import UsageError
from obsnet.exit_codes import explicit_flags, parse_checked, run_friendly
from obsnet.model_flags import (MIN_SIDE, add_model_flags, check_model_flags, check_nclass_and_size,
                                observer_request)
from obsnet.models.calibration import calibration_of
from obsnet.models.checkpoint import weights_fingerprint
from obsnet.models.generic import logits_of
from obsnet.models.observer_spec import observer_path
from obsnet.models.registry import load_observed
from obsnet.models.segnet import freeze
from obsnet.outputs import Output, OutputLock, atomic_write
from obsnet.ownership import Input, Planned, check_outputs_not_inputs
from obsnet.preset import adopt_recorded_preset
from obsnet.thresholds import alarm_logit

PROG = "python -m obsnet.export"
INPUT_NAME = "image"
OUTPUT_NAMES = ("logits", "observer_prob")
OPSET = 18  # SegNet's max_unpool2d exports (as ScatterND) with the dynamo exporter from 18 on
EXPORT_BATCH = 2  # the traced batch: 2, so that no dimension is traced at the special size 1
MAX_PROTO_BYTES = 2 ** 31 - 1  # protobuf's limit for one ONNX file (weights included)
PARITY_TOLERANCE = 1e-3  # largest |diff| of observer_prob accepted by the check after writing


class Normalize(nn.Module):
    """(image - mean) / std per channel, with mean and std stored in the graph."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, image):
        return (image - self.mean) / self.std


class ExportGraph(nn.Module):
    """image in [0, 1] -> (logits, observer_prob), or (logits,) without an observer; with
    ``alarm_logit`` (--threshold) a third output, ``alarm``: uint8, 1 where the observer's
    logit is above it.

    ``segmenter``: any module; with an observer it is called as ``segmenter(x,
    return_feat=True)`` and returns its feature maps, logits last (SegNet, DeepLabV3Plus),
    without one as ``segmenter(x)`` (see ``logits_of``). ``observer``: called as
    ``observer(x, feats)``, returns one logit per pixel (B×1×H×W).
    Both are put in eval mode (dropout off, batch norms on their running statistics).
    """

    def __init__(self, segmenter: nn.Module, observer: nn.Module | None, mean, std,
                 alarm_logit: float | None = None):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.segmenter, self.observer = segmenter, observer
        self.alarm_logit = alarm_logit  # --threshold: a third output, "alarm"
        self.eval()

    def metadata(self, data: str | None = None) -> dict[str, str]:
        """What the ONNX file records of where it comes from (its ``metadata_props``): the
        fingerprints of the segmenter's and the observer's weights
        (``obsnet.models.checkpoint.weights_fingerprint``, as the observer's checkpoint and the
        statistics files record them), the observer's calibration (``obsnet.calibration``,
        ``a=...,b=...``, when its checkpoint has one), the normalisation, the dataset preset ``data``, and the
        smallest image side the graph is defined for (``obsnet.min_side``: below it onnxruntime
        may still run the graph, on maps PyTorch cannot compute, or fail inside ScatterND)."""
        props = {"obsnet.segmenter": weights_fingerprint(self.segmenter),
                 "obsnet.min_side": str(MIN_SIDE),
                 "obsnet.mean": ",".join(f"{v:g}" for v in self.normalize.mean.flatten().tolist()),
                 "obsnet.std": ",".join(f"{v:g}" for v in self.normalize.std.flatten().tolist())}
        if self.observer is not None:
            record = calibration_of(self.observer)
            weights = self.observer if record is None else self.observer.observer
            props["obsnet.observer"] = weights_fingerprint(weights)
            if record is not None:  # observer_prob is sigmoid(a * logit + b): say so
                props["obsnet.calibration"] = f"a={record['a']!r},b={record['b']!r}"
        if self.alarm_logit is not None:
            props["obsnet.alarm_logit"] = repr(float(self.alarm_logit))
        return props | ({"obsnet.data": data} if data else {})

    @property
    def output_names(self) -> tuple[str, ...]:
        """The graph's output names, in order."""
        if self.observer is None:
            return OUTPUT_NAMES[:1]
        return OUTPUT_NAMES + (("alarm",) if self.alarm_logit is not None else ())

    def forward(self, image):
        x = self.normalize(image)
        if self.observer is None:
            return (logits_of(self.segmenter(x)),)
        feats = self.segmenter(x, return_feat=True)
        logit = self.observer(x, feats)
        if self.alarm_logit is None:
            return feats[-1], torch.sigmoid(logit)
        return feats[-1], torch.sigmoid(logit), (logit > self.alarm_logit).to(torch.uint8)


@contextmanager
def quiet_onnx_ir():
    """Silence onnx_ir's warnings about empty attribute lists while a graph is translated
    (harmless: their type defaults to INTS, which is the right one here)."""
    logger = logging.getLogger("onnx_ir")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def export_bytes(graph: ExportGraph, size: tuple[int, int], metadata: dict | None = None) -> bytes:
    """The serialised ONNX model of ``graph`` (opset 18, dynamo exporter), traced at ``size``
    (H, W) with a batch of ``EXPORT_BATCH``; batch, height and width stay dynamic;
    ``metadata``: key-value strings recorded as the model's ``metadata_props``."""
    from torch.export import Dim

    example = torch.rand(EXPORT_BATCH, 3, *size)
    axes = {0: Dim("batch", min=1, max=4096), 2: Dim("height", min=MIN_SIDE, max=16384),
            3: Dim("width", min=MIN_SIDE, max=16384)}
    with torch.no_grad(), quiet_onnx_ir():
        program = torch.onnx.export(graph, (example,), None, dynamo=True, opset_version=OPSET,
                                    input_names=[INPUT_NAME], output_names=list(graph.output_names),
                                    dynamic_shapes={"image": axes}, verbose=False)
    proto = program.model_proto
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    if proto.ByteSize() > MAX_PROTO_BYTES:
        raise ValueError(f"the ONNX model is {proto.ByteSize() / 2**30:.1f} GiB, over the 2 GiB "
                         f"of one ONNX file")
    return proto.SerializeToString()


def check_cases(size: tuple[int, int]) -> list[tuple[int, int, int]]:
    """(batch, H, W) of the check after writing: one image at the export size, and a batch of
    two at another size (about half of it, sides not multiples of 32)."""
    h, w = size
    return [(1, h, w), (2, max(MIN_SIDE, h // 2 + 4), max(MIN_SIDE, w // 2 + 12))]


def parity(path, graph: ExportGraph, cases, seed: int = 0) -> list[tuple[tuple, dict]]:
    """Run the ONNX file at ``path`` in onnxruntime (CPU) and ``graph`` in PyTorch on random
    images of each (batch, H, W) of ``cases``; per case, the largest |diff| of every output."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for case in cases:
        image = torch.rand(case[0], 3, *case[1:], generator=generator)
        got = session.run(list(graph.output_names), {INPUT_NAME: image.numpy()})
        with torch.no_grad():
            want = graph(image)
        rows.append((tuple(case), {name: float(np.abs(a - b.numpy()).max())
                                   for name, a, b in zip(graph.output_names, got, want)}))
    return rows


def parity_line(rows) -> str:
    """One line: the largest |diff| of every output per checked batch and size."""
    parts = []
    for (batch, h, w), diffs in rows:
        figures = ", ".join(f"{name} {diff:.1e}" for name, diff in sorted(diffs.items(), reverse=True))
        parts.append(f"batch {batch} at {h}x{w}: {figures}")
    return "onnxruntime vs PyTorch, max |diff|: " + "; ".join(parts)


def verify(path, graph: ExportGraph, size) -> str:
    """Check the written file against PyTorch (``check_cases``); the line to print. A
    ValueError when observer_prob (or, without an observer, logits) is off by more than
    ``PARITY_TOLERANCE``; without onnxruntime, a line saying the check is skipped."""
    try:
        import onnxruntime
    except ImportError:
        return "onnxruntime is not installed: parity check skipped (pip install onnxruntime)"
    rows = parity(path, graph, check_cases(size))
    key = "observer_prob" if graph.observer is not None else "logits"
    worst = max(diffs[key] for _, diffs in rows)
    if not worst <= PARITY_TOLERANCE:  # NaN included
        raise ValueError(f"{path}: written, but onnxruntime's {key} differs from PyTorch's by "
                         f"{worst:.1e} (more than {PARITY_TOLERANCE:g}); {parity_line(rows)}")
    return f"{parity_line(rows)} (onnxruntime {onnxruntime.__version__})"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The model flags of main.py and inference.py, plus --out and --overwrite."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    a = p.add_argument
    a("--data", default=None, choices=sorted(SPECS),
      help="dataset preset (mean and std; default: the one --segnet_file records, else CamVid)")
    a("--segnet_file", required=True, help="segmentation network checkpoint")
    a("--obsnet_file", required=True, help="observer checkpoint, or a folder (its best.pth)")
    a("--out", required=True, help="ONNX file to write")
    a("--overwrite", action="store_true", help="replace --out if it exists")
    add_model_flags(p, "channel width of the checkpoints")
    a("--size", type=int, nargs=2, metavar=("H", "W"), default=None,
      help="size traced and checked (default: the preset's); the graph takes any size")
    a("--threshold", default=None, metavar="POINT|P",
      help="add an output 'alarm' (uint8 B×1×H×W, 1 where the observer raises an alarm): at an "
           "operating point of main.py --fit_threshold (tpr, risk, conformal_tpr) or above a "
           "probability of error P in (0, 1)")
    a("--debug", action="store_true", help="show tracebacks")
    return p


def check_args(args, spec) -> None:
    """UsageError for flag values that cannot work, and for an --out that is one of the
    checkpoints, before any heavy work."""
    check_model_flags(args)
    check_nclass_and_size(args, spec)
    out = Path(args.out)
    check_outputs_not_inputs([Planned("--out", out, out)],
                             [Input("--segnet_file", Path(args.segnet_file)),
                              Input("--obsnet_file", observer_path(args.obsnet_file))])
    if out.is_file() and not args.overwrite:
        raise UsageError(f"--out {out}: the file exists; add --overwrite to replace it")


def load_graph(args, spec) -> ExportGraph:
    """The checkpoints' segmenter and observer in one ExportGraph, loaded as inference.py
    loads them (the observer's flags and head as its checkpoint records them; ``spec``: as
    ``resolve_args`` returns it)."""
    nclass = spec.nclass if args.nclass is None else args.nclass
    segmenter, observer, _ = load_observed(args.obsnet_file, observer_request(args), args.model,
                                           nclass, args.width_mult, args.segnet_file,
                                           probe_size=tuple(args.size or spec.size))
    alarm = None if args.threshold is None else alarm_logit(args.threshold, args.obsnet_file,
                                                             segmenter, observer)
    return ExportGraph(segmenter, freeze(observer), spec.mean, spec.std, alarm)


def resolve_args(args, explicit=frozenset()):
    """The dataset spec, with what --segnet_file records of its preset adopted
    (``obsnet.preset.adopt_recorded_preset``: --data defaults to its training data)."""
    spec, adopted = adopt_recorded_preset(vars(args), explicit)
    vars(args).update(adopted)  # resolved here, once; read-only from now on
    check_args(args, spec)
    return spec


def run(argv) -> int:
    """Parse the flags, load the networks, export, write atomically, check the file."""
    parser = build_parser()
    args = parse_checked(parser, argv)
    spec = resolve_args(args, explicit_flags(parser, argv))
    out, size = Path(args.out), tuple(args.size or spec.size)
    graph = load_graph(args, spec)  # every refusal of the checkpoints before --out is touched
    with OutputLock([Output("--out", out, folder=False)]):
        data = export_bytes(graph, size, graph.metadata(args.data))
        atomic_write(out, lambda f: f.write(data), "--out")
    print(f"wrote {out} ({len(data) / 2**20:.1f} MiB, opset {OPSET}): input {INPUT_NAME} "
          f"B×3×H×W in [0, 1] normalised inside with {args.data}'s mean and std, outputs "
          f"{', '.join(graph.output_names)}; traced at {size[0]}x{size[1]}")
    print(verify(out, graph, size))
    return 0


def main(argv=None) -> int:
    """Entry point: friendly one-line errors (``python -m obsnet.export: error: ...``) unless
    --debug."""
    return run_friendly(PROG, run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
