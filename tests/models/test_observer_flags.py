"""The observer's architecture flags (--obs_mlp, --no_residual, --no_img) recorded in its
checkpoints and used to run it: validation during training, main.py --test_only, inference.py."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from obsnet.data.loaders import build_dataset, build_loader
from obsnet.data.specs import SPECS
from obsnet.evaluate import evaluate
from obsnet.methods import MethodConfig
from obsnet.models.blocks import fold_batchnorm
from obsnet.models.checkpoint import CheckpointError, load_weights
from obsnet.models.obsnet import Obsnet_Seg
from obsnet.models.observer_spec import (OBSERVER_FLAGS, ObserverRequest, ObserverSpec, observer_path,
                                         recorded_spec, resolve_observer)
from obsnet.models.registry import build_observer, load_observer, load_segmenter
from tests.helpers.runner import TINY, inference_py, main_py, paths

SPEC = SPECS["Synthetic"]
NCLASS, WIDTH, SIZE = 12, 0.0625, (32, 48)  # as TINY
PROTOCOLS = ("error", "ood", "ood_per_image")  # the metrics of a method (not its timing)


@pytest.fixture(scope="module")
def run(run_dir):
    """``run_dir``'s tiny SegNet (conftest); an observer trained with --no_residual and one
    with --obs_mlp."""
    root = run_dir
    for name, flag in (("nores", "--no_residual"), ("mlp", "--obs_mlp")):
        obs = main_py(*TINY, *paths(root), "--epoch", "1", "--lr", "0.01", flag,
                      "--obsnet_file", str(root / name), "--tboard", str(root / f"{name}_logs"))
        assert obs.returncode == 0, obs.stderr
    return root


def observer_with(segnet, obsnet_file, no_residual: bool):
    """The checkpoint's observer, built from its recorded spec with ``no_residual`` set as
    given (the same weights either way)."""
    spec = replace(resolve_observer(obsnet_file, ObserverRequest()), no_residual=no_residual)
    obsnet = build_observer(spec, segnet, NCLASS, WIDTH)
    load_weights(obsnet, observer_path(obsnet_file), "--obsnet_file")
    return obsnet


def python_eval(root, obsnet_file, split, no_residual, fold=False):
    """The obsnet metrics of ``evaluate`` in this process, the observer run with ``no_residual``."""
    segnet = load_segmenter("segnet", NCLASS, WIDTH, root / "segnet.pth")
    obsnet = observer_with(segnet, obsnet_file, no_residual)
    if fold:  # as the training's validation, which folds the frozen SegNet's batch norms
        segnet = fold_batchnorm(segnet)
    loader = build_loader(build_dataset(SPEC, root / "data", split, SIZE, train=False), 4,
                          train=False)
    results, _, _ = evaluate(segnet, obsnet, loader, ["obsnet"], SPEC, torch.device("cpu"),
                             MethodConfig(), NCLASS, split, progress=False)
    entry = results["methods"]["obsnet"]
    return {k: entry[k] for k in PROTOCOLS if k in entry}  # no "ood" on a split without anomalies


@pytest.fixture(scope="module")
def reference(run):
    """Python evaluations of the --no_residual observer on the test split, flag on and off."""
    return {flag: python_eval(run, run / "nores", SPEC.test_split, flag) for flag in (True, False)}


def cli_metrics(logs):
    entry = json.loads((logs / "results_test_ood.json").read_text())["methods"]["obsnet"]
    return {k: entry[k] for k in PROTOCOLS if k in entry}


def approx(metrics):
    return {k: pytest.approx(v, rel=1e-6, abs=1e-9) for k, v in metrics.items()}


def test_training_records_the_flags_in_best_and_last(run):
    for name in ("best.pth", "last.pth"):
        state = torch.load(run / "nores" / name, weights_only=True)
        assert state["observer"] == {"obs_mlp": False, "no_residual": True, "no_img": False,
                                     "head": "linear", "model": "segnet", "layers": None,
                                     "inputs": "features", "kind": "mirror"}, name
        mlp = torch.load(run / "mlp" / name, weights_only=True)
        assert mlp["observer"] == {"obs_mlp": True, "no_residual": False, "no_img": False,
                                   "head": "linear", "model": "segnet", "layers": None,
                                   "inputs": "features", "kind": "mirror"}, name


def test_training_validates_with_the_flags(run):
    """The best val AUROC kept in the checkpoint is that of the observer run with no_residual."""
    best = torch.load(run / "nores" / "last.pth", weights_only=True)["best"]
    with_flag = python_eval(run, run / "nores", SPEC.val_split, True, fold=True)
    without = python_eval(run, run / "nores", SPEC.val_split, False, fold=True)
    assert best == pytest.approx(with_flag["error"]["auroc"], rel=1e-6)
    assert best != pytest.approx(without["error"]["auroc"], rel=1e-6)


def test_test_only_runs_the_observer_as_its_checkpoint_records(run, reference):
    logs = run / "test_logs"
    test = main_py(*TINY, *paths(run), "--obsnet_file", str(run / "nores"), "--tboard", str(logs),
                   "--test_only", "--test_multi", "obsnet")  # no --no_residual
    assert test.returncode == 0, test.stderr
    metrics = cli_metrics(logs)
    assert reference[True] != approx(reference[False])  # the flag changes the numbers
    assert metrics == approx(reference[True])
    assert metrics != approx(reference[False])


def test_a_flag_the_checkpoint_was_trained_without_is_one_line(run, tmp_path):
    test = main_py(*TINY, *paths(run), "--obsnet_file", str(run / "nores"), "--tboard",
                   str(tmp_path / "logs"), "--test_only", "--test_multi", "obsnet", "--no_img")
    assert test.returncode == 1, test.stderr
    lines = test.stderr.strip().splitlines()
    assert len(lines) == 1, test.stderr
    assert "trained without --no_img" in lines[0]
    assert "Traceback" not in test.stderr


def test_plain_state_dict_uses_the_command_line_flags(run, reference, tmp_path):
    """The original project's observer files (weights only) record no flag: the CLI's apply
    (the head too: a plain state_dict has the original's unless --obs_head says otherwise)."""
    plain = tmp_path / "plain.pth"
    torch.save(torch.load(run / "nores" / "best.pth", weights_only=True)["model"], plain)
    assert recorded_spec(plain) is None
    logs = tmp_path / "logs"
    test = main_py(*TINY, *paths(run), "--obsnet_file", str(plain), "--tboard", str(logs),
                   "--test_only", "--test_multi", "obsnet", "--no_residual", "--obs_head", "linear")
    assert test.returncode == 0, test.stderr
    assert cli_metrics(logs) == approx(reference[True])
    assert cli_metrics(logs) != approx(reference[False])


def test_inference_runs_the_observer_as_its_checkpoint_records(run, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    h, w = 40, 60
    pixels = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(images / "a.png")
    out = tmp_path / "out"
    result = inference_py("--data", "Synthetic", "--segnet_file", str(run / "segnet.pth"),
                          "--obsnet_file", str(run / "nores"), "--img_folder", str(images),
                          "--out", str(out), "--width_mult", str(WIDTH), "--size", *map(str, SIZE))
    assert result.returncode == 0, result.stderr
    written = np.load(out / "a.png.npy").astype(np.float32)
    assert written.shape == (h, w)

    from obsnet.inference import predict, prepare
    segnet = load_segmenter("segnet", NCLASS, WIDTH, run / "segnet.pth")
    loaded, spec = load_observer(run / "nores", ObserverRequest(), segnet, NCLASS, WIDTH)
    assert spec.no_residual and loaded.no_residual  # as its checkpoint records
    observers = {True: loaded.eval(), False: observer_with(segnet, run / "nores", False).eval()}
    batch = prepare([torch.from_numpy(pixels).permute(2, 0, 1)], SIZE, SPEC)

    def prob_map(no_residual):
        _, prob = predict(segnet, observers[no_residual], batch)
        return F.interpolate(prob[None], size=(h, w), mode="bilinear")[0, 0].numpy()

    # The tiny observer's map is nearly flat (about 0.375), so the flag moves it by only a few
    # float16 steps: compare at float16 precision (rounding is within 2**-11 relative).
    with_flag, without = prob_map(True), prob_map(False)
    tol = dict(rtol=5e-4, atol=1e-6)
    assert not np.allclose(with_flag, without, **tol)  # the flag changes the map
    np.testing.assert_allclose(written, with_flag, **tol)
    assert not np.allclose(written, without, **tol)
    same = lambda a: (written.astype(np.float16) == a.astype(np.float16)).mean()  # noqa: E731
    assert same(with_flag) > 0.99 and same(without) < 0.9


def test_obs_mlp_checkpoint_tested_without_obs_mlp(run):
    logs = run / "mlp_test_logs"
    test = main_py(*TINY, *paths(run), "--obsnet_file", str(run / "mlp" / "best.pth"),
                   "--tboard", str(logs), "--test_only", "--test_multi", "obsnet")  # no --obs_mlp
    assert test.returncode == 0, test.stderr
    assert "obsnet" in json.loads((logs / "results_test_ood.json").read_text())["methods"]


# --------------------------------------------------------------------------- unit tests

def weights():
    return Obsnet_Seg(3, 1, width_mult=WIDTH).state_dict()


def test_recorded_spec_reads_what_a_checkpoint_records(tmp_path):
    torch.save({"model": weights(), "observer": {"obs_mlp": False, "no_residual": True,
                                                 "no_img": False}}, tmp_path / "full.pth")
    assert recorded_spec(tmp_path / "full.pth") == ObserverSpec(
        model=None, kind="mirror", head="original", inputs="features", layers=None,
        obs_mlp=False, no_residual=True, no_img=False)
    torch.save({"model": weights(), "observer": {"no_img": 1}}, tmp_path / "partial.pth")
    assert recorded_spec(tmp_path / "partial.pth") == ObserverSpec(
        model=None, kind="mirror", head="original", inputs="features", layers=None,
        obs_mlp=False, no_residual=False, no_img=True)
    folder = tmp_path / "folder"
    folder.mkdir()
    torch.save({"model": weights(), "observer": {"obs_mlp": True}}, folder / "best.pth")
    assert observer_path(folder) == folder / "best.pth"
    assert observer_path(folder / "best.pth") == folder / "best.pth"
    assert recorded_spec(folder).obs_mlp is True
    assert set(OBSERVER_FLAGS) == {"obs_mlp", "no_residual", "no_img"}


@pytest.mark.parametrize("state", [
    pytest.param(lambda: weights(), id="plain-state-dict"),
    pytest.param(lambda: {"model": weights(), "epoch": 3}, id="model-without-observer"),
    pytest.param(lambda: {"model": weights(), "observer": True}, id="observer-not-a-dict"),
])
def test_checkpoints_without_flags_give_none(state, tmp_path):
    torch.save(state(), tmp_path / "obs.pth")
    assert recorded_spec(tmp_path / "obs.pth") is None
    given = ObserverRequest(no_residual=True)
    resolved = resolve_observer(tmp_path / "obs.pth", given)
    assert resolved == ObserverSpec(model=None, kind="mirror", head="original", inputs="features",
                                    no_residual=True)
    assert resolve_observer(tmp_path / "obs.pth", replace(given, head="linear")).head == "linear"


def test_resolve_prefers_the_checkpoint_and_refuses_a_contradicting_flag(tmp_path):
    recorded = {"obs_mlp": True, "no_residual": True, "no_img": False, "head": "linear"}
    torch.save({"model": {}, "observer": recorded}, tmp_path / "obs.pth")
    # older checkpoints record neither model, layers, inputs nor kind: their defaults
    expected = ObserverSpec(model=None, kind="mirror", head="linear", inputs="features",
                            layers=None, obs_mlp=True, no_residual=True, no_img=False)
    assert resolve_observer(tmp_path / "obs.pth", ObserverRequest()) == expected
    assert resolve_observer(tmp_path / "obs.pth",
                            ObserverRequest(obs_mlp=True, no_residual=True)) == expected
    with pytest.raises(CheckpointError, match="trained without --no_img"):
        resolve_observer(tmp_path / "obs.pth", ObserverRequest(no_img=True))
    torch.save({"model": {}, "observer": dict.fromkeys(OBSERVER_FLAGS, False)}, tmp_path / "b.pth")
    for flag in OBSERVER_FLAGS:
        with pytest.raises(CheckpointError, match=f"trained without --{flag}"):
            resolve_observer(tmp_path / "b.pth", ObserverRequest(**{flag: True}))


def test_resolve_refuses_another_model_or_other_layers(tmp_path):
    """A checkpoint that records its model spec and layers is run with them: --model or
    --observe_layers that say otherwise are refused, the same ones (or none) accepted."""
    recorded = dict.fromkeys(OBSERVER_FLAGS, False) | {
        "head": "linear", "model": "torchvision:fcn_resnet50", "layers": ["backbone.layer1"]}
    torch.save({"model": {}, "observer": recorded}, tmp_path / "obs.pth")
    same = ObserverRequest(model="torchvision:fcn_resnet50", layers=("backbone.layer1",))
    assert resolve_observer(tmp_path / "obs.pth", same).layers == ("backbone.layer1",)
    assert resolve_observer(tmp_path / "obs.pth", ObserverRequest()).model == "torchvision:fcn_resnet50"
    with pytest.raises(CheckpointError, match="trained with --model torchvision:fcn_resnet50"):
        resolve_observer(tmp_path / "obs.pth", ObserverRequest(model="segnet"))
    with pytest.raises(CheckpointError, match="reads --observe_layers backbone.layer1;"):
        resolve_observer(tmp_path / "obs.pth", ObserverRequest(layers=("backbone.layer2",)))


def test_missing_observer_file_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        recorded_spec(tmp_path / "none.pth")
    with pytest.raises(CheckpointError, match="not found"):
        resolve_observer(tmp_path / "none.pth", ObserverRequest())
