"""Generic segmenters (``obsnet.models.generic``): ``--model torchvision:<name>`` and
``--model package.module:factory``.

Unit: FeatureTap's maps and logits (default layers, odd sizes, plain torchvision state_dicts
in and out), Monte Carlo dropout only inside a call, hooks that follow fold_batchnorm's
replacements, one-line ValueErrors for unknown or non-map layers and for bad user factories
(``tests/helpers/toy_segmenter.py``), backbone weights from a torchvision classification file, no tied
observer scores.
CLI (one lraspp_mobilenet_v3_large segmenter + observer trained once at 32x48 by main.py):
what the checkpoints record, --test_only (and its refusals: mc_dropout without dropout
layers, other --observe_layers or --model than the checkpoint's), bad model flags, inference.py,
``python -m obsnet.export`` and onnxruntime parity of its file at two sizes and batch sizes,
and a user factory trained and tested end to end.
Flawed user factories (``tests/helpers/toy_segmenter.py``: a dict output without "out", float16
weights, a fixed input size, TorchScript, a classifier, NaN outputs) are one line naming
--model; a network that takes only --size's images is probed at --size, and one that changes
its input in place trains with the attack.

An lraspp export takes about 30 s on 2 cores: it is done once, by the CLI, and the parity
test compares that file with an ExportGraph(tap, observer) built here from the checkpoints.
"""
import copy
import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision
from PIL import Image

from obsnet import export
from obsnet.data.specs import SPECS
from obsnet.data.synthetic import generate
from obsnet.models.blocks import fold_batchnorm
from obsnet.models.checkpoint import CheckpointError, load_checkpoint
from obsnet.models.generic import FeatureTap, auto_layers, family_layers, probe_maps, resolve_factory
from obsnet.models.observer_spec import ObserverSpec
from obsnet.models.registry import build_observer, build_segmenter
from tests.helpers.runner import inference_py, main_py, python
from tests.helpers import toy_segmenter
from tests.helpers.nets import calibrate

LRASPP = "torchvision:lraspp_mobilenet_v3_large"
DEEPLAB = "torchvision:deeplabv3_mobilenet_v3_large"
MOBILENET_LAYERS = ("backbone.3", "backbone.6", "backbone.12", "backbone.16")
TOY = "tests.helpers.toy_segmenter"
NCLASS = 5
WIDTH = 0.25
TOLERANCE = 1e-4


# ----------------------------------------------------------------------------- helpers

def generic_pair(model: str, nclass: int, width_mult: float, layers=None, backbone_weights=None):
    """(FeatureTap, LayerObserver) of a generic spec, built one after the other as the registry
    builds them for every stage (the observer from the tap's probed channels)."""
    tap = build_segmenter(model, nclass, width_mult, backbone_weights, layers)
    return tap, build_observer(ObserverSpec(model), tap, nclass, width_mult)


def plain_torchvision(spec: str, nclass: int, seed: int) -> nn.Module:
    """torchvision's own model of ``spec`` (random init from ``seed``), in eval mode."""
    torch.manual_seed(seed)
    builder = getattr(torchvision.models.segmentation, spec.removeprefix("torchvision:"))
    return builder(weights=None, weights_backbone=None, num_classes=nclass).eval()


def capture_outputs(net: nn.Module, names) -> dict:
    """Forward hooks on ``net``'s modules ``names``: the dict they fill with their outputs."""
    seen = {}
    for name in names:
        net.get_submodule(name).register_forward_hook(
            lambda _m, _i, out, name=name: seen.__setitem__(name, out))
    return seen


def error_line(result, program="main.py", code=None) -> str:
    """The last stderr line of a failed run, checked: non-zero exit code (``code`` when
    given), no traceback, ``program: error: ...``."""
    assert result.returncode != 0, result.stdout[-2000:]
    if code is not None:
        assert result.returncode == code, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"{program}: error: "), result.stderr[-3000:]
    return line


# ----------------------------------------------------------------------------- FeatureTap

@pytest.mark.parametrize("spec", [LRASPP, DEEPLAB])
def test_tap_maps_logits_and_plain_state_dict(spec):
    """The tap returns the default layers' maps then B×C×H×W logits at the input size (odd
    sizes too), the observer one logit per pixel; the tap's state_dict is the network's own,
    and a plain torchvision state_dict (another init) loads strictly, giving that model's
    outputs exactly."""
    tap, observer = generic_pair(spec, NCLASS, WIDTH)
    assert tap.layers == MOBILENET_LAYERS
    assert list(tap.state_dict()) == list(tap.net.state_dict())
    reference = plain_torchvision(spec, NCLASS, seed=1)
    assert family_layers(reference) == MOBILENET_LAYERS
    assert list(tap.state_dict()) == list(reference.state_dict())
    tap.eval(), observer.eval()
    x = torch.rand(1, 3, 40, 56)
    with torch.no_grad():
        assert not torch.equal(tap(x), reference(x)["out"])  # another init: the load matters
        tap.load_state_dict(reference.state_dict(), strict=True)
        maps = capture_outputs(reference, MOBILENET_LAYERS)
        for batch, h, w in [(2, 64, 96), (1, 40, 56), (1, 37, 53)]:
            x = torch.rand(batch, 3, h, w)
            feats, want = tap(x, return_feat=True), reference(x)["out"]
            assert len(feats) == len(MOBILENET_LAYERS) + 1
            for name, fmap in zip(MOBILENET_LAYERS, feats):
                assert fmap.dim() == 4 and fmap.shape[0] == batch, (name, fmap.shape)
                assert torch.equal(fmap, maps[name]), name
            assert feats[-1].shape == (batch, NCLASS, h, w)
            assert torch.equal(feats[-1], want) and torch.equal(tap(x), want)
            assert observer(x, feats).shape == (batch, 1, h, w)
        other = plain_torchvision(spec, NCLASS, seed=2)
        tap.load_state_dict(other.state_dict(), strict=True)
        assert torch.equal(tap(x), other(x)["out"])


def test_mc_drop_keeps_dropout_active_only_inside_the_call():
    """``has_dropout`` tells torchvision's LR-ASPP (none) from DeepLabv3 (ASPP dropout); in
    eval mode ``mc_drop=True`` samples a new mask per call while plain calls are
    deterministic, and afterwards every module is back in eval mode, batch norm statistics
    untouched (a random network's batch norms are given one batch's statistics first)."""
    assert generic_pair(LRASPP, NCLASS, WIDTH)[0].has_dropout is False
    tap = generic_pair(DEEPLAB, NCLASS, WIDTH)[0]
    assert tap.has_dropout is True
    calibrate(tap, [tap])  # with the initial statistics, ReLU zeroes what dropout would drop
    buffers = {k: v.clone() for k, v in tap.state_dict().items()}
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        first, second = tap(x, mc_drop=True), tap(x, mc_drop=True)
        assert not torch.equal(first, second)
        assert torch.equal(tap(x), tap(x))
        assert not torch.equal(tap(x), first)
    assert not any(m.training for m in tap.modules())
    assert all(torch.equal(v, buffers[k]) for k, v in tap.state_dict().items())


def fold_setup(layers):
    """An lraspp tap observing ``layers``, batch norms calibrated, in eval mode; a batch."""
    tap, _ = generic_pair(LRASPP, NCLASS, WIDTH, layers=layers)
    calibrate(tap, [tap])
    return tap, torch.rand(2, 3, 64, 96)


def test_fold_batchnorm_leaves_observed_layers_alone():
    """fold_batchnorm fuses the Conv2d + BatchNorm2d pairs of the segmenter, except one with
    an observed module (``backbone.0.0``): its map (the raw convolution, kept from the
    in-place Hardswish that follows) is the same folded or not, as are the other maps and the
    logits; an unobserved pair (``backbone.1``'s) is fused."""
    tap, x = fold_setup(["backbone.0", "backbone.0.0", "backbone.3"])
    observed_conv = tap.net.get_submodule("backbone.0.0")
    other_bn = tap.net.get_submodule("backbone.1.block.0.1")
    assert isinstance(other_bn, nn.BatchNorm2d)
    with torch.no_grad():
        raw_conv = observed_conv(x)
        before = tap(x, return_feat=True)
        fold_batchnorm(tap)
        after = tap(x, return_feat=True)
    assert tap.net.get_submodule("backbone.0.0") is observed_conv
    assert isinstance(tap.net.get_submodule("backbone.1.block.0.1"), nn.Identity)
    torch.testing.assert_close(before[1], raw_conv, atol=1e-6, rtol=1e-6)
    for i in range(4):
        torch.testing.assert_close(after[i], before[i], atol=TOLERANCE, rtol=TOLERANCE)


def test_replaced_layer_is_hooked_again():
    """A layer replaced after the tap was built (as any in-place model surgery does) is
    hooked anew: the map comes from the new module, and the old one keeps no hook."""
    tap, x = fold_setup(["backbone.3"])
    old = tap.net.get_submodule("backbone.3")
    with torch.no_grad():
        before = tap(x, return_feat=True)[0]
        new = copy.deepcopy(old)
        new._forward_hooks.clear()
        tap.net.backbone["3"] = new
        seen = capture_outputs(tap.net, ["backbone.3"])
        after = tap(x, return_feat=True)[0]
    assert not old._forward_hooks and new._forward_hooks
    torch.testing.assert_close(after, seen["backbone.3"])
    torch.testing.assert_close(after, before, atol=TOLERANCE, rtol=TOLERANCE)


def test_unknown_and_non_map_layers_are_named():
    """An unknown layer name, and layers whose output is no B×C×H×W map (lraspp's
    ``backbone`` gives a dict, the toy ``summary`` a B×C vector), are ValueErrors naming
    --observe_layers and the layer; auto_layers leaves the vector out."""
    with pytest.raises(ValueError) as unknown:
        generic_pair(LRASPP, NCLASS, WIDTH, layers=["backbone.3", "backbone.99"])
    assert str(unknown.value).startswith("--observe_layers backbone.99: not a layer of --model "
                                         f"{LRASPP}"), unknown.value
    with pytest.raises(ValueError) as as_dict:
        generic_pair(LRASPP, NCLASS, WIDTH, layers=["backbone"])
    assert str(as_dict.value).startswith("--observe_layers backbone: "), as_dict.value
    assert "OrderedDict" in str(as_dict.value) and "B×C×H×W" in str(as_dict.value)
    with pytest.raises(ValueError) as vector:
        generic_pair(f"{TOY}:gated", NCLASS, WIDTH, layers=["features", "summary"])
    assert str(vector.value).startswith("--observe_layers summary: "), vector.value
    assert "2-D tensor" in str(vector.value)
    assert auto_layers(toy_segmenter.gated(NCLASS), f"{TOY}:gated") == ("features",)
    assert generic_pair(f"{TOY}:gated", NCLASS, WIDTH)[0].layers == ("features",)


def test_layer_never_called_is_a_value_error():
    """``--observe_layers`` naming a layer the network's forward never calls is a ValueError
    naming it."""
    with pytest.raises(ValueError, match="--observe_layers spare: .* never runs that layer"):
        generic_pair(f"{TOY}:with_unused", toy_segmenter.NCLASS, WIDTH, layers=["spare"])


# ----------------------------------------------------------------------------- user factories

def test_user_factories():
    """``module:factory`` networks: auto_layers takes the top-level children but the last,
    a factory with or without num_classes and with tensor or {"out": ...} output works; a
    non-Module, a wrong class count (--nclass) and a missing callable are ValueErrors."""
    net = toy_segmenter.build(NCLASS)
    assert auto_layers(net, f"{TOY}:build") == ("stem", "down", "mid", "head")
    assert family_layers(net) is None
    tap, observer = generic_pair(f"{TOY}:build", NCLASS, WIDTH)
    assert tap.layers == ("stem", "down", "mid", "head")
    x = torch.rand(2, 3, 32, 48)
    feats = tap(x, return_feat=True)
    assert [tuple(f.shape) for f in feats] == [(2, 8, 32, 48), (2, 16, 16, 24), (2, 16, 16, 24),
                                               (2, NCLASS, 16, 24), (2, NCLASS, 32, 48)]
    assert observer(x, feats).shape == (2, 1, 32, 48)

    tap, observer = generic_pair(f"{TOY}:build_dict", toy_segmenter.NCLASS, WIDTH)
    assert tap.layers == ("body",)
    assert tap(x).shape == (2, toy_segmenter.NCLASS, 32, 48)

    with pytest.raises(ValueError, match="--nclass"):
        generic_pair(f"{TOY}:build_dict", toy_segmenter.NCLASS + 1, WIDTH)
    with pytest.raises(ValueError, match="returned a dict, not a torch.nn.Module"):
        generic_pair(f"{TOY}:not_a_module", NCLASS, WIDTH)
    with pytest.raises(ValueError, match=f"--model {TOY}:missing: {TOY} has no callable missing"):
        resolve_factory(f"{TOY}:missing")
    with pytest.raises(ValueError, match="cannot import nosuchpkg.mod"):
        resolve_factory("nosuchpkg.mod:f")
    with pytest.raises(ValueError, match="not one of torchvision's segmentation models"):
        resolve_factory("torchvision:nope")


def test_network_with_a_layer_named_net_loads_its_state_dict():
    """A user network whose first layer is called ``net``: the tap's state_dict is the
    network's and loads back strictly."""
    tap, _ = generic_pair(f"{TOY}:with_net_child", NCLASS, WIDTH)
    plain = toy_segmenter.with_net_child(NCLASS)
    assert list(tap.state_dict()) == list(plain.state_dict())
    tap.load_state_dict(plain.state_dict(), strict=True)


# ----------------------------------------------------------------------------- backbone, scores

def test_backbone_weights_from_a_torchvision_file(tmp_path):
    """A torchvision mobilenet_v3_large state_dict file (plain, or under "model") becomes the
    backbone; a resnet18 file is a one-line CheckpointError."""
    torch.manual_seed(3)
    state = torchvision.models.mobilenet_v3_large(weights=None).state_dict()
    for name, content in [("plain.pth", state), ("wrapped.pth", {"model": state})]:
        torch.save(content, tmp_path / name)
        tap, _ = generic_pair(LRASPP, NCLASS, WIDTH, backbone_weights=str(tmp_path / name))
        assert torch.equal(tap.net.backbone["0"][0].weight, state["features.0.0.weight"])
        backbone = tap.net.backbone.state_dict()
        assert all(torch.equal(v, state[f"features.{k}"]) for k, v in backbone.items())
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "resnet18.pth")
    with pytest.raises(CheckpointError) as wrong:
        generic_pair(LRASPP, NCLASS, WIDTH, backbone_weights=str(tmp_path / "resnet18.pth"))
    message = str(wrong.value)
    assert "\n" not in message and "resnet18.pth" in message, message
    assert "not a torchvision mobilenet_v3_large state_dict" in message, message


def test_observer_scores_do_not_tie():
    """For random images, no single value of the observer's output holds 1% of the pixels
    (nothing clips the score before its last convolution)."""
    tap, observer = generic_pair(LRASPP, NCLASS, WIDTH)
    calibrate(lambda x: observer(x, tap(x, return_feat=True)), [tap, observer])
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        scores = observer(x, tap(x, return_feat=True))
    assert torch.isfinite(scores).all()
    _, counts = torch.unique(scores, return_counts=True)
    assert counts.max().item() < 0.01 * scores.numel(), counts.max().item()


# ----------------------------------------------------------------------------- command line

CLI_TINY = ["--data", "Synthetic", "--size", "32", "48", "--width_mult", str(WIDTH), "--bsize",
            "4", "--seed", "0"]
SYNTHETIC = SPECS["Synthetic"]


def run_flags(root, model=LRASPP, logs="logs"):
    """main.py's flags for the run folder ``root`` with ``--model model``."""
    return [*CLI_TINY, "--model", model, "--dset_folder", str(root / "data"), "--segnet_file",
            str(root / "segnet.pth"), "--obsnet_file", str(root / "obsnet"), "--tboard",
            str(root / logs)]


def train(root, model) -> None:
    """main.py trains the segmenter, then its observer (with the attack), one epoch each."""
    seg = main_py(*run_flags(root, model), "--train_segnet", "--epoch", "1")
    assert seg.returncode == 0, seg.stderr[-3000:]
    obs = main_py(*run_flags(root, model), "--epoch", "1", "--adv", "min_random_patch")
    assert obs.returncode == 0, obs.stderr[-3000:]


def run_test_only(root, *extra, logs="logs_test", model=LRASPP):
    return main_py(*run_flags(root, model, logs), "--test_only", *extra)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Synthetic data (8 train, 4 val, 4 test, 32x48) and lraspp_mobilenet_v3_large with its
    observer trained by main.py."""
    root = tmp_path_factory.mktemp("generic")
    generate(root / "data", seed=0, n_train=8, n_val=4, n_test=4, size=(32, 48))
    train(root, LRASPP)
    return root


def test_checkpoints_record_model_and_plain_weights(trained):
    """The observer's checkpoints record the --model spec and the layers it reads; the
    segmenter file holds torchvision's own keys, loadable strictly into torchvision's model."""
    for name in ("best.pth", "last.pth"):
        record = load_checkpoint(trained / "obsnet" / name)["observer"]
        assert record["model"] == LRASPP
        assert record["layers"] == list(MOBILENET_LAYERS)
    state = load_checkpoint(trained / "segnet.pth")["model"]
    assert not any(k.startswith("net.") for k in state)
    plain = torchvision.models.segmentation.lraspp_mobilenet_v3_large(
        num_classes=SYNTHETIC.nclass, weights=None, weights_backbone=None)
    plain.load_state_dict(state, strict=True)


def test_test_only_scores_obsnet_and_mcp(trained):
    """--test_only scores obsnet and mcp with finite AUROCs in results_test_ood.json."""
    result = run_test_only(trained, "--test_multi", "obsnet,mcp")
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((trained / "logs_test" / "results_test_ood.json").read_text())
    assert set(results["methods"]) == {"obsnet", "mcp"}
    for entry in results["methods"].values():
        for task in ("ood", "error"):
            assert math.isfinite(entry[task]["auroc"]) and 0 <= entry[task]["auroc"] <= 1, entry


def test_mc_dropout_refused_without_dropout_layers(trained):
    """--test_multi mc_dropout with a segmenter without dropout layers: exit 2, one line."""
    result = run_test_only(trained, "--test_multi", "obsnet,mc_dropout", logs="logs_mc")
    assert error_line(result, code=2) == (
        f"main.py: error: --test_multi mc_dropout needs dropout layers in the segmenter, and "
        f"--model {LRASPP} has none; leave it out")


def test_checkpoint_refuses_other_layers_or_model(trained):
    """The observer checkpoint's layers and model win: --observe_layers or --model other than
    recorded is one line; the recorded layers given again are accepted."""
    other_layers = run_test_only(trained, "--test_multi", "obsnet", "--observe_layers", "backbone.1",
                             logs="logs_layers")
    line = error_line(other_layers, code=1)
    assert "--observe_layers backbone.3,backbone.6,backbone.12,backbone.16" in line, line
    assert "records its layers" in line, line
    other_model = run_test_only(trained, "--test_multi", "obsnet", logs="logs_model", model=DEEPLAB)
    assert "--model" in error_line(other_model)
    same = run_test_only(trained, "--test_multi", "obsnet", "--observe_layers",
                     ",".join(MOBILENET_LAYERS), logs="logs_same")
    assert same.returncode == 0, same.stderr[-3000:]


BAD_MODEL_FLAGS = [
    pytest.param(["--model", "torchvision:nope"], "--model torchvision:nope: not one of "
                 "torchvision's segmentation models", id="unknown-torchvision-name"),
    pytest.param(["--model", "nosuchpkg.mod:f"], "--model nosuchpkg.mod:f: cannot import "
                 "nosuchpkg.mod", id="module-not-importable"),
    pytest.param(["--model", f"{TOY}:missing"], f"{TOY} has no callable missing",
                 id="no-such-factory"),
    pytest.param(["--model", "segnet", "--observe_layers", "a"], "--observe_layers is for --model",
                 id="observe-layers-with-segnet"),
    pytest.param(["--model", LRASPP, "--obs_mlp"], "--obs_mlp reads one SegNet map: not available "
                 f"with --model {LRASPP}", id="obs-mlp-with-torchvision"),
]


@pytest.mark.parametrize("flags,message", BAD_MODEL_FLAGS)
def test_bad_model_flags_are_one_line(flags, message, tmp_path):
    """Model flags that cannot work: exit 2, one stderr line, nothing written."""
    result = main_py(*CLI_TINY, "--dset_folder", str(tmp_path / "data"), "--segnet_file",
                     str(tmp_path / "s.pth"), "--obsnet_file", str(tmp_path / "o"), "--tboard",
                     str(tmp_path / "logs"), *flags, "--train_segnet")
    line = error_line(result, code=2)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert message in line, line
    assert not list(tmp_path.iterdir())


def test_inference_and_export_check_model_flags(tmp_path):
    """inference.py and the export check --model as main.py does: exit 2, one line."""
    common = ["--segnet_file", str(tmp_path / "s.pth"), "--obsnet_file", str(tmp_path / "o"),
              "--model", "torchvision:nope"]
    runs = {"inference.py": inference_py(*common, "--img_folder", str(tmp_path), "--out",
                                         str(tmp_path / "out")),
            "python -m obsnet.export": python("-m", "obsnet.export", *common, "--out",
                                              str(tmp_path / "m.onnx"))}
    for program, result in runs.items():
        line = error_line(result, program, code=2)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "--model torchvision:nope: not one of torchvision's" in line, line
    assert not list(tmp_path.iterdir())


def test_inference_writes_maps(trained):
    """inference.py with the lraspp checkpoints: a triptych PNG and a probability map per
    image, at the image's size."""
    images, out = trained / "images", trained / "inference"
    images.mkdir()
    rng = np.random.default_rng(0)
    sizes = {"a.png": (40, 60), "b.png": (33, 50)}
    for name, (h, w) in sizes.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(images / name)
    result = inference_py("--data", "Synthetic", "--model", LRASPP, "--segnet_file",
                          str(trained / "segnet.pth"), "--obsnet_file", str(trained / "obsnet"),
                          "--img_folder", str(images), "--out", str(out), "--size", "32", "48",
                          "--width_mult", str(WIDTH))
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [".written_by_obsnet_inference", "a.png.npy",
                                                     "a.png.png", "b.png.npy", "b.png.png"]
    for name, (h, w) in sizes.items():
        prob = np.load(out / f"{name}.npy")
        assert prob.shape == (h, w) and 0 <= prob.min() and prob.max() <= 1
        with Image.open(out / f"{name}.png") as picture:
            assert picture.size == (3 * w, h)


@pytest.fixture(scope="module")
def exported(trained):
    """``python -m obsnet.export`` on the lraspp checkpoints, traced at 64x96: (its result,
    the ONNX file)."""
    out = trained / "onnx" / "lraspp.onnx"
    result = python("-m", "obsnet.export", "--data", "Synthetic", "--model", LRASPP,
                    "--segnet_file", trained / "segnet.pth", "--obsnet_file", trained / "obsnet",
                    "--out", out, "--size", "64", "96", "--width_mult", str(WIDTH), timeout=600)
    return result, out


@pytest.mark.slow
def test_export_cli_writes_and_checks(exported):
    """The export of a torchvision segmenter and its observer: exit 0, the file, one parity
    line (batch 1 at the traced size, batch 2 at another) within 1e-4."""
    result, out = exported
    assert result.returncode == 0, result.stderr[-3000:]
    assert out.is_file()
    assert "outputs logits, observer_prob; traced at 64x96" in result.stdout, result.stdout
    parity = [line for line in result.stdout.splitlines() if "max |diff|" in line]
    assert len(parity) == 1, result.stdout
    assert "batch 1 at 64x96" in parity[0] and "batch 2 at 36x60" in parity[0], parity[0]
    diffs = [float(d) for d in re.findall(r"observer_prob ([0-9.e+-]+)", parity[0])]
    assert len(diffs) == 2 and max(diffs) <= TOLERANCE, parity[0]


@pytest.mark.slow
def test_onnx_parity_with_the_tap_and_observer(exported, trained):
    """onnxruntime runs the exported file like ExportGraph(tap, observer) built here from the
    checkpoints in PyTorch: observer_prob within 1e-4 at the traced size and another, batch 1
    and 2; logits within 1e-5 of their magnitude."""
    pytest.importorskip("onnxruntime")
    result, out = exported
    assert result.returncode == 0, result.stderr[-3000:]
    tap, observer = generic_pair(LRASPP, SYNTHETIC.nclass, WIDTH)
    tap.load_state_dict(load_checkpoint(trained / "segnet.pth")["model"], strict=True)
    observer.load_state_dict(load_checkpoint(trained / "obsnet" / "best.pth")["model"], strict=True)
    graph = export.ExportGraph(tap, observer, SYNTHETIC.mean, SYNTHETIC.std)
    cases = [(1, 64, 96), (2, 64, 96), (1, 40, 56), (2, 40, 56)]
    rows = export.parity(out, graph, cases)
    with torch.no_grad():
        scale = float(graph(torch.rand(2, 3, 64, 96))[0].abs().max())
    assert [case for case, _ in rows] == cases
    for case, diffs in rows:
        assert diffs["observer_prob"] <= TOLERANCE, (case, diffs)
        assert diffs["logits"] <= max(TOLERANCE, 1e-5 * scale), (case, diffs, scale)


def test_user_factory_end_to_end(trained, tmp_path):
    """--model tests.helpers.toy_segmenter:build: segmenter, observer and --test_only all run."""
    (tmp_path / "data").symlink_to(trained / "data", target_is_directory=True)
    train(tmp_path, f"{TOY}:build")
    record = load_checkpoint(tmp_path / "obsnet" / "best.pth")["observer"]
    assert record["model"] == f"{TOY}:build"
    assert record["layers"] == ["stem", "down", "mid", "head"]
    result = run_test_only(tmp_path, "--test_multi", "obsnet,mcp", model=f"{TOY}:build")
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "logs_test" / "results_test_ood.json").read_text())
    assert set(results["methods"]) == {"obsnet", "mcp"}


def test_float16_autocast_attack_and_observer():
    """The float16 path users train on (here CPU autocast): the attack perturbs the image
    inside its mask, the observer's forward and backward stay finite, through the tap."""
    from obsnet.attacks import AttackConfig, select_attack
    from obsnet.models.segnet import freeze

    torch.manual_seed(0)
    tap, observer = generic_pair(LRASPP, NCLASS, WIDTH)
    tap = freeze(tap)
    x, y = torch.randn(2, 3, 64, 96), torch.randint(0, NCLASS, (2, 64, 96))
    cfg = AttackConfig(mode="min", mask="random_patch", epsilon=0.025, patch_size=(32, 32, 10, 20),
                       nclass=NCLASS, mean=(0.45,) * 3, std=(0.25,) * 3)
    with torch.autocast("cpu", dtype=torch.float16):
        attack = select_attack(x, y, tap, cfg)
        feats = tap(attack.images, return_feat=True)
        logit = observer(attack.images, feats)
    assert logit.dtype == torch.float16 and torch.isfinite(logit).all()
    changed = (attack.images != x).any(dim=1)
    assert changed.any() and not changed.all()  # inside the mask only
    logit.float().mean().backward()
    grads = [p.grad for p in observer.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_failing_factory_is_one_value_error():
    """A user factory that raises is a ValueError naming --model and the factory's error (the
    CLI prints it in one line)."""
    with pytest.raises(ValueError, match=r"--model tests.helpers.toy_segmenter:broken: the factory failed "
                                         r"\(TypeError: cannot build 5 classes\)"):
        generic_pair(f"{TOY}:broken", 5, WIDTH)


# ----------------------------------------------------------------------------- flawed factories

@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    """Synthetic data at 32x48 (8 train, 4 val, 4 test) for the toy factories' runs."""
    root = tmp_path_factory.mktemp("toy-data")
    generate(root, seed=0, n_train=8, n_val=4, n_test=4, size=(32, 48))
    return root


def toy_run(toy_data, root, factory, *flags, script=main_py):
    """main.py (or ``script``) with --model tests.helpers.toy_segmenter:``factory`` on ``toy_data``,
    its files in ``root``; ``flags`` last (a --size there wins)."""
    return script(*CLI_TINY, "--model", f"{TOY}:{factory}", "--dset_folder", str(toy_data),
                  "--segnet_file", str(root / "segnet.pth"), "--obsnet_file", str(root / "obsnet"),
                  "--tboard", str(root / "logs"), "--epoch", "1", *flags)


FLAWED_FACTORIES = [
    pytest.param("dict_without_out", [], 'its output is a dict without "out" (keys: logits, aux); '
                 "return the logits, or {\"out\": logits} as torchvision's models do",
                 id="dict-without-out"),
    pytest.param("half", [], "its weights are float16 (first: stem.0.weight), and segmenters run "
                 "in float32 here; convert it with .float() (--amp gives mixed precision)",
                 id="half-precision"),
    pytest.param("fixed_size", ["--size", "64", "64"], "the probe pass at --size 64 64 failed "
                 "(RuntimeError: The size of tensor a (64) must match the size of tensor b (48) "
                 "at non-singleton dimension 3): one random image through the network, before "
                 "the run, to find the maps to observe; give --size a size the network takes",
                 id="probe-fails-at-size"),
    pytest.param("scripted", [], "a TorchScript module (torch.jit.script or torch.jit.trace), "
                 "whose layers cannot be observed (forward hooks do not run inside TorchScript); "
                 "give the nn.Module it was made from", id="torchscript"),
    pytest.param("traced", [], "a TorchScript module (torch.jit.script or torch.jit.trace), "
                 "whose layers cannot be observed (forward hooks do not run inside TorchScript); "
                 "give the nn.Module it was made from", id="torchscript-traced"),
    pytest.param("classifier", [], "not a segmentation network: its output is 1×12 (B×C, a "
                 "classifier's), and B×C×H×W class logits are needed", id="classifier"),
    pytest.param("nan_output", [], "gives NaN or infinite values for a random image at --size 32 "
                 "48 (first: layer head) before anything was trained; check how it is built (its "
                 "weights)", id="nan-output"),
]


@pytest.mark.parametrize("factory,flags,message", FLAWED_FACTORIES)
def test_flawed_factory_is_one_line(factory, flags, message, toy_data, tmp_path):
    """A user factory whose network cannot be observed: exit 1, one line naming --model and
    what is wrong (not a traceback, not a misleading flag), no segmenter written."""
    result = toy_run(toy_data, tmp_path, factory, "--train_segnet", *flags)
    assert error_line(result, code=1) == f"main.py: error: --model {TOY}:{factory}: {message}"
    assert not (tmp_path / "segnet.pth").exists()


def test_fixed_size_network_is_probed_at_the_runs_size(toy_data, tmp_path):
    """A network that takes only 32x48 images trains its segmenter, tests and runs
    inference.py at --size 32 48 (the probe pass is made at --size, not 64x64)."""
    segmenter = toy_run(toy_data, tmp_path, "fixed_size", "--train_segnet")
    assert segmenter.returncode == 0, segmenter.stderr[-3000:]
    observer = toy_run(toy_data, tmp_path, "fixed_size")
    assert observer.returncode == 0, observer.stderr[-3000:]
    tested = toy_run(toy_data, tmp_path, "fixed_size", "--test_only", "--test_multi", "obsnet,mcp")
    assert tested.returncode == 0, tested.stderr[-3000:]
    inferred = inference_py("--data", "Synthetic", "--model", f"{TOY}:fixed_size", "--segnet_file",
                            str(tmp_path / "segnet.pth"), "--obsnet_file", str(tmp_path / "obsnet"),
                            "--img_folder", str(toy_data / "test"), "--out",
                            str(tmp_path / "inference"), "--size", "32", "48", "--width_mult",
                            str(WIDTH))
    assert inferred.returncode == 0, inferred.stderr[-3000:]
    assert len(list((tmp_path / "inference").glob("*.npy"))) == 4


def test_network_changing_its_input_in_place_trains_with_the_attack(toy_data, tmp_path):
    """A network that clamps its input in place trains as a segmenter, then its observer with
    the attack (whose image requires grad): the tap gives the network a copy of the image."""
    segmenter = toy_run(toy_data, tmp_path, "in_place_input", "--train_segnet")
    assert segmenter.returncode == 0, segmenter.stderr[-3000:]
    observer = toy_run(toy_data, tmp_path, "in_place_input", "--adv", "min_random_patch")
    assert observer.returncode == 0, observer.stderr[-3000:]
    assert (tmp_path / "obsnet" / "best.pth").is_file()


def test_tap_leaves_the_callers_image_alone():
    """The tap of a network that changes its input in place leaves the caller's image as it
    was, and the network sees the same values as without the tap."""
    tap, _ = generic_pair(f"{TOY}:in_place_input", NCLASS, WIDTH)
    tap.eval()
    x = 4 * torch.randn(2, 3, 32, 48)
    before = x.clone()
    with torch.no_grad():
        logits = tap(x)
        assert torch.equal(logits, tap.net(before.clone()))
    assert torch.equal(x, before) and x._version == before._version


def probed_tap(net, layers, given: bool, spec=f"{TOY}:with_unused"):
    """The probe pass of a FeatureTap of ``net`` observing ``layers`` (``given``: named by the
    user, else a default)."""
    return probe_maps(FeatureTap(net, layers, spec, given=given))


def test_default_layers_are_not_blamed_on_the_flag():
    """A default layer the network never runs is named as the network's, with the flag that
    would change it, not as an --observe_layers the user never gave."""
    net = toy_segmenter.with_unused()
    with pytest.raises(ValueError) as error:
        probed_tap(net, ["body", "spare"], given=False)
    assert str(error.value) == (f"--model {TOY}:with_unused: never runs that layer in its forward "
                                f"pass (layer spare, observed by default); name the layers to "
                                f"observe (--observe_layers)")


def test_torchscript_part_is_named():
    """An observed layer inside a TorchScript part of an eager network is one line naming the
    layer and the part; auto_layers leaves a TorchScript child out."""
    net = nn.Sequential(torch.jit.script(toy_segmenter.build(NCLASS)), nn.Identity())
    with pytest.raises(ValueError) as error:
        probed_tap(net, ["0.stem"], given=True, spec=f"{TOY}:scripted_child")
    assert str(error.value) == (f"--observe_layers 0.stem: --model {TOY}:scripted_child runs that "
                                f"layer as TorchScript (inside 0), where forward hooks do not "
                                f"run; observe layers outside it, or give the nn.Module it was "
                                f"made from")
    with pytest.raises(ValueError, match="no top-level layer gives a B×C×H×W map"):
        auto_layers(net, f"{TOY}:scripted_child")
