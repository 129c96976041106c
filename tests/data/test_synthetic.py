"""Tests of the synthetic CamVid-layout dataset generator (obsnet/data/synthetic.py)."""
import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from obsnet import synthetic as synthetic_cli
from obsnet.data import synthetic
from obsnet.data.specs import SPECS

SPEC = SPECS["Synthetic"]
COUNTS = {"n_train": 8, "n_val": 2, "n_test": 4}
SPLITS = {"train": ("train", "trainannot"), "val": ("val", "valannot"),
          "test": ("test", "testannot"), "test_ood": ("test_ood", "testannot_ood")}
OOD = SPEC.anomaly_ids[0]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return synthetic.generate(tmp_path_factory.mktemp("synth") / "ds", seed=0, **COUNTS)


def _pairs(root: Path, split: str) -> list[tuple[Path, Path]]:
    lines = (root / f"{split}.txt").read_text().splitlines()
    return [tuple(root / p for p in line.split()) for line in lines]


def _load(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """Chebyshev dilation by r pixels (the support of the generator's blur)."""
    out = mask.copy()
    padded = np.pad(mask, r)
    h, w = mask.shape
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            out |= padded[dy:dy + h, dx:dx + w]
    return out


def test_layout_and_lists(root):
    expected = {"train": 8, "val": 2, "test": 4, "test_ood": 4}
    for split, (img_dir, ann_dir) in SPLITS.items():
        pairs = _pairs(root, split)
        assert len(pairs) == expected[split]
        assert len(list((root / img_dir).glob("*.png"))) == expected[split]
        for img_path, ann_path in pairs:
            assert img_path.parent.name == img_dir and ann_path.parent.name == ann_dir
            assert img_path.name == ann_path.name
            with Image.open(img_path) as im, Image.open(ann_path) as an:
                assert im.mode == "RGB" and an.mode == "L"
                assert im.size == an.size == (SPEC.size[1], SPEC.size[0])
    names = lambda split: [p.name for p, _ in _pairs(root, split)]  # noqa: E731
    assert names("test") == names("test_ood")


def test_label_values(root):
    for split in ("train", "val", "test"):
        seen = np.zeros(256, bool)
        for _, ann in _pairs(root, split):
            seen[np.unique(_load(ann))] = True
        assert not seen[SPEC.nclass:].any(), f"{split}: ids beyond {SPEC.nclass - 1}"
    for _, ann in _pairs(root, "test_ood"):
        lab = _load(ann)
        assert set(np.unique(lab)) <= set(range(SPEC.nclass)) | {OOD}
        assert (lab == OOD).mean() >= synthetic.MIN_OOD_SHARE


def test_ood_split_is_test_plus_objects(root):
    for (img, ann), (oimg, oann) in zip(_pairs(root, "test"), _pairs(root, "test_ood")):
        lab, olab = _load(ann), _load(oann)
        anomaly = olab == OOD
        np.testing.assert_array_equal(lab[~anomaly], olab[~anomaly])
        far = ~_dilate(anomaly, 2)  # the blur spreads an object by at most 2 px
        np.testing.assert_array_equal(_load(img)[far], _load(oimg)[far])
        assert (_load(img)[anomaly] != _load(oimg)[anomaly]).any()


def test_deterministic(root, tmp_path):
    again = synthetic.generate(tmp_path / "same", seed=0, **COUNTS)
    assert _digest(again) == _digest(root)
    other = synthetic.generate(tmp_path / "other", seed=1, **COUNTS)
    a, b = _digest(root), _digest(other)
    assert all(a[k] != b[k] for k in a if k.endswith(".png"))


def test_marker_skips_and_redoes(tmp_path, caplog):
    counts = {"n_train": 3, "n_val": 1, "n_test": 1}
    ds = synthetic.generate(tmp_path / "ds", seed=3, **counts)
    marker = json.loads((ds / synthetic.MARKER).read_text())
    assert marker["seed"] == 3 and marker["n_train"] == 3
    probe = ds / "train" / "train_00000.png"
    os.utime(probe, (1, 1))
    synthetic.generate(ds, seed=3, **counts)
    assert probe.stat().st_mtime == 1, "a complete dataset was rewritten"
    (ds / synthetic.MARKER).unlink()  # as after an interrupted run
    synthetic.generate(ds, seed=3, **counts)
    assert probe.stat().st_mtime != 1 and (ds / synthetic.MARKER).exists()
    synthetic.generate(ds, seed=3, n_train=2, n_val=1, n_test=1)  # other parameters: redone
    assert len(list((ds / "trainannot").iterdir())) == 2
    with caplog.at_level(logging.INFO, logger="obsnet"):
        synthetic.ensure_synthetic(ds, seed=3, n_train=2, n_val=1, n_test=1)
    assert "reusing" in caplog.text


def test_cli(tmp_path):
    synthetic_cli.main(["--out", str(tmp_path / "cli"), "--seed", "5", "--n_train", "2",
                    "--n_val", "1", "--n_test", "1"])
    marker = json.loads((tmp_path / "cli" / synthetic.MARKER).read_text())
    assert marker["seed"] == 5 and marker["size"] == list(SPEC.size)
    assert len((tmp_path / "cli" / "test_ood.txt").read_text().splitlines()) == 1


def _roughness(img: np.ndarray, mask: np.ndarray) -> float:
    """Mean |horizontal difference| over pixel pairs inside the mask (texture + noise);
    NaN when the mask holds fewer than 20 such pairs (thin poles)."""
    inside = mask[:, 1:] & mask[:, :-1]
    diff = np.abs(np.diff(img.astype(np.float32), axis=1)).mean(-1)
    return float(diff[inside].mean()) if inside.sum() >= 20 else float("nan")


def test_ood_objects_look_in_distribution(root):
    """Anomalies must not be separable by colour or noise level: their mean colour (per
    channel) and their pixel roughness lie within the range spanned by the training
    classes (each class pooled over the training images)."""
    sums, counts, rough = np.zeros((SPEC.nclass, 3)), np.zeros(SPEC.nclass), {}
    for img_path, ann_path in _pairs(root, "train"):
        img, lab = _load(img_path).astype(np.float64), _load(ann_path)
        for c in np.unique(lab):
            sums[c] += img[lab == c].sum(0)
            counts[c] += (lab == c).sum()
            rough.setdefault(c, []).append(_roughness(img, lab == c))
    means = sums[counts > 0] / counts[counts > 0, None]
    ood_pixels = [_load(i)[_load(a) == OOD] for i, a in _pairs(root, "test_ood")]
    ood_mean = np.concatenate(ood_pixels).mean(0)
    assert np.all(ood_mean >= means.min(0)) and np.all(ood_mean <= means.max(0))
    class_rough = [np.nanmean(v) for v in rough.values() if np.isfinite(v).any()]
    ood_rough = np.nanmean([_roughness(_load(i), _load(a) == OOD)
                            for i, a in _pairs(root, "test_ood")])
    assert len(class_rough) >= 8 and np.isfinite(ood_rough)
    assert min(class_rough) <= ood_rough <= max(class_rough)
