"""Provenance (issue 25, items 1, 7 and 9).

- A checkpoint is data: its recorded preset never chooses code to run (a ``module:factory`` is
  used only when the command line names it) and every recorded field is checked.
- Every derived file (``--fit_stats`` statistics, observer checkpoints, the ONNX export) records
  the fingerprint of the segmenter it was made from, and one made from another is refused.
- ``python -m obsnet.export`` and ``inference.py`` adopt the segmenter's recorded preset as
  ``main.py`` does (its normalisation, classes, model and width; ``--data`` optional).
"""
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from obsnet.data.specs import SPECS
from obsnet.methods import METHODS, EvalBatch, MethodConfig
from obsnet.models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, weights_fingerprint
from obsnet.models.obsnet import Obsnet_Seg
from obsnet.models.observer_spec import ObserverRequest, recorded_spec
from obsnet.models.registry import load_observer, load_segmenter
from obsnet.models.segnet import SegNet, freeze
from obsnet.preset import preset_of, recorded_preset
from obsnet.stats import ClassStats, load_stats, toy_class_stats
from tests.helpers import ROOT
from tests.helpers.smiyc import make_anomaly
from tests.helpers.runner import TINY, inference_py, main_py, paths, python

WIDTH, SIZE = 0.0625, (32, 48)
OBSERVER = {"obs_mlp": False, "no_residual": False, "no_img": False, "head": "linear",
            "model": "segnet", "layers": None}


def one_error_line(result, code: int, *parts: str, prog: str = "main.py") -> str:
    """The single stderr line of a refused run, checked: exit ``code``, ``parts`` in it."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, result.stderr
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), result.stderr
    for part in parts:
        assert part in lines[0], lines[0]
    return lines[0]


def calibrated(net: torch.nn.Module, *inputs) -> torch.nn.Module:
    """``net`` with the batch statistics of one forward pass on ``inputs`` in its batch norms
    (as training would give them), so that random weights give outputs that vary with the
    input (and with its normalisation)."""
    for module in net.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None
    net.train()
    with torch.no_grad():
        net(*inputs)
    return net.eval()


def save_segnet(path, seed: int, preset: dict | None) -> SegNet:
    """A random tiny SegNet (12 classes) saved at ``path``, recording ``preset`` when given."""
    torch.manual_seed(seed)
    net = calibrated(SegNet(3, 12, width_mult=WIDTH), torch.randn(4, 3, *SIZE))
    save_checkpoint(path, {"model": net.state_dict()} | ({"preset": preset} if preset else {}))
    return net


def save_observer(folder, segnet) -> Obsnet_Seg:
    """A random tiny observer saved as ``folder/best.pth``, recording ``segnet``'s fingerprint."""
    torch.manual_seed(5)
    image = torch.randn(4, 3, *SIZE)
    with torch.no_grad():
        feats = segnet(image, return_feat=True)
    obs = calibrated(Obsnet_Seg(3, 1, width_mult=WIDTH), image, feats)
    save_checkpoint(folder / "best.pth", {"model": obs.state_dict(), "observer": OBSERVER,
                                          "segmenter": weights_fingerprint(segnet)})
    return obs


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    """Two SegNets "trained" on Synthetic (recorded preset, another seed each), an observer of
    the first, and a folder of two images."""
    root = tmp_path_factory.mktemp("provenance")
    preset = preset_of("Synthetic", "segnet", WIDTH, 12, SIZE)
    segnet = save_segnet(root / "a.pth", 0, preset)
    save_segnet(root / "b.pth", 1, preset)
    save_observer(root / "obs", segnet)
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name, (h, w) in {"x.png": (40, 60), "y.png": (30, 52)}.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(images / name)
    return root


# ------------------------------------------------------------ item 1: a checkpoint is data

EVILMOD = """
from pathlib import Path
Path("IMPORTED").write_text("evilmod was imported")
def build(num_classes=19):
    Path("CALLED").write_text("evilmod.build was called")
    import torch.nn as nn
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, num_classes, 1))
"""


@pytest.fixture
def benchmark(tmp_path):
    """A folder holding a RoadAnomaly21 dataset and ``evilmod.py``, which leaves a marker file
    when imported and another when its factory is called."""
    root = tmp_path / "factory"
    make_anomaly(root / "datasets")
    (root / "evilmod.py").write_text(EVILMOD)
    return root


def benchmark_run(folder, segnet_file, *extra):
    """``main.py --data RoadAnomaly21 --test_only`` run in ``folder`` (where evilmod.py is)."""
    return python(str(ROOT / "main.py"), "--data", "RoadAnomaly21", "--test_only", "--dset_folder",
                  str(folder / "datasets"), "--segnet_file", str(segnet_file), "--test_multi",
                  "mcp", "--tboard", str(folder / "logs"), *extra, cwd=folder, timeout=120)


@pytest.mark.parametrize("spec", ["evilmod:build", "os:abort", "pdb:set_trace"])
def test_recorded_user_factory_is_never_run(benchmark, spec):
    segnet_file = benchmark / f"{spec.replace(':', '_')}.pth"
    preset = preset_of("Cityscapes", spec, WIDTH, 19, (64, 128))
    save_checkpoint(segnet_file, {"model": SegNet(3, 19, width_mult=WIDTH).state_dict(),
                                  "preset": preset})
    result = benchmark_run(benchmark, segnet_file)
    one_error_line(result, 2, f"--segnet_file {segnet_file} records --model {spec}, a user factory",
                   "a checkpoint never chooses code to run", f"pass --model {spec} yourself")
    assert not (benchmark / "IMPORTED").exists() and not (benchmark / "CALLED").exists()


def test_user_factory_runs_when_the_command_line_names_it(benchmark):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4),
                              torch.nn.ReLU(), torch.nn.Conv2d(4, 19, 1))  # evilmod.build's
    segnet_file = benchmark / "trusted.pth"
    save_checkpoint(segnet_file, {"model": net.state_dict(), "preset": preset_of(
        "Cityscapes", "evilmod:build", 1.0, 19, (64, 128))})
    # another user factory than the recorded one: refused before anything is imported
    result = benchmark_run(benchmark, segnet_file, "--model", "other:build")
    one_error_line(result, 2, "--model other:build: ", f"--segnet_file {segnet_file} was trained "
                   "with --model evilmod:build", "pass --model evilmod:build if you trust it")
    assert not (benchmark / "IMPORTED").exists()
    result = benchmark_run(benchmark, segnet_file, "--model", "evilmod:build")  # trusted: runs
    assert result.returncode == 0, result.stderr
    assert (benchmark / "IMPORTED").exists() and (benchmark / "CALLED").exists()


HOSTILE = [  # (field, value): each one invalid
    ("data", "RoadAnomaly21"), ("data", ["CamVid"]), ("model", "torchvision:not_a_model"),
    ("model", "evil mod:x"), ("model", 5), ("nclass", 0), ("nclass", 10 ** 9), ("nclass", 12.0),
    ("nclass", True), ("width_mult", float("nan")), ("width_mult", 0), ("width_mult", "1"),
    ("width_mult", 1e6),
    ("size", [8, 8]), ("size", [32]), ("size", [32.0, 48]), ("size", "ab"),
    ("mean", [0.5, 0.5]), ("mean", [float("inf"), 0, 0]), ("std", [0.2, 0.0, 0.2]),
    ("std", ["a", 1, 1]), ("class_names", ["road"]), ("class_names", list(range(12)))]


@pytest.mark.parametrize("field,value", HOSTILE)
def test_every_recorded_preset_field_is_checked(tmp_path, field, value):
    path = tmp_path / "segnet.pth"
    preset = preset_of("Synthetic", "segnet", WIDTH, 12, SIZE) | {field: value}
    torch.save({"model": {}, "preset": preset}, path)
    with pytest.raises(CheckpointError, match=rf"^--segnet_file {path}: its recorded preset has "
                                              rf"an invalid {field} \("):
        recorded_preset(path)


@pytest.mark.parametrize("field,value", [("data", "Nowhere"), ("nclass", "12"), ("nclass", -1),
                                         ("model", "os:abort:x"), ("width_mult", -2),
                                         ("size", [10 ** 6, 48]), ("size", 5)])
def test_presets_rebuilt_from_older_args_are_checked(tmp_path, field, value):
    path = tmp_path / "segnet.pth"
    args = {"data": "Synthetic", "nclass": 12, "model": "segnet", "width_mult": 0.25,
            "size": [32, 48]} | {field: value}
    torch.save({"model": {}, "args": args}, path)
    with pytest.raises(CheckpointError, match=rf"its recorded args has an invalid {field} \("):
        recorded_preset(path)


def test_invalid_preset_is_one_line_naming_file_and_field(benchmark):
    path = benchmark / "segnet.pth"
    torch.save({"model": {}, "preset": preset_of("Cityscapes", "segnet", WIDTH, 19, (64, 128))
                | {"std": [0.2, 0.0, 0.2]}}, path)
    result = benchmark_run(benchmark, path)
    one_error_line(result, 1, f"--segnet_file {path}: its recorded preset has an invalid std")


@pytest.mark.parametrize("entry,value", [("layers", [{"a": 1}]), ("layers", [3]),
                                         ("layers", "backbone"), ("head", "evil"),
                                         ("model", ["os", "abort"])])
def test_observer_record_is_checked(tmp_path, entry, value):
    path = tmp_path / "best.pth"
    torch.save({"model": {}, "observer": OBSERVER | {entry: value}}, path)
    with pytest.raises(CheckpointError, match=rf"^{path}: its recorded observer {entry}"):
        recorded_spec(path)


def test_statistics_file_entries_are_checked(tmp_path):
    state = toy_class_stats(12, 8).state()
    for key, value in [("nclass", "12"), ("feat_dim", -1), ("precision", torch.zeros(3, 3)),
                       ("logit_mean", [0.0] * 12), ("segmenter", "evilmod:build")]:
        path = tmp_path / f"{key}.stats.pth"
        torch.save(state | {key: value}, path)
        with pytest.raises(CheckpointError, match=rf"^{path}: .*{key}"):
            load_stats(path)


# ------------------------------------------- item 9: export and inference adopt the preset

@pytest.mark.slow
def test_export_without_data_adopts_the_recorded_normalisation(nets, tmp_path):
    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from obsnet.export import ExportGraph
    out = tmp_path / "synthetic.onnx"
    result = python("-m", "obsnet.export", "--segnet_file", str(nets / "a.pth"),
                    "--obsnet_file", str(nets / "obs"), "--out", str(out), timeout=600)
    assert result.returncode == 0, result.stderr
    assert "normalised inside with Synthetic's mean and std" in result.stdout
    segnet = load_segmenter("segnet", 12, WIDTH, nets / "a.pth")
    observer, _ = load_observer(nets / "obs", ObserverRequest(), segnet, 12, WIDTH)
    metadata = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert metadata["obsnet.segmenter"] == weights_fingerprint(segnet)
    assert metadata["obsnet.observer"] == weights_fingerprint(observer)
    assert metadata["obsnet.data"] == "Synthetic"
    assert metadata["obsnet.min_side"] == "32"  # documented: the graph is defined from 32x32 on
    image = torch.rand(2, 3, *SIZE, generator=torch.Generator().manual_seed(0))
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    logits, prob = session.run(["logits", "observer_prob"], {"image": image.numpy()})
    diffs = {}
    for data in ("Synthetic", "CamVid"):
        graph = ExportGraph(segnet, freeze(observer), SPECS[data].mean, SPECS[data].std)
        with torch.no_grad():
            want = graph(image)
        diffs[data] = max(float(np.abs(logits - want[0].numpy()).max()),
                          float(np.abs(prob - want[1].numpy()).max()))
    assert diffs["Synthetic"] < 1e-4 < 1e-2 < diffs["CamVid"], diffs
    graph = ExportGraph(segnet, freeze(observer), SPECS["Synthetic"].mean, SPECS["Synthetic"].std)
    for side in ((32, 32), (33, 47)):  # the documented minimum, and odd sides just above it
        small = torch.rand(1, 3, *side, generator=torch.Generator().manual_seed(1))
        got = session.run(["observer_prob"], {"image": small.numpy()})[0]
        with torch.no_grad():
            assert np.abs(got - graph(small)[1].numpy()).max() < 1e-4, side


def test_export_refuses_data_that_contradicts_the_record(nets, tmp_path):
    result = python("-m", "obsnet.export", "--data", "CamVid", "--segnet_file", str(nets / "a.pth"),
                    "--obsnet_file", str(nets / "obs"), "--out", str(tmp_path / "x.onnx"))
    one_error_line(result, 2, f"--data CamVid: --segnet_file {nets / 'a.pth'} was trained on "
                   "Synthetic", "leave --data out", prog="python -m obsnet.export")
    result = python("-m", "obsnet.export", "--width_mult", "0.5", "--segnet_file",
                    str(nets / "a.pth"), "--obsnet_file", str(nets / "obs"), "--out",
                    str(tmp_path / "x.onnx"))
    one_error_line(result, 2, "--width_mult 0.5: ", "was trained with --width_mult 0.0625",
                   prog="python -m obsnet.export")
    assert not list(tmp_path.iterdir())


def reference_maps(nets, data: str) -> dict:
    """The observer's maps of the image folder computed with ``data``'s normalisation at the
    recorded size, as inference.py writes them (float16, each image's resolution)."""
    from obsnet.inference import predict, prepare
    from obsnet.data.base import read_image
    segnet = load_segmenter("segnet", 12, WIDTH, nets / "a.pth")
    observer, _ = load_observer(nets / "obs", ObserverRequest(), segnet, 12, WIDTH)
    maps = {}
    for path in sorted((nets / "images").iterdir()):
        image = read_image(path).as_subclass(torch.Tensor)
        _, prob = predict(segnet, observer.eval(), prepare([image], SIZE, SPECS[data]))
        maps[path.name] = torch.nn.functional.interpolate(
            prob[None], size=image.shape[-2:], mode="bilinear")[0, 0].numpy().astype(np.float16)
    return maps


@pytest.mark.parametrize("data", [["--data", "RoadAnomaly21"], []], ids=["RoadAnomaly21", "none"])
def test_inference_adopts_the_recorded_preset(nets, tmp_path, data):
    out = tmp_path / "out"
    run = inference_py(*data, "--segnet_file", str(nets / "a.pth"), "--obsnet_file",
                       str(nets / "obs"), "--img_folder", str(nets / "images"), "--out", str(out))
    assert run.returncode == 0, run.stderr
    want, camvid = reference_maps(nets, "Synthetic"), reference_maps(nets, "CamVid")
    for name, expected in want.items():
        got = np.load(out / f"{name}.npy").astype(np.float32)
        assert np.abs(got - expected).max() < 2e-3, name
        assert np.abs(got - camvid[name]).max() > 1e-2, name  # the normalisation matters


def test_inference_refuses_data_that_contradicts_the_record(nets, tmp_path):
    run = inference_py("--data", "Cityscapes", "--segnet_file", str(nets / "a.pth"),
                       "--obsnet_file", str(nets / "obs"), "--img_folder", str(nets / "images"),
                       "--out", str(tmp_path / "out"))
    one_error_line(run, 2, "--data Cityscapes: ", "was trained on Synthetic", prog="inference.py")
    assert not (tmp_path / "out").exists()


# ------------------------------------- item 7: every derived file belongs to its segmenter

def test_observer_of_another_segmenter_is_refused_by_export_and_inference(nets, tmp_path):
    where = f"--obsnet_file {nets / 'obs' / 'best.pth'}: belongs to another segmenter than " \
            f"--segnet_file {nets / 'b.pth'}"
    flags = ["--data", "Synthetic", "--width_mult", str(WIDTH), "--size", *map(str, SIZE),
             "--segnet_file", str(nets / "b.pth"), "--obsnet_file", str(nets / "obs")]
    result = python("-m", "obsnet.export", *flags, "--out", str(tmp_path / "x.onnx"), timeout=600)
    one_error_line(result, 1, where, prog="python -m obsnet.export")
    run = inference_py(*flags, "--img_folder", str(nets / "images"), "--out", str(tmp_path / "out"))
    one_error_line(run, 1, where, "give the --segnet_file this observer was trained with",
                   prog="inference.py")
    assert not list(tmp_path.glob("*.onnx")) and not list(tmp_path.glob("out/*"))


@pytest.fixture(scope="module")
def trained(run_dir):
    """conftest's SegNet A with its --fit_stats statistics and an observer trained on it (one
    epoch)."""
    stats = main_py(*TINY, *paths(run_dir), "--fit_stats")
    assert stats.returncode == 0, stats.stderr
    obs = main_py(*TINY, *paths(run_dir), "--epoch", "1", "--adv", "min_random_patch")
    assert obs.returncode == 0, obs.stderr
    return run_dir


def other_segnet(run_dir, path):
    """A copy of SegNet A's checkpoint (its preset too) with one weight changed: segmenter B."""
    checkpoint = load_checkpoint(run_dir / "segnet.pth")
    key = next(k for k, v in checkpoint["model"].items() if v.is_floating_point())
    checkpoint["model"][key] = checkpoint["model"][key] + 1e-3
    save_checkpoint(path, checkpoint)
    return path


def test_derived_files_record_their_segmenter(trained):
    segnet = load_segmenter("segnet", 12, WIDTH, trained / "segnet.pth")
    fingerprint = weights_fingerprint(segnet)
    for name in ("best.pth", "last.pth"):
        assert load_checkpoint(trained / "obsnet" / name)["segmenter"] == fingerprint
    assert load_stats(trained / "segnet.stats.pth").segmenter == fingerprint


def test_observer_of_another_segmenter_is_refused_at_test_only_and_resume(trained, tmp_path):
    b = other_segnet(trained, tmp_path / "b.pth")
    observer = tmp_path / "obsnet"
    shutil.copytree(trained / "obsnet", observer)
    flags = [*TINY, "--dset_folder", str(trained / "data"), "--segnet_file", str(b),
             "--obsnet_file", str(observer), "--tboard", str(tmp_path / "logs")]
    result = main_py(*flags, "--test_only", "--test_multi", "obsnet,mcp")
    one_error_line(result, 1, f"--obsnet_file {observer / 'best.pth'}: belongs to another "
                   f"segmenter than --segnet_file {b}")
    before = {p.name: p.read_bytes() for p in observer.iterdir()}
    result = main_py(*flags, "--resume", "--epoch", "2", "--adv", "min_random_patch")
    one_error_line(result, 1, f"--resume {observer / 'last.pth'}: belongs to another segmenter "
                   f"than --segnet_file {b}", "resume with the --segnet_file this run started with")
    assert {p.name: p.read_bytes() for p in observer.iterdir()} == before
    # the segmenter it was trained against: accepted
    result = main_py(*flags, "--segnet_file", str(trained / "segnet.pth"), "--test_only",
                     "--test_multi", "obsnet")
    assert result.returncode == 0, result.stderr


def test_statistics_of_a_retrained_segnet_are_refused(trained, tmp_path):
    root = tmp_path / "run"
    shutil.copytree(trained, root, ignore=shutil.ignore_patterns("logs", "obsnet"))
    test = [*TINY, *paths(root), "--test_only", "--test_multi", "sml,mahalanobis"]
    assert main_py(*test).returncode == 0  # the statistics of this SegNet
    retrain = main_py(*TINY, *paths(root), "--train_segnet", "--epoch", "1", "--optim", "AdamW",
                      "--lr", "0.01", "--seed", "1", "--overwrite")
    assert retrain.returncode == 0, retrain.stderr
    for method in ("sml", "mahalanobis"):
        result = main_py(*test[:-1], method, "--overwrite")  # the first test's results files
        one_error_line(result, 1, f"--test_multi {method}: {root / 'segnet.stats.pth'}: belongs "
                       f"to another segmenter than --segnet_file {root / 'segnet.pth'}",
                       "run main.py --fit_stats --overwrite with this --segnet_file")


def test_statistics_of_another_width_are_refused_by_sml(tmp_path):
    """A statistics file of an earlier version (no fingerprint) fitted on a wider SegNet: its
    feature channels differ, sml refuses it as mahalanobis does."""
    segnet = freeze(SegNet(3, 12, width_mult=WIDTH))  # a 4-channel penultimate map
    images = torch.rand(1, 3, *SIZE)
    with torch.no_grad():
        batch = EvalBatch(images, segnet, None, segnet(images, return_feat=True))
    config = MethodConfig(class_stats=ClassStats.from_state(toy_class_stats(12, 8).state(), "x"))
    for name in ("sml", "sml_post", "mahalanobis"):
        with pytest.raises(ValueError, match="statistics fitted on 8-channel features, the "
                                             "SegNet's penultimate map has 4"):
            METHODS[name].fn(batch, config)


def test_files_without_a_fingerprint_are_accepted(trained, tmp_path):
    """Observer checkpoints and statistics of earlier versions (or the original's state_dicts)
    record no segmenter: they are used as they are."""
    root = tmp_path / "run"
    shutil.copytree(trained, root, ignore=shutil.ignore_patterns("logs"))
    for path in (root / "obsnet" / "best.pth", root / "segnet.stats.pth"):
        state = load_checkpoint(path)
        del state["segmenter"]
        save_checkpoint(path, state)
    result = main_py(*TINY, *paths(root), "--test_only", "--test_multi", "obsnet,sml")
    assert result.returncode == 0, result.stderr
