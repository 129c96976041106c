"""Tests of the CamVid-layout dataset, the joint transforms and the loaders (generated data)."""
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from obsnet.data.camvid import CamVid
from obsnet.data.errors import DatasetError
from obsnet.data.loaders import build_dataset, build_loader, data_loader
from obsnet.data.specs import SPECS
from obsnet.data.transforms import denormalize, eval_transform, train_transform
from tests.helpers import SHARED
from tests.helpers.camvid import SPEC, H, W, _write_pair, make_camvid

SAMPLE = SHARED / "data/camvid-sample"


@pytest.fixture
def camvid(tmp_path) -> Path:
    return make_camvid(tmp_path / "camvid")


def _stripes() -> tuple[torch.Tensor, torch.Tensor]:
    """Image whose red channel encodes the label; labels increase left to right (6 columns)."""
    label = (torch.arange(W) * 6 // W).repeat(H, 1).to(torch.uint8)
    image = torch.zeros(3, H, W, dtype=torch.uint8)
    image[0] = label * 40
    return image, label


def _as_tv(image, label):
    """Wrap plain tensors the way the dataset hands them to a transform."""
    return tv_tensors.Image(image), tv_tensors.Mask(label)


@pytest.mark.parametrize("absolute", [False, True])
def test_list_files_relative_and_absolute(tmp_path, absolute):
    root = make_camvid(tmp_path / "cv", absolute=absolute)
    data = CamVid(root, "train", eval_transform(SPEC))
    assert len(data) == 4
    assert data.samples[0][0] == root / "train" / "f000.png"
    image, label = data[0]
    assert image.shape == (3, H, W) and image.dtype == torch.float32
    assert label.shape == (H, W) and label.dtype == torch.int64
    assert type(image) is torch.Tensor and type(label) is torch.Tensor


def test_root_trailing_slash_and_relative(camvid, monkeypatch):
    monkeypatch.chdir(camvid.parent)
    for root in (f"{camvid}/", "camvid", "camvid/"):
        assert len(build_dataset(SPEC, root, "val", (H, W), train=False)) == 2


def test_loaders_shapes_and_batches(camvid):
    train, val, test = data_loader(SPEC, camvid, (32, 40), bsize=3)
    assert len(train) == 1 and len(val) == 1 and len(test) == 1  # drop_last only in training
    images, labels = next(iter(train))
    assert images.shape == (3, 3, 32, 40) and labels.shape == (3, 32, 40)
    assert labels.dtype == torch.int64 and int(labels.max()) <= 11
    assert int(next(iter(test))[1].max()) == 12


def test_flip_moves_image_and_label_together():
    image, label = _stripes()
    out_img, out_lab = train_transform(SPEC, (H, W), hflip_p=1.0, jitter=0)(*_as_tv(image, label))
    decoded = torch.round(denormalize(out_img, SPEC)[0] * 255 / 40).long()
    assert out_lab[:, 0].float().mean() > out_lab[:, -1].float().mean()  # flipped: decreasing
    assert (decoded == out_lab).float().mean() > 0.9  # bilinear blurs only stripe borders


def test_default_augmentation_keeps_alignment():
    image, label = _stripes()
    transform = train_transform(SPEC, (H, W))
    flips = set()
    for seed in range(12):
        torch.manual_seed(seed)
        out_img, out_lab = transform(*_as_tv(image, label))
        # Jitter is monotone in red here, so image and label must share their orientation.
        lab_dir = out_lab[:, -1].float().mean() > out_lab[:, 0].float().mean()
        img_dir = out_img[0, :, -1].mean() > out_img[0, :, 0].mean()
        assert lab_dir == img_dir
        flips.add(bool(lab_dir))
    assert flips == {True, False}


def test_resize_keeps_label_ids():
    label = torch.tensor([[0, 3, 7, 11]], dtype=torch.uint8).repeat_interleave(12, 0)
    label = label.repeat_interleave(16, 1)
    image = torch.zeros(3, *label.shape, dtype=torch.uint8)
    for transform in (eval_transform(SPEC, (31, 45)), train_transform(SPEC, (31, 45))):
        _, out = transform(*_as_tv(image, label))
        assert out.shape == (31, 45)
        assert set(out.unique().tolist()) <= {0, 3, 7, 11}


def test_eval_transform_deterministic(camvid):
    data = CamVid(camvid, "val", eval_transform(SPEC, (40, 56)))
    first, second = data[1], data[1]
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    raw = np.asarray(Image.open(camvid / "val" / "f001.png"), dtype=np.float32) / 255
    back = denormalize(CamVid(camvid, "val", eval_transform(SPEC))[1][0][None], SPEC)[0]
    assert np.allclose(back.permute(1, 2, 0).numpy(), raw, atol=1e-5)


def _break(root: Path, split: str, line: str) -> None:
    """Append one line to a list file."""
    with open(root / f"{split}.txt", "a") as handle:
        handle.write(line + "\n")


@pytest.mark.parametrize("case, expected", [
    ("missing_root", "nowhere"),
    ("missing_list", "train.txt"),
    ("malformed", "val.txt:3: expected 2 fields"),
    ("missing_image", "val.txt:3: image file not found"),
    ("missing_annotation", "val.txt:3: annotation file not found"),
])
def test_bad_inputs_raise_dataset_error(camvid, case, expected):
    split, root = ("train" if case == "missing_list" else "val"), camvid
    if case == "missing_root":
        root = camvid / "nowhere"
    elif case == "missing_list":
        (camvid / "train.txt").unlink()
    elif case == "malformed":
        _break(camvid, "val", "val/f000.png valannot/f000.png extra")
    elif case == "missing_image":
        _break(camvid, "val", "val/ghost.png valannot/f000.png")
    else:
        _break(camvid, "val", "val/f000.png /SegNet/CamVid/valannot/ghost.png")
    with pytest.raises(DatasetError, match=expected) as info:
        CamVid(root, split)
    assert "\n" not in str(info.value) and isinstance(info.value, ValueError)


def test_size_mismatch_names_both_files(camvid):
    img, ann = _write_pair(camvid, "val", "valannot", "odd.png", 12, np.random.default_rng(1),
                           label_size=(H, W - 1))
    (camvid / "val.txt").write_text(f"{img} {ann}\n")
    with pytest.raises(DatasetError, match=r"size mismatch.*val/odd\.png.*valannot/odd\.png"):
        CamVid(camvid, "val")[0]


def test_palette_labels_read_as_indices_and_rgb_rejected(camvid):
    label = np.asarray(Image.open(camvid / "valannot" / "f000.png"))
    palette = Image.fromarray(label).convert("P")
    palette.putpalette([v for c in SPEC.colors for v in c])
    palette.save(camvid / "valannot" / "f000.png")
    assert np.array_equal(CamVid(camvid, "val")[0][1].numpy(), label)
    Image.fromarray(label).convert("RGB").save(camvid / "valannot" / "f001.png")
    with pytest.raises(DatasetError, match=r"valannot/f001\.png.*mode RGB"):
        CamVid(camvid, "val")[1]


def test_train_split_smaller_than_batch(camvid):
    with pytest.raises(DatasetError, match=r"train\.txt.*4 image.*batch of 5"):
        build_loader(CamVid(camvid, "train"), bsize=5, train=True)
    assert len(build_loader(CamVid(camvid, "val"), bsize=5, train=False)) == 1


def test_unknown_dataset_is_reported(camvid):
    with pytest.raises(DatasetError, match="unknown dataset 'Nowhere'"):
        build_dataset(replace(SPEC, name="Nowhere"), camvid, "train", None, train=True)


def test_seeded_loader_is_reproducible(camvid):
    def first_batch():
        data = build_dataset(SPEC, camvid, "train", (H, W), train=True)
        return next(iter(build_loader(data, 2, train=True, num_workers=1, seed=3)))
    (img_a, lab_a), (img_b, lab_b) = first_batch(), first_batch()
    assert torch.equal(img_a, img_b) and torch.equal(lab_a, lab_b)


def test_real_camvid_sample():
    if not SAMPLE.is_dir():
        pytest.skip(f"real CamVid sample not found at {SAMPLE}")
    spec = SPECS["CamVid"]
    train = build_dataset(spec, SAMPLE, "train", spec.size, train=True)
    val = build_dataset(spec, SAMPLE, "val", spec.size, train=False)
    test = build_dataset(spec, SAMPLE, "test_ood", spec.size, train=False)
    assert (len(train), len(val), len(test)) == (6, 2, 3)
    image, label = train[0]
    assert image.shape == (3, 360, 480) and image.dtype == torch.float32
    assert -3 < image.mean() < 3 and image.std() > 0.3  # normalised, not [0, 255] or [0, 1]
    assert int(label.max()) <= 11 and label.dtype == torch.int64
    assert 12 in test[0][1].unique().tolist()


def _sleep_forever():
    import time
    time.sleep(600)


def test_exit_hook_stops_our_workers_only(camvid):
    """The exit hook kills the workers of a loader still alive, and no other process of the
    host program (a library must leave its caller's children alone)."""
    import multiprocessing

    from obsnet.data import loaders
    theirs = multiprocessing.get_context("fork").Process(target=_sleep_forever, daemon=True)
    theirs.start()
    try:
        data = build_dataset(SPEC, camvid, "train", (H, W), train=True)
        batches = iter(build_loader(data, 2, train=True, num_workers=1, seed=3))
        next(batches)
        ours = list(loaders._OUR_WORKERS)
        assert ours and all(worker.is_alive() for worker in ours)
        loaders.stop_leftover_workers()
        assert not any(worker.is_alive() for worker in ours)
        assert theirs.is_alive()
    finally:
        theirs.kill()
        theirs.join(5)
