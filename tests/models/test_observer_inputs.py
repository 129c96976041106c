"""What the observer reads of the segmenter's output (--obs_inputs) and which observer it is
(--obs_kind): the maps against an independent reference, the head that can reproduce MCP,
the record in the checkpoint, and main.py, inference.py and the ONNX export following it."""
import json
import re

import numpy as np
import pytest
import torch
from scipy.special import logsumexp, softmax

from obsnet.models.checkpoint import CheckpointError, save_checkpoint
from obsnet.models.obsnet import Obsnet_Seg, Obsnet_Small, SegNetLayerObserver
from obsnet.models.output_maps import INPUTS, OutputHead, derived_maps
from obsnet.models.observer_spec import (KINDS, ObserverRequest, ObserverSpec, recorded_spec,
                                         resolve_observer)
from obsnet.models.registry import build_observer, build_segmenter
from obsnet.models.segnet import SegNet
from tests.helpers.runner import TINY, inference_py, main_py, paths, python

NCLASS, WIDTH = 12, 0.0625


def reference_maps(logits: np.ndarray) -> np.ndarray:
    """1 - max softmax, entropy / log C, -logsumexp, in float64 with scipy (B×3×H×W)."""
    p = softmax(logits, axis=1)
    entropy = -(p * np.log(np.clip(p, 1e-300, None))).sum(axis=1) / np.log(logits.shape[1])
    return np.stack([1 - p.max(axis=1), entropy, -logsumexp(logits, axis=1)], axis=1)


@pytest.mark.parametrize("case", ["random", "saturated", "ties", "large_offset"])
def test_derived_maps_match_scipy(case):
    rng = np.random.default_rng(0)
    z = rng.normal(size=(2, NCLASS, 5, 7))
    if case == "saturated":
        z[:, 3] += 80.0  # softmax of 1 in float32: 1 - max = 0, entropy 0
    elif case == "ties":
        z[:] = 0.5  # uniform: 1 - 1/C, entropy 1
    elif case == "large_offset":
        z = z * 1e-3 + 1e4  # tiny spread around a large value
    ours = derived_maps(torch.from_numpy(z).float()).double().numpy()
    ref = reference_maps(z.astype(np.float32).astype(np.float64))
    scale = np.maximum(1.0, np.abs(ref))
    assert np.all(np.abs(ours - ref) / scale < 2e-6), np.abs(ours - ref).max()
    if case == "ties":
        assert np.allclose(ours[:, 1], 1.0, atol=1e-6) and np.allclose(ours[:, 0], 1 - 1 / NCLASS)


def test_derived_maps_under_bfloat16_logits_are_float32():
    z = torch.randn(1, NCLASS, 4, 4).bfloat16()
    maps = derived_maps(z)
    assert maps.dtype == torch.float32
    assert torch.allclose(maps, derived_maps(z.float()))


def test_features_keeps_the_original_keys():
    """The original observer's keys (and so its checkpoints) are those of --obs_inputs features."""
    original = Obsnet_Seg(3, 1, width_mult=WIDTH).state_dict()
    assert [k for k in original if k.startswith("fc")] == ["fc.weight", "fc.bias"]
    assert original["fc.weight"].shape == (1, 1, 1, 1)
    for inputs in ("maps", "logits"):
        other = Obsnet_Seg(3, 1, width_mult=WIDTH, inputs=inputs, nclass=NCLASS).state_dict()
        assert set(original) - set(other) == set()  # only fc.norm.* added, fc.weight widened
        assert {k for k in other if k not in original} == {
            "fc.norm.weight", "fc.norm.bias", "fc.norm.running_mean", "fc.norm.running_var",
            "fc.norm.num_batches_tracked"}


def test_maps_head_can_be_exactly_mcp():
    """With its weight on the first map only, the maps observer scores 1 - max softmax: the
    baseline that the original observer cannot reproduce (it never reads the logits)."""
    torch.manual_seed(0)
    segnet = SegNet(3, NCLASS, width_mult=WIDTH).eval()
    observer = Obsnet_Seg(3, 1, width_mult=WIDTH, inputs="maps", nclass=NCLASS).eval()
    with torch.no_grad():
        observer.fc.weight.zero_()
        observer.fc.weight[0, 1] = 1.0  # channel 0 is the observer's own map
        observer.fc.bias.zero_()
        observer.fc.norm.eps = 0.0  # running mean 0, var 1: the identity
        x = torch.randn(2, 3, 32, 48)
        feats = segnet(x, return_feat=True)
        mcp = 1 - torch.softmax(feats[-1], 1).amax(1)
        assert torch.allclose(observer(x, feats)[:, 0], mcp, atol=1e-6)


@pytest.mark.parametrize("inputs", INPUTS)
@pytest.mark.parametrize("kind,obs_mlp", [("mirror", False), ("layer", False), ("mirror", True)])
def test_every_observer_reads_every_input(inputs, kind, obs_mlp):
    torch.manual_seed(0)
    segnet = build_segmenter("segnet", NCLASS, WIDTH)
    observer = build_observer(ObserverSpec("segnet", kind=kind, inputs=inputs, obs_mlp=obs_mlp),
                              segnet, NCLASS, WIDTH)
    expected = SegNetLayerObserver if kind == "layer" else Obsnet_Small if obs_mlp else Obsnet_Seg
    assert type(observer) is expected
    x = torch.randn(2, 3, 32, 48)
    feats = segnet.eval()(x, return_feat=True)
    out = observer.eval()(x, feats)
    assert out.shape == (2, 1, 32, 48) and torch.isfinite(out).all()
    if inputs != "features":  # the score changes with the logits alone
        moved = [f.clone() for f in feats]
        moved[-1] = moved[-1] * 3
        assert not torch.allclose(observer(x, moved), out)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(observer(x, feats).float()).all()


def test_layer_observer_is_lighter_than_the_mirror():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    segnet = build_segmenter("segnet", NCLASS, 0.25)
    mirror = build_observer(ObserverSpec("segnet", kind="mirror"), segnet, NCLASS, 0.25)
    layer = build_observer(ObserverSpec("segnet", kind="layer"), segnet, NCLASS, 0.25)
    assert count(layer) * 20 < count(mirror)


@pytest.mark.parametrize("model,obs_mlp,inputs,kind,words", [
    ("deeplabv3plus", False, "maps", "mirror", "--obs_inputs maps is not available"),
    ("deeplabv3plus", False, "features", "layer", "--obs_kind layer is not available"),
    ("segnet", True, "features", "layer", "--obs_mlp with --obs_kind layer"),
])
def test_observers_a_model_has_not_are_refused(model, obs_mlp, inputs, kind, words):
    spec = ObserverSpec(model, kind=kind, inputs=inputs, obs_mlp=obs_mlp)
    with pytest.raises(ValueError, match=words):  # refused before the segmenter is looked at
        build_observer(spec, None, NCLASS, 1.0)


def test_a_recorded_choice_outside_the_list_is_refused(tmp_path):
    state = {"model": {}, "observer": {"head": "linear", "inputs": "everything"}}
    save_checkpoint(tmp_path / "best.pth", state)
    with pytest.raises(CheckpointError, match="recorded observer inputs is not one of"):
        recorded_spec(tmp_path)


def test_an_earlier_checkpoint_reads_features_and_mirrors(tmp_path):
    record = {"obs_mlp": False, "no_residual": False, "no_img": False, "head": "linear"}
    save_checkpoint(tmp_path / "best.pth", {"model": {}, "observer": record})
    merged = resolve_observer(tmp_path, ObserverRequest())
    assert (merged.inputs, merged.kind) == ("features", "mirror")
    save_checkpoint(tmp_path / "plain" / "best.pth", {"model": {}})  # the original's
    plain = resolve_observer(tmp_path / "plain", ObserverRequest())
    assert (plain.inputs, plain.kind) == ("features", "mirror")


# ----------------------------------------------------------------------------- command lines

@pytest.fixture(scope="module")
def trained(run_dir):
    """Observers trained by main.py on ``run_dir``'s tiny SegNet (conftest): maps + mirror,
    logits + layer."""
    for name, flags in (("maps", ["--obs_inputs", "maps"]),
                        ("layer", ["--obs_inputs", "logits", "--obs_kind", "layer"])):
        run = main_py(*TINY, *paths(run_dir), "--epoch", "1", "--lr", "0.01", *flags,
                      "--obsnet_file", str(run_dir / name), "--tboard", str(run_dir / f"{name}_logs"))
        assert run.returncode == 0, run.stderr
    return run_dir


def test_training_records_inputs_and_kind(trained):
    for name, inputs, kind in (("maps", "maps", "mirror"), ("layer", "logits", "layer")):
        for file in ("best.pth", "last.pth"):
            record = torch.load(trained / name / file, weights_only=True)["observer"]
            assert (record["inputs"], record["kind"]) == (inputs, kind), (name, file)


def test_test_stage_follows_the_checkpoint_and_refuses_a_contradiction(trained):
    logs = trained / "test_maps"
    run = main_py(*TINY, *paths(trained), "--obsnet_file", str(trained / "maps"), "--test_only",
                  "--test_multi", "obsnet,mcp", "--tboard", str(logs))
    assert run.returncode == 0, run.stderr
    methods = json.loads((logs / "results_test_ood.json").read_text())["methods"]
    assert np.isfinite(methods["obsnet"]["error"]["auroc"])
    bad = main_py(*TINY, *paths(trained), "--obsnet_file", str(trained / "layer"), "--test_only",
                  "--test_multi", "obsnet", "--obs_inputs", "maps", "--tboard", str(trained / "x"))
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines()[-1].endswith(
        "this observer has --obs_inputs logits, not --obs_inputs maps; drop --obs_inputs (its "
        "checkpoint records it)")
    assert "Traceback" not in bad.stderr


@pytest.mark.parametrize("flags,words", [
    (["--obs_inputs", "maps", "--no_residual"], "--no_residual with --obs_inputs maps"),
    (["--obs_kind", "layer", "--obs_mlp"], "--obs_mlp with --obs_kind layer: pick one observer"),
    (["--obs_inputs", "all"], "argument --obs_inputs: invalid choice"),
])
def test_cli_refuses_observers_that_cannot_be(tmp_path, flags, words):
    run = main_py(*TINY, *paths(tmp_path), "--epoch", "1", *flags)
    assert run.returncode == 2 and words in run.stderr, run.stderr
    assert "Traceback" not in run.stderr and not (tmp_path / "obsnet").exists()


def test_inference_uses_the_recorded_inputs(trained, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 48, 3), np.uint8)).save(
        images / "a.png")
    run = inference_py("--data", "Synthetic", "--segnet_file", str(trained / "segnet.pth"),
                       "--obsnet_file", str(trained / "layer"), "--img_folder", str(images),
                       "--out", str(tmp_path / "out"), "--width_mult", str(WIDTH), "--size", "32",
                       "48")
    assert run.returncode == 0, run.stderr
    assert np.load(tmp_path / "out" / "a.png.npy").shape == (32, 48)


@pytest.mark.slow
def test_onnx_export_follows_the_maps_observer(trained, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    out = tmp_path / "maps.onnx"
    run = python("-m", "obsnet.export", "--data", "Synthetic", "--segnet_file",
                 str(trained / "segnet.pth"), "--obsnet_file", str(trained / "maps"),
                 "--width_mult", str(WIDTH), "--size", "32", "48", "--out", str(out), timeout=600)
    assert run.returncode == 0, run.stderr
    diffs = [float(d) for d in re.findall(r"observer_prob ([0-9.e+-]+)", run.stdout)]
    assert out.is_file() and diffs and max(diffs) < 1e-4, run.stdout  # onnxruntime vs PyTorch


def test_kinds_and_inputs_are_the_flags_choices():
    assert KINDS == ("mirror", "layer") and INPUTS == ("features", "logits", "maps")
    assert OutputHead(4).weight.shape == (1, 4, 1, 1)
