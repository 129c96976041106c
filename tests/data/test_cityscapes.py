"""Cityscapes (cityscapesScripts layout): labelIds -> trainIds, listing, CLI and check.

Folders are generated in tmp_path with the real layout and file names (64×128 PNGs).
"""
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from obsnet.data.base import max_label_id
from obsnet.data.cityscapes import Cityscapes, label_ids_to_train_ids
from obsnet.data.errors import DatasetError
from obsnet.data.loaders import build_dataset
from obsnet.data.specs import IMAGENET_MEAN, IMAGENET_STD
from tests.helpers.cityscapes import SPEC, H, W, make_cityscapes, write_frame
from tests.helpers.runner import main_py, python


def test_label_ids_to_train_ids_official_table():
    # (label id, train id) by hand from cityscapesScripts' helpers/labels.py
    expected = {0: 255, 1: 255, 3: 255, 6: 255, 7: 0, 8: 1, 9: 255, 10: 255, 11: 2, 14: 255,
                17: 5, 18: 255, 19: 6, 20: 7, 23: 10, 24: 11, 26: 13, 29: 255, 30: 255,
                31: 16, 33: 18}
    ids = np.array(list(expected), dtype=np.uint8).reshape(3, 7)
    assert label_ids_to_train_ids(ids).ravel().tolist() == list(expected.values())
    # every train id 0..18 is reached exactly once; no other value besides 255
    train = label_ids_to_train_ids(np.arange(34, dtype=np.uint8))
    assert sorted(train[train != 255].tolist()) == list(range(19))
    assert (train == 255).sum() == 34 - 19


def test_label_ids_file_decoded_and_train_ids_preferred(tmp_path):
    root = tmp_path / "cs"
    rng = np.random.default_rng(1)
    only = write_frame(root, "val", "bonn", 0, rng, "labelIds")
    both = write_frame(root, "val", "bonn", 1, rng, "both")
    data = Cityscapes(root, "val", spec=SPEC)
    assert [p.label.name for p in data.samples] == [f"{only}_gtFine_labelIds.png",
                                                     f"{both}_gtFine_labelTrainIds.png"]
    ids = np.array(Image.open(data.samples[0].label))
    _, label = data[0]
    assert label.dtype == torch.int64
    for label_id, train_id in ((7, 0), (8, 1), (26, 13), (33, 18), (0, 255), (6, 255), (9, 255)):
        assert (label.numpy()[ids == label_id] == train_id).all()
        assert (ids == label_id).any()
    _, label = data[1]  # both files: the labelTrainIds one, read as it is
    assert torch.equal(label, torch.from_numpy(np.array(Image.open(data.samples[1].label))).long())
    # a labelIds value that is no label id is an error naming the file
    bad = np.array(Image.open(data.samples[0].label))
    bad[5, 5] = 40
    Image.fromarray(bad).save(data.samples[0].label)
    with pytest.raises(DatasetError, match=rf"{only}_gtFine_labelIds\.png: values 40 are no "
                                           r"Cityscapes label id \(0\.\.33\)$"):
        data[0]


def test_dataset_lists_sorted_pairs_and_normalises(tmp_path):
    root = make_cityscapes(tmp_path / "cs")
    assert (SPEC.train_split, SPEC.val_split, SPEC.test_split) == ("train", "val", "val")
    assert SPEC.nclass == 19 and len(SPEC.colors) == max_label_id(SPEC) + 1 == 19
    assert (SPEC.mean, SPEC.std, SPEC.ignore_id) == (IMAGENET_MEAN, IMAGENET_STD, 255)
    data = build_dataset(SPEC, root, "train", (H, W), train=False)
    stems = [p.image.name[:-len("_leftImg8bit.png")] for p in data.samples]
    assert stems == ["aachen_000000_000019", "aachen_000001_000026",
                     "bremen_000000_000019", "bremen_000001_000026"]
    for pair in data.samples:
        assert pair.image.parent == root.absolute() / "leftImg8bit/train" / pair.image.parent.name
        assert pair.label == (root.absolute() / "gtFine/train" / pair.image.parent.name /
                              pair.image.name.replace("_leftImg8bit.png",
                                                      "_gtFine_labelTrainIds.png"))
    image, label = data[2]
    raw = torch.from_numpy(np.array(Image.open(data.samples[2].image))).permute(2, 0, 1)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(image, (raw / 255 - mean) / std, atol=1e-5)
    assert torch.equal(label, torch.from_numpy(np.array(Image.open(data.samples[2].label))).long())
    assert (label[:4] == 255).all() and int(label[4:].max()) <= 18


def test_missing_folder_and_label_name_the_file(tmp_path):
    with pytest.raises(DatasetError, match=r"^dataset folder not found: \S+nowhere$"):
        build_dataset(SPEC, tmp_path / "nowhere", "train")
    root = make_cityscapes(tmp_path / "cs")
    label = root / "gtFine/val/lindau/lindau_000001_000026_gtFine_labelTrainIds.png"
    label.unlink()
    with pytest.raises(DatasetError, match=rf"lindau_000001_000026_leftImg8bit\.png: annotation "
                                           rf"file not found: \S+{label.name} \(nor "
                                           rf"lindau_000001_000026_gtFine_labelIds\.png\)$"):
        build_dataset(SPEC, root, "val")


def test_cli_train_observer_test_and_bad_label(tmp_path):
    root = make_cityscapes(tmp_path / "cs")
    run = ["--data", "Cityscapes", "--dset_folder", str(root), "--size", str(H), str(W),
           "--width_mult", "0.0625", "--bsize", "2", "--epoch", "1", "--seed", "0",
           "--segnet_file", str(tmp_path / "segnet.pth"), "--obsnet_file", str(tmp_path / "obs"),
           "--tboard", str(tmp_path / "logs")]
    out = main_py(*run, "--train_segnet")
    assert out.returncode == 0, out.stdout + out.stderr
    out = main_py(*run, "--adv", "min_random_patch", "--epsilon", "0.025")
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "obs" / "best.pth").is_file()
    out = main_py(*run, "--test_only", "--test_multi", "obsnet,mcp")
    assert out.returncode == 0, out.stdout + out.stderr
    results = json.loads((tmp_path / "logs" / "results_val.json").read_text())
    assert results["split"] == "val" and results["n_images"] == 4
    for name in ("obsnet", "mcp"):
        assert "error" in results["methods"][name] and "ood" not in results["methods"][name]
    (root / "gtFine/train/bremen/bremen_000000_000019_gtFine_labelTrainIds.png").unlink()
    out = main_py(*run, "--train_segnet", "--overwrite")
    assert out.returncode != 0 and "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "bremen_000000_000019_gtFine_labelTrainIds.png" in lines[0], out.stderr


def test_check_good_and_broken(tmp_path):
    root = make_cityscapes(tmp_path / "cs", kind="labelIds")
    out = python("-m", "obsnet.check", "--data", "Cityscapes", "--dset_folder", str(root),
                 timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(r"^train\s+train\s+4\s", out.stdout, re.M)
    assert re.search(r"^val\s+val\s+4\s", out.stdout, re.M)
    assert "18 bicycle" in out.stdout and "OK: no problem found" in out.stdout
    (root / "gtFine/val/frankfurt/frankfurt_000000_000019_gtFine_labelIds.png").unlink()
    bad = root / "gtFine/train/aachen/aachen_000001_000026_gtFine_labelIds.png"
    Image.fromarray(np.full((H, W), 50, np.uint8)).save(bad)
    out = python("-m", "obsnet.check", "--data", "Cityscapes", "--dset_folder", str(root),
                 timeout=120)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert re.search(r"frankfurt_000000_000019_leftImg8bit\.png: annotation file not found: "
                     r"\S+frankfurt_000000_000019_gtFine_labelTrainIds\.png", out.stdout)
    assert re.search(r"aachen_000001_000026_gtFine_labelIds\.png: values 50 are no Cityscapes",
                     out.stdout)
    assert "FAILED: 2 problem(s) found" in out.stdout
