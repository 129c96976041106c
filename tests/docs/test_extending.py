"""docs/extending.md's recipes, followed literally: each Python block of the doc is executed as
written, the toy it registers (a method, an attack mask, a dataset preset, a segmenter) is
checked to be in its registry, then run through the real path; the last test runs all four
through main.py's three stages. Registries are restored after each test (monkeypatch)."""
import json
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

import obsnet
from obsnet import cli
from obsnet.attacks import MASKS, AttackConfig, parse_attack, select_attack
from obsnet import check
from obsnet.data.errors import DatasetError
from obsnet.data.loaders import DATASETS, build_dataset, build_loader
from obsnet.data.specs import SPECS
from obsnet.evaluate import EvalHooks, evaluate
from obsnet.methods import METHODS, MethodConfig, parse_methods
from obsnet.models.generic import FeatureTap, LayerObserver
from obsnet.models.obsnet import Obsnet_Seg
from obsnet.models.observer_spec import ObserverSpec
from obsnet.models.registry import OBSERVERS, SEGMENTERS, build_observer, build_segmenter
from obsnet.models.segnet import SegNet, freeze
from tests.helpers import ROOT, contracts  # contracts: the tests the doc tells a new method or mask to pass

DOC = ROOT / "docs" / "extending.md"
SIZE = (32, 48)


def doc_blocks(section: str) -> list[str]:
    """The ```python blocks of the doc's section whose heading starts with ``## section``."""
    part = DOC.read_text().split(f"\n## {section}", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", part, flags=re.S)


def follow(code: str, monkeypatch, *entries) -> dict:
    """Execute a doc block; ``entries``: (registry, name) pairs it must add. Each is reserved
    first with monkeypatch (so it is removed after the test) and must be filled by the block."""
    for registry, name in entries:
        assert name not in registry
        monkeypatch.setitem(registry, name, None)
    scope = {"__name__": "extending_doc"}
    exec(compile(code, str(DOC), "exec"), scope)
    for registry, name in entries:
        assert registry[name] is not None, f"the doc's block did not register {name!r}"
    return scope


def help_of(parser, dest: str) -> str:
    return next(a for a in parser._actions if a.dest == dest).help


def tiny_batches(nclass: int = 12, anomaly: int = 12, n: int = 2, seed: int = 0):
    """``n`` batches of 2 random images and labels (random classes, an anomaly square)."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        labels = torch.randint(0, nclass, (2, *SIZE), generator=g)
        labels[:, 8:16, 10:22] = anomaly
        batches.append((torch.randn(2, 3, *SIZE, generator=g), labels))
    return batches


# ----------------------------------------------------------------------------- 1. method

def test_method_recipe_is_scored_by_the_evaluation(monkeypatch):
    """--test_multi takes it, its help lists it, evaluate() scores it with the same meters
    (AUROC as scikit-learn's on its maps), and it passes the method contract (tests/helpers/contracts.py)."""
    (code,) = doc_blocks("1.")
    scope = follow(code, monkeypatch, (METHODS, "margin"))
    assert "margin" in help_of(cli.build_parser(), "test_multi").split(": ", 1)[1].split(",")
    assert parse_methods("mcp,margin") == ["mcp", "margin"]

    segnet = freeze(SegNet(3, 12, width_mult=0.0625))
    maps = []
    results, _, _ = evaluate(segnet, None, tiny_batches(), ["margin", "mcp"], SPECS["Synthetic"],
                             torch.device("cpu"), MethodConfig(), 12, "test", progress=False,
                             hooks=EvalHooks(on_scores=lambda name, m: maps.append(m)
                                             if name == "margin" else None))
    scores = torch.cat(maps)
    images, labels = (torch.cat(t) for t in zip(*tiny_batches()))
    with torch.no_grad():
        probs = torch.softmax(segnet(images), dim=1).sort(dim=1, descending=True).values
    assert torch.allclose(scores, 1 - probs[:, 0] + probs[:, 1], atol=1e-6)
    error = (segnet(images).argmax(dim=1) != labels).flatten().numpy()
    reference = roc_auc_score(error, scores.flatten().numpy())
    assert results["methods"]["margin"]["error"]["auroc"] == pytest.approx(reference, abs=1e-4)
    assert "ood" in results["methods"]["margin"]
    assert scope["margin_score"].__doc__  # house rule: the doc's functions have docstrings

    nets = (freeze(SegNet(3, 12, width_mult=0.125)), Obsnet_Seg(3, 1, width_mult=0.125).eval(), ())
    contracts.shape_range_and_no_side_effects("margin", nets)
    contracts.batch_of_four_equals_four_batches_of_one("margin", nets)


# ----------------------------------------------------------------------------- 2. attack mask

def check_band(mask, labels):
    """Every image: one full-width band of the region's height (the mask contract's REGION)."""
    for m in mask[:, 0]:
        rows = m.amax(dim=1)
        assert torch.equal(m, rows[:, None].expand_as(m))  # each row all 0 or all 1
        top = int(rows.argmax())
        assert rows.sum() == contracts.REGION[0] and rows[top:top + contracts.REGION[0]].all()


def test_attack_mask_recipe_drives_the_attack(monkeypatch):
    """--adv min_band / paste+max_band are choices (CLI, Python API); select_attack perturbs
    exactly the band; the mask passes the mask contract (tests/helpers/contracts.py), with its COVERAGE."""
    (code,) = doc_blocks("2.")
    follow(code, monkeypatch, (MASKS, "band"))
    parser = cli.build_parser()
    for value in ("min_band", "max_band", "paste+max_band"):
        assert parser.parse_args(["--adv", value]).adv == value
    assert parse_attack("min_band") == ("min", "band", False)
    assert obsnet.TrainingSettings(attack="paste+min_band").attack == "paste+min_band"

    torch.manual_seed(0)
    segnet = freeze(SegNet(3, 12, width_mult=0.0625))
    images, labels = tiny_batches(n=1)[0]
    labels = labels.clamp(max=11)
    cfg = AttackConfig(mode="min", mask="band", epsilon=0.5, patch_size=(8, 48, 4, 6), nclass=12,
                       mean=(0.5,) * 3, std=(0.25,) * 3)
    out = select_attack(images, labels, segnet, cfg)
    band = out.mask[:, 0].bool()
    assert torch.equal(band.sum(dim=(1, 2)), torch.full((2,), 8 * 48))
    changed = (out.images != images).any(dim=1)
    assert not changed[~band].any() and changed[band].float().mean() > 0.9

    monkeypatch.setitem(contracts.COVERAGE, "band", check_band)
    contracts.mask_shape_binary_values_and_device("band", "cpu")
    contracts.mask_stays_inside_bounds("band")
    contracts.mask_coverage("band")
    contracts.each_image_of_a_batch_draws_its_own_mask("band")
    contracts.mask_of_an_image_ignores_the_other_images_content("band")


# ----------------------------------------------------------------------------- 3. dataset preset

def write_tiny_shapes(root: Path, counts=(("train", 4), ("val", 2), ("test", 2)), seed: int = 0):
    """The doc's TinyShapes layout at 40×60: sky above, ground below, a thing; in test, an
    anomaly square (id 3); a few ignored pixels (255)."""
    rng = np.random.default_rng(seed)
    for split, n in counts:
        for sub in ("images", "labels"):
            (root / split / sub).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            label = np.zeros((40, 60), np.uint8)
            label[:16] = 1
            label[20:30, 5 + 4 * i:20 + 4 * i] = 2
            if split == "test":
                label[22:32, 35:50] = 3
            label[0, :6] = 255
            image = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
            Image.fromarray(image).save(root / split / "images" / f"{i}.png")
            Image.fromarray(label).save(root / split / "labels" / f"{i}.png")
    return root


def register_tiny_shapes(monkeypatch) -> dict:
    (code,) = doc_blocks("3.")
    return follow(code, monkeypatch, (SPECS, "TinyShapes"), (DATASETS, "TinyShapes"))


def test_dataset_recipe_is_built_loaded_and_checked(monkeypatch, tmp_path, capsys):
    """--data takes it; build_dataset reads it at the spec's size with its ids; a label id
    outside the spec or a missing label is a DatasetError; python -m obsnet.check reads it."""
    register_tiny_shapes(monkeypatch)
    root = write_tiny_shapes(tmp_path / "tiny")
    assert cli.build_parser().parse_args(["--data", "TinyShapes"]).data == "TinyShapes"
    spec = SPECS["TinyShapes"]

    train = build_dataset(spec, root, "train", train=True)
    images, labels = next(iter(build_loader(train, 2, train=True)))
    assert images.shape == (2, 3, *spec.size) and images.dtype == torch.float32
    assert labels.shape == (2, *spec.size) and set(labels.unique().tolist()) <= {0, 1, 2, 255}
    image, label = build_dataset(spec, root, "test")[0]
    assert image.shape == (3, *spec.size) and 3 in label.unique().tolist()

    assert check.main(["--data", "TinyShapes", "--dset_folder", str(root), "--workers", "1"]) == 0
    assert "test" in capsys.readouterr().out

    Image.fromarray(np.full((40, 60), 7, np.uint8)).save(root / "val" / "labels" / "0.png")
    with pytest.raises(DatasetError, match="7"):
        build_dataset(spec, root, "val")[0]
    (root / "train" / "labels" / "1.png").unlink()
    with pytest.raises(DatasetError, match="label not found"):
        build_dataset(spec, root, "train", train=True)


# ----------------------------------------------------------------------------- 4. segmenter

def test_registered_segmenter_is_built_and_observed(monkeypatch):
    """--model tiny is accepted; build_segmenter and build_observer give the segmenter and its
    observer; they answer as the SegNet and ObsNet do, and evaluate() scores obsnet, mcp and
    mc_dropout."""
    _, registry_code = doc_blocks("4.")
    follow(registry_code, monkeypatch, (SEGMENTERS, "tiny"), (OBSERVERS, "tiny"))
    assert cli.build_parser().parse_args(["--model", "tiny"]).model == "tiny"
    segnet = build_segmenter("tiny", 12, 0.25)
    observer = build_observer(ObserverSpec("tiny"), segnet, 12, 0.25)
    segnet, observer = freeze(segnet), observer.eval()
    images = torch.randn(2, 3, *SIZE)
    feats = segnet(images, return_feat=True)
    assert feats[-1].shape == (2, 12, *SIZE) and torch.equal(feats[-1], segnet(images))
    assert observer(images, feats).shape == (2, 1, *SIZE)
    assert not torch.equal(segnet(images, mc_drop=True), segnet(images, mc_drop=True))
    with pytest.raises(ValueError, match="--obs_mlp"):
        build_observer(ObserverSpec("tiny", obs_mlp=True), segnet, 12, 0.25)
    ablated = build_observer(ObserverSpec("tiny", no_img=True), segnet, 12, 0.25).eval()
    ablated.load_state_dict(observer.state_dict())  # the spec's ablation reaches forward
    assert not torch.allclose(ablated(images, feats), observer(images, feats))

    results, _, _ = evaluate(segnet, observer, tiny_batches(), ["obsnet", "mcp", "mc_dropout"],
                             SPECS["Synthetic"], torch.device("cpu"), MethodConfig(mc_passes=2),
                             12, "test", progress=False)
    assert all(0 <= results["methods"][n]["ood"]["auroc"] <= 1 for n in ("obsnet", "mcp", "mc_dropout"))


def test_factory_route_needs_no_registry_entry(monkeypatch, tmp_path):
    """The doc's mynets.py, importable from the run's folder: --model mynets:build gives a
    FeatureTap and a LayerObserver with the dataset's classes, SEGMENTERS untouched."""
    factory_code, _ = doc_blocks("4.")
    (tmp_path / "mynets.py").write_text(factory_code)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "mynets", raising=False)
    before = dict(SEGMENTERS)
    assert cli.build_parser().parse_args(["--model", "mynets:build"]).model == "mynets:build"
    segnet = build_segmenter("mynets:build", 12, 0.25, probe_size=SIZE)
    observer = build_observer(ObserverSpec("mynets:build"), segnet, 12, 0.25)
    assert isinstance(segnet, FeatureTap) and isinstance(observer, LayerObserver)
    images = torch.randn(2, 3, *SIZE)
    feats = segnet.eval()(images, return_feat=True)
    assert feats[-1].shape == (2, 12, *SIZE) and observer.eval()(images, feats).shape == (2, 1, *SIZE)
    assert SEGMENTERS == before


# ----------------------------------------------------------------------------- all four

@pytest.fixture
def _main_in_process():
    """main.py --seed asks for deterministic algorithms and sets warning filters for the whole
    process: put them back for the next tests."""
    saved = (torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    with warnings.catch_warnings():
        yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[2:]


def test_all_four_through_main_py(monkeypatch, tmp_path, _main_in_process):
    """main.py's three stages in this process, on the doc's toys only: --data TinyShapes
    --model tiny trains the segmenter, --adv min_band the observer, and --test_only scores
    obsnet and margin on the test split (its anomaly id 3)."""
    register_tiny_shapes(monkeypatch)
    follow(doc_blocks("2.")[0], monkeypatch, (MASKS, "band"))
    follow(doc_blocks("1.")[0], monkeypatch, (METHODS, "margin"))
    follow(doc_blocks("4.")[1], monkeypatch, (SEGMENTERS, "tiny"), (OBSERVERS, "tiny"))
    root = write_tiny_shapes(tmp_path / "data")
    common = ["--data", "TinyShapes", "--model", "tiny", "--width_mult", "0.25", "--bsize", "2",
              "--seed", "0", "--dset_folder", str(root), "--segnet_file", str(tmp_path / "seg.pth"),
              "--obsnet_file", str(tmp_path / "obs"), "--tboard", str(tmp_path / "logs")]
    stages = [["--train_segnet", "--epoch", "1", "--optim", "AdamW", "--lr", "0.01"],
              ["--adv", "min_band", "--epsilon", "0.05", "--epoch", "1", "--lr", "0.05"],
              ["--test_only", "--test_multi", "obsnet,margin"]]
    for stage in stages:
        assert cli.main(common + stage) == 0, stage
    results = json.loads((tmp_path / "logs" / "results_test.json").read_text())
    assert set(results["methods"]) == {"obsnet", "margin"}
    assert results["pixels"]["anomaly"] > 0
    assert all(0 <= m["ood"]["auroc"] <= 1 for m in results["methods"].values())
