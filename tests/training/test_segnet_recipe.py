"""What a stronger SegNet at CPU cost needs: median-frequency class weights, scale jitter, and
--test_split to evaluate on a pasted val_ood split."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from obsnet.data.class_weights import class_frequencies, median_frequency_weights
from obsnet.data.loaders import build_dataset
from obsnet.data.specs import SPECS
from obsnet.data.synthetic import generate
from obsnet.data.transforms import train_transform
from tests.helpers.runner import TINY, main_py, paths

CAMVID = SPECS["CamVid"]


def write_camvid(root, labels):
    """A CamVid-layout train split whose label maps are ``labels`` (uint8 arrays)."""
    for folder in ("train", "trainannot"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    lines = []
    for i, label in enumerate(labels):
        image = np.zeros((*label.shape, 3), dtype=np.uint8)
        Image.fromarray(image).save(root / "train" / f"{i}.png")
        Image.fromarray(label).save(root / "trainannot" / f"{i}.png")
        lines.append(f"train/{i}.png trainannot/{i}.png")
    (root / "train.txt").write_text("\n".join(lines) + "\n")


def test_median_frequency_by_hand(tmp_path):
    # image 0 (100 px): 60 of class 0, 40 of class 1; image 1 (100 px): 90 of 0, 10 of 2
    a = np.zeros((10, 10), dtype=np.uint8)
    a.flat[60:] = 1
    b = np.zeros((10, 10), dtype=np.uint8)
    b.flat[90:] = 2
    write_camvid(tmp_path, [a, b])
    freq = class_frequencies(build_dataset(CAMVID, tmp_path, "train"), 12, progress=False)
    # freq(c) = pixels of c / pixels of the images holding c
    np.testing.assert_allclose(freq[:3], [150 / 200, 40 / 100, 10 / 100])
    assert np.isnan(freq[3:]).all()
    weights = median_frequency_weights(freq)
    median = 0.4  # of 0.75, 0.4, 0.1
    np.testing.assert_allclose(weights[:3].numpy(), [median / 0.75, 1.0, median / 0.1], rtol=1e-6)
    assert (weights[3:] == 0).all()  # classes with no pixel weigh nothing
    soft = median_frequency_weights(freq, power=0.5)
    np.testing.assert_allclose(soft[:3].numpy(), [(0.4 / 0.75) ** 0.5, 1.0, 2.0], rtol=1e-6)
    assert (soft[3:] == 0).all()


def test_no_class_at_all_is_an_error():
    with pytest.raises(ValueError, match="no class appears"):
        median_frequency_weights(np.full(4, np.nan))


def test_scale_jitter_zooms_and_keeps_label_ids():
    torch.manual_seed(0)
    label = torch.from_numpy(np.arange(48, dtype=np.uint8) // 4).repeat(36, 1)  # 12 column bands
    image = tv_tensors.Image(torch.randint(0, 255, (3, 36, 48), dtype=torch.uint8))
    mask = tv_tensors.Mask(label)
    plain = train_transform(CAMVID, (36, 48), jitter=0, hflip_p=0)
    zoom = train_transform(CAMVID, (36, 48), jitter=0, hflip_p=0, scale_jitter=1.0)
    outs = [zoom(image, mask) for _ in range(8)]
    for x, y in outs + [plain(image, mask)]:
        assert x.shape == (3, 36, 48) and y.shape == (36, 48)
        assert set(y.unique().tolist()) <= set(label.unique().tolist())  # nearest: no new ids
    # a 2x zoom shows fewer distinct columns of the label than the image has
    assert min(len(torch.unique(y[0])) for _, y in outs) < len(torch.unique(label[0]))
    assert len({x.sum().item() for x, _ in outs}) > 1  # random


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    generate(root / "data", seed=0, n_train=8, n_val=4, n_test=4)
    return root


@pytest.mark.parametrize("weighting, power", [("median_freq", 1.0), ("sqrt_median_freq", 0.5)])
def test_train_segnet_with_median_frequency_weights(root, weighting, power):
    out = main_py(*TINY, *paths(root), "--train_segnet", "--epoch", "1", "--optim", "AdamW",
                  "--lr", "0.01", "--class_weights", weighting, "--scale_jitter", "0.25", "--overwrite")
    assert out.returncode == 0, out.stderr
    line = next(s for s in out.stdout.splitlines() if f"{weighting} class weights" in s)
    said = dict(item.rsplit(" ", 1) for item in line.split("weights: ")[1].split(", "))
    freq = class_frequencies(build_dataset(CAMVID, root / "data", "train"), 12, progress=False)
    present = ~np.isnan(freq)
    expected = np.where(present, (np.nanmedian(freq) / freq) ** power, 0.0)
    np.testing.assert_allclose([float(said[n]) for n in CAMVID.class_names[:12]], expected,
                               atol=0.006)
    config = json.loads((root / "logs" / "config_train_segnet.json").read_text())
    assert config["class_weights"] == weighting and config["scale_jitter"] == 0.25


def test_test_split_flag(root):
    if not (root / "segnet.pth").exists():
        assert main_py(*TINY, *paths(root), "--train_segnet", "--epoch", "1").returncode == 0
    out = main_py(*TINY, *paths(root), "--test_only", "--test_multi", "mcp", "--test_split", "val")
    assert out.returncode == 0, out.stderr
    results = json.loads((root / "logs" / "results_val.json").read_text())
    assert results["split"] == "val" and "ood" not in results["methods"]["mcp"]


def test_bad_recipe_flag_is_one_line(root):
    out = main_py(*TINY, *paths(root), "--train_segnet", "--scale_jitter", "-0.5")
    assert out.returncode == 2
    assert "--scale_jitter must be >= 0" in out.stderr and "Traceback" not in out.stderr
