"""ONNX export (python -m obsnet.export): onnxruntime against PyTorch for SegNet + observer, DeepLabv3+ +
observer and a torchvision segmentation model, at two image sizes and two batch sizes; the
command line (parity line, one-line errors, atomic write); docs/export.md's onnxruntime snippet.

Exports take 20-50 s each on 2 cores, so each model is exported once per module."""
import re
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision
from PIL import Image
from torchvision.models.resnet import Bottleneck

from obsnet import export
from obsnet.data.specs import IMAGENET_MEAN, IMAGENET_STD, SPECS
from obsnet.models.checkpoint import save_checkpoint
from obsnet.models.observer_spec import ObserverSpec
from obsnet.models.registry import build_observer, build_segmenter
from obsnet.models.obsnet import Obsnet_Seg
from obsnet.models.segnet import SegNet
from tests.helpers import ROOT
from tests.helpers.nets import calibrate
from tests.helpers.runner import python

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

WIDTH = "0.0625"
SIZES = [(1, 64, 96), (2, 64, 96), (1, 96, 128)]  # (batch, H, W) compared with PyTorch
TOLERANCE = 1e-4


def calibrate_batchnorm(graph: nn.Module, size=(64, 96)) -> nn.Module:
    """``graph`` with every batch norm given the statistics of one random batch, in eval mode."""
    calibrate(graph, [graph], size)
    return graph


def export_to(graph: export.ExportGraph, path, size=(64, 96)):
    """Export ``graph`` with export.py's functions and write it to ``path``."""
    path.write_bytes(export.export_bytes(graph, size))
    return path


def assert_parity(path, graph, outputs, limit=TOLERANCE) -> dict:
    """Every (batch, H, W) of SIZES within ``limit`` on ``outputs``; the largest diffs."""
    rows = export.parity(path, graph, SIZES)
    worst = {name: max(diffs[name] for _, diffs in rows) for name in outputs}
    for case, diffs in rows:
        for name in outputs:
            assert diffs[name] <= limit, (case, diffs, limit)
    print(f"{path.name}: {export.parity_line(rows)}")
    return worst


def assert_dynamic(path, outputs) -> None:
    """Input and outputs with symbolic batch, height and width."""
    import onnxruntime
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (image,) = session.get_inputs()
    assert image.name == "image" and image.shape[1] == 3, image
    assert all(isinstance(d, str) for d in (image.shape[0], *image.shape[2:])), image.shape
    assert [o.name for o in session.get_outputs()] == list(outputs)


# ----------------------------------------------------------------------------- SegNet (CLI)

@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A tiny SegNet and its observer saved as main.py saves them (the observer records its
    flags and head)."""
    root = tmp_path_factory.mktemp("export_nets")
    torch.manual_seed(0)
    save_checkpoint(root / "segnet.pth", {"model": SegNet(3, 12, width_mult=0.0625).state_dict()})
    record = {"obs_mlp": False, "no_residual": False, "no_img": False, "head": "linear"}
    save_checkpoint(root / "obsnet" / "best.pth",
                    {"model": Obsnet_Seg(3, 1, width_mult=0.0625).state_dict(), "observer": record})
    return root


def export_args(ckpts, out, *extra):
    return ["--data", "Synthetic", "--segnet_file", str(ckpts / "segnet.pth"), "--obsnet_file",
            str(ckpts / "obsnet"), "--width_mult", WIDTH, "--size", "64", "96", "--out", str(out),
            *extra]


@pytest.fixture(scope="module")
def segnet_cli(ckpts):
    """``python -m obsnet.export`` run once on the tiny checkpoints: (its result, the ONNX file)."""
    out = ckpts / "onnx" / "segnet.onnx"
    return python("-m", "obsnet.export", *export_args(ckpts, out), timeout=600), out


def test_cli_writes_and_checks(segnet_cli):
    result, out = segnet_cli
    assert result.returncode == 0, result.stderr
    assert out.is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["segnet.onnx"]  # no temp, no lock
    parity = [line for line in result.stdout.splitlines() if "max |diff|" in line]
    assert len(parity) == 1, result.stdout
    assert "batch 1 at 64x96" in parity[0] and "batch 2 at 36x60" in parity[0], parity[0]
    diffs = [float(x) for x in re.findall(r"(?:observer_prob|logits) ([0-9.e+-]+)", parity[0])]
    assert len(diffs) == 4 and max(diffs) <= TOLERANCE, parity[0]


def test_segnet_parity(segnet_cli, ckpts):
    _, out = segnet_cli
    args = export.build_parser().parse_args(export_args(ckpts, out))
    graph = export.load_graph(args, SPECS["Synthetic"])
    assert_dynamic(out, export.OUTPUT_NAMES)
    worst = assert_parity(out, graph, export.OUTPUT_NAMES)
    assert set(worst) == {"logits", "observer_prob"}


def test_cli_refuses_existing_out_and_missing_files(segnet_cli, ckpts, tmp_path):
    _, out = segnet_cli
    before = out.read_bytes()
    cases = [(export_args(ckpts, out), 2, "the file exists; add --overwrite"),
             (export_args(ckpts, tmp_path / "a.onnx", "--segnet_file", str(tmp_path / "no.pth")),
              1, "no.pth: file not found"),
             (export_args(ckpts, tmp_path / "b.onnx", "--obsnet_file", str(tmp_path / "none")),
              1, "checkpoint file not found"),
             (export_args(ckpts, tmp_path), 1, "it is a folder")]
    for argv, code, message in cases:
        result = python("-m", "obsnet.export", *argv)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == code, result.stderr
        assert len(lines) == 1 and lines[0].startswith("python -m obsnet.export: error: "), result.stderr
        assert message in lines[0], lines[0]
    assert out.read_bytes() == before
    assert not list(tmp_path.iterdir())


def test_check_skipped_without_onnxruntime(segnet_cli, ckpts, monkeypatch):
    _, out = segnet_cli
    args = export.build_parser().parse_args(export_args(ckpts, out, "--overwrite"))
    export.check_args(args, SPECS["Synthetic"])  # --overwrite accepts the existing file
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails
    line = export.verify(out, export.load_graph(args, SPECS["Synthetic"]), (64, 96))
    assert line.startswith("onnxruntime is not installed: parity check skipped")


# ----------------------------------------------------------------------------- other models

@pytest.mark.slow
def test_deeplab_parity(tmp_path):
    """A randomly initialised ResNet-101 is ill-conditioned: its residual sums grow block after
    block, and PyTorch's own float32 logits differ from float64 by 5.5e-4 (observer_prob by
    1.3e-4; onnxruntime's are closer to float64 than PyTorch's). Residual branches scaled down
    as in a trained ResNet (``bn3`` gamma 0.2, cf. torchvision's ``zero_init_residual``) bring
    float32 within 1e-5 of float64, so that 1e-4 measures the export, not the rounding."""
    segmenter = build_segmenter("deeplabv3plus", 12, 1.0)
    observer = build_observer(ObserverSpec("deeplabv3plus"), segmenter, 12, 1.0)
    for block in segmenter.modules():
        if isinstance(block, Bottleneck):
            nn.init.constant_(block.bn3.weight, 0.2)
    graph = calibrate_batchnorm(export.ExportGraph(segmenter, observer, SPECS["CamVid"].mean,
                                                   SPECS["CamVid"].std))
    path = export_to(graph, tmp_path / "deeplab.onnx")
    assert_dynamic(path, export.OUTPUT_NAMES)
    assert_parity(path, graph, ["observer_prob", "logits"])


@pytest.mark.slow
def test_torchvision_segmenter_without_observer(tmp_path):
    """A torchvision model's ``{"out": ...}`` is read as its logits (``export.logits_of``).
    Its logits reach about 30 after calibration and PyTorch's own float32 differs from float64
    by 1.3e-4 there: the limit is 1e-5 of their largest magnitude (at least 1e-4)."""
    model = torchvision.models.segmentation.lraspp_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=12)
    graph = calibrate_batchnorm(export.ExportGraph(model, None, IMAGENET_MEAN, IMAGENET_STD))
    assert graph.output_names == ("logits",)
    path = export_to(graph, tmp_path / "lraspp.onnx")
    assert_dynamic(path, ["logits"])
    with torch.no_grad():
        scale = float(graph(torch.rand(2, 3, 96, 128))[0].abs().max())
    assert_parity(path, graph, ["logits"], limit=max(TOLERANCE, 1e-5 * scale))


# ----------------------------------------------------------------------------- docs/export.md

def readme_snippet() -> str:
    """The onnxruntime snippet of docs/export.md, "Export to ONNX" (its indented block that
    imports onnxruntime), dedented."""
    section = (ROOT / "docs" / "export.md").read_text().split("# Export to ONNX", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"(?:^    .*\n|^\n)+", section, flags=re.M)
    code = next(b for b in blocks if "import onnxruntime" in b)
    return "\n".join(line[4:] for line in code.splitlines()).strip() + "\n"


def test_readme_snippet_runs(segnet_cli, ckpts, tmp_path, monkeypatch):
    _, out = segnet_cli
    (tmp_path / "obsnet.onnx").write_bytes(out.read_bytes())
    rgb = np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "street.png")
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(readme_snippet(), "docs/export.md", "exec"), scope)
    args = export.build_parser().parse_args(export_args(ckpts, out))
    with torch.no_grad():
        logits, prob = export.load_graph(args, SPECS["Synthetic"])(
            torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255)
    assert scope["classes"].shape == scope["error_map"].shape == (70, 90)
    assert np.abs(scope["error_map"] - prob[0, 0].numpy()).max() <= TOLERANCE
    assert (scope["classes"] == logits[0].argmax(0).numpy()).mean() > 0.999


# ----------------------------------------------------------------------------- benchmark

def test_benchmark_skips_without_onnxruntime(monkeypatch):
    from benchmarks import onnx_export, report
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # not importable
    result = onnx_export.run((64, 96), 0.0625, 1)
    assert result == {"skipped": "onnxruntime not installed"}
    assert "Skipped: onnxruntime not installed." in report.onnx_section(result)


def test_benchmark_report_section():
    from benchmarks import report
    from benchmarks.common import Spread
    result = {"size": (360, 480), "width": 1.0, "runs": 5, "export_seconds": 61.0,
              "onnxruntime": Spread(0.2, 0.19, 0.25, 5), "pytorch": Spread(0.3, 0.29, 0.31, 5),
              "speedup": 1.5, "parity": [((1, 360, 480), {"logits": 1e-7, "observer_prob": 6e-8})],
              "onnxruntime_version": "1.32.0", "torch_threads": 2}
    text = "\n".join(report.onnx_section(result))
    assert "| onnxruntime 1.32.0 | 200 (190–250, n=5) |" in text, text
    assert "speed-up 1.50x" in text and "batch 1 at 360x480: observer_prob 6.0e-08, logits 1.0e-07" in text
