"""StreetHazards and BDD-Anomaly loaders, label-id validation and ``python -m obsnet.check``.

Every folder is generated here in the real layout and file naming (small images), and read
through ``build_dataset`` / ``build_loader`` / ``data_loader`` as main.py reads it.
"""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from obsnet import check
from obsnet.data.base import max_label_id
from obsnet.data.errors import DatasetError
from obsnet.data.loaders import build_dataset, build_loader, data_loader
from obsnet.data.odgt import read_odgt
from obsnet.data.specs import SPECS
from tests.helpers import SHARED
from tests.helpers.anomaly_seg import COUNTS, MAKERS, H, W, make_bdd, make_street, write_odgt
from tests.helpers.camvid import make_camvid
from tests.helpers.runner import python

EXCERPT = SHARED / "reference" / "bdd-anomaly-test-excerpt.odgt"


def expected_ids(label_file: Path, spec) -> torch.Tensor:
    """What the loader must give for a raw label file: value - 1, raw 0 -> ignore id."""
    raw = torch.from_numpy(np.array(Image.open(label_file), dtype=np.int64))
    return torch.where(raw == 0, spec.ignore_id, raw - 1)


def assert_loads(spec, root: Path, split: str, anomalies: bool) -> None:
    """Labels shifted, ignore and anomaly pixels where the raw file has them, colours cover all."""
    data = build_dataset(spec, root, split, (H, W), train=False)
    assert len(data) == COUNTS[split]
    for index, pair in enumerate(data.samples):
        image, label = data[index]
        assert image.shape == (3, H, W) and image.dtype == torch.float32
        assert label.shape == (H, W) and label.dtype == torch.int64
        expected = expected_ids(pair.label, spec)
        assert torch.equal(label, expected)
        assert label[0, 0] == spec.ignore_id and label.min() >= 0
        is_anomaly = torch.isin(label, torch.tensor(spec.anomaly_ids))
        assert bool(is_anomaly.any()) == anomalies
        assert int(label[label != spec.ignore_id].max()) < len(spec.colors)
    assert len(spec.colors) == max_label_id(spec) + 1


def assert_loaders(spec, root: Path) -> None:
    """The three loaders main.py builds: batch shapes, ids within the spec, anomalies in test."""
    train, val, test = data_loader(spec, root, (16, 32), bsize=2)
    assert (len(train), len(val), len(test)) == (2, 1, 1)
    for loader in (train, val, test):
        images, labels = next(iter(loader))
        assert images.shape == (2, 3, 16, 32) and labels.shape == (2, 16, 32)
        valid = labels[labels != spec.ignore_id]
        assert 0 <= int(valid.min()) and int(valid.max()) <= max_label_id(spec)
    labels = torch.cat([batch[1] for batch in test])
    assert torch.isin(labels, torch.tensor(spec.anomaly_ids)).any()


@pytest.mark.parametrize("form", ["array", "lines"])
@pytest.mark.parametrize("train_name", ["train.odgt", "training.odgt"])
def test_street_hazard_loads(tmp_path, form, train_name):
    spec = SPECS["StreetHazard"]
    root = make_street(tmp_path / "StreetHazards", form, train_name)
    assert (spec.train_split, spec.val_split, spec.test_split) == ("train", "validation", "test")
    for split in COUNTS:
        assert_loads(spec, root, split, anomalies=split == "test")
    assert_loaders(spec, root)


@pytest.mark.parametrize("form, test_name, nested", [
    ("array", "test.odgt", False), ("lines", "anom.odgt", False), ("array", "anom.odgt", True)])
def test_bdd_anomaly_loads(tmp_path, form, test_name, nested):
    spec = SPECS["BddAnomaly"]
    root = make_bdd(tmp_path / "BDD", form, test_name, nested)
    for split in COUNTS:
        assert_loads(spec, root, split, anomalies=split == "test")
    data = build_dataset(spec, root, "test")
    assert data.list_file.name == test_name
    prefix = root / "bdd100k" if nested else root
    assert data.samples[0].image.is_relative_to(prefix / "seg/images/train")
    assert data.samples[0].label.name.endswith("_train_id.png")
    assert_loaders(spec, root)


def test_split_file_preference_and_aliases(tmp_path):
    root = make_street(tmp_path / "sh", train_name="training.odgt")
    (root / "train.odgt").write_text((root / "training.odgt").read_text())
    assert build_dataset(SPECS["StreetHazard"], root, "train").list_file.name == "train.odgt"
    bdd = make_bdd(tmp_path / "bdd")
    for alias in ("val.odgt", "valiadation.odgt"):  # the original README's typo
        (bdd / "validation.odgt").rename(bdd / alias)
        assert build_dataset(SPECS["BddAnomaly"], bdd, "validation").list_file.name == alias
        (bdd / alias).rename(bdd / "validation.odgt")


@pytest.mark.parametrize("name, split, tried", [
    ("StreetHazard", "train", "train.odgt, training.odgt"),
    ("BddAnomaly", "validation", "validation.odgt, val.odgt, valiadation.odgt"),
    ("BddAnomaly", "test", "test.odgt, anom.odgt")])
def test_missing_split_file_names_every_candidate(tmp_path, name, split, tried):
    root = MAKERS[name](tmp_path / name)
    for odgt in root.glob("*.odgt"):
        odgt.unlink()
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(root))}: split file for split "
                                           rf"'{split}' not found \(tried {re.escape(tried)}\)$"):
        build_dataset(SPECS[name], root, split)


def test_reference_excerpt_parses():
    if not EXCERPT.is_file():
        pytest.skip(f"BDD-Anomaly excerpt not found at {EXCERPT}")
    entries = read_odgt(EXCERPT)
    assert len(entries) >= 1
    for k, (where, entry) in enumerate(entries, start=1):
        assert where == f"{EXCERPT}:1: entry {k}"  # one JSON array on one line
        image = re.fullmatch(r"seg/images/(train|val)/([0-9a-f]+-[0-9a-f]+)\.jpg",
                             entry["fpath_img"])
        assert image, entry["fpath_img"]
        assert entry["fpath_segm"] == f"seg/train_labels/{image[1]}/{image[2]}_train_id.png"
        assert (entry["width"], entry["height"]) == (1280, 720)


def _append_line(path: Path, line: str) -> None:
    """Append one line to an odgt file."""
    with open(path, "a") as handle:
        handle.write(line + "\n")


def _ghost(entry: dict, key: str) -> str:
    """The entry as a JSON line whose ``key`` file does not exist."""
    return json.dumps({**entry, key: entry[key].replace(Path(entry[key]).stem, "ghost")})


def _first_entry(odgt: Path) -> dict:
    """The first entry of an odgt file."""
    return read_odgt(odgt)[0][1]


# case -> (how validation.odgt is broken, the message). Validation lists 2 entries, one per
# line: an appended line is line 3.
BREAKS = {
    "missing_folder": (lambda odgt: None, r"dataset folder not found: \S+nowhere$"),
    "missing_split": (lambda odgt: odgt.unlink(),
                      r"split file for split 'validation' not found \(tried validation\.odgt"),
    "invalid_json": (lambda odgt: _append_line(odgt, '{"fpath_img": '),
                     r"validation\.odgt:3: invalid JSON"),
    "missing_key": (lambda odgt: _append_line(odgt, '{"fpath_img": "a.png"}'),
                    r"validation\.odgt:3: missing key 'fpath_segm'"),
    "missing_image": (lambda odgt: _append_line(odgt, _ghost(_first_entry(odgt), "fpath_img")),
                      r"validation\.odgt:3: image file not found: \S*ghost"),
    "missing_label": (lambda odgt: _append_line(odgt, _ghost(_first_entry(odgt), "fpath_segm")),
                      r"validation\.odgt:3: annotation file not found: \S*ghost"),
}


@pytest.mark.parametrize("name", sorted(MAKERS))
@pytest.mark.parametrize("case", sorted(BREAKS))
def test_bad_inputs_name_file_and_line(tmp_path, name, case):
    root = MAKERS[name](tmp_path / name, form="lines")
    breaker, expected = BREAKS[case]
    breaker(root / "validation.odgt")
    where = root / "nowhere" if case == "missing_folder" else root
    with pytest.raises(DatasetError, match=expected) as info:
        build_dataset(SPECS[name], where, "validation")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_array_form_errors_name_line_and_entry(tmp_path, name):
    root = MAKERS[name](tmp_path / name, form="array")
    odgt = root / "validation.odgt"
    entries = [entry for _, entry in read_odgt(odgt)]
    del entries[1]["fpath_img"]
    write_odgt(odgt, entries, "array")
    with pytest.raises(DatasetError, match=r"validation\.odgt:1: entry 2: missing key 'fpath_img'"):
        build_dataset(SPECS[name], root, "validation")
    odgt.write_text(json.dumps(entries)[:-1] + "\n")  # truncated array
    with pytest.raises(DatasetError, match=r"validation\.odgt:1: invalid JSON"):
        build_dataset(SPECS[name], root, "validation")


def _rewrite_label(path: Path, value: int, size: tuple[int, int] | None = None) -> None:
    """Put ``value`` in one pixel of a label file, resized to (H, W) ``size`` when given."""
    label = Image.open(path)
    label = np.array(label.resize(size[::-1], Image.NEAREST) if size else label, dtype=np.uint8)
    label[2, 3] = value
    Image.fromarray(label).save(path)


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_size_mismatch_and_bad_ids_at_read(tmp_path, name):
    spec = SPECS[name]
    root = MAKERS[name](tmp_path / name)
    data = build_dataset(spec, root, "validation")
    _rewrite_label(data.samples[0].label, 5, size=(H - 2, W))
    with pytest.raises(DatasetError, match=rf"validation\.odgt:1: entry 1: size mismatch: "
                                           rf"image \S+ is \({H}, {W}\), annotation \S+"):
        data[0]
    top = max_label_id(spec)
    _rewrite_label(data.samples[1].label, top + 2)  # raw top + 2 -> id top + 1: not a class
    with pytest.raises(DatasetError, match=rf"{re.escape(data.samples[1].label.name)}: label ids "
                                           rf"{top + 1} not in 0\.\.{top}.*raw file values {top + 2}"):
        data[1]
    _rewrite_label(data.samples[1].label, 255)  # raw 255 -> 254, not the ignore id 255
    with pytest.raises(DatasetError, match=r"label ids 254 .*raw file values 255"):
        data[1]


@pytest.mark.parametrize("name", ["CamVid", "Synthetic"])
def test_camvid_layout_rejects_bad_ids(tmp_path, name):
    root = make_camvid(tmp_path / "cv")
    _rewrite_label(root / "valannot" / "f001.png", 13)
    data = build_dataset(SPECS[name], root, "val", (H, W))
    data[0]
    with pytest.raises(DatasetError, match=r"val\.txt:2: annotation \S*valannot/f001\.png: "
                                           r"label ids 13 not in 0\.\.12 or the ignore id 255$"):
        data[1]
    loader = build_loader(data, bsize=2, train=False)
    with pytest.raises(DatasetError, match="f001.png"):
        next(iter(loader))


def run_check(*args: str):
    """``python -m obsnet.check ARGS`` from the repository root."""
    return python("-m", "obsnet.check", *args, timeout=120)


def test_check_good_folder(tmp_path):
    root = make_street(tmp_path / "sh", train_name="training.odgt")
    out = run_check("--data", "StreetHazard", "--dset_folder", str(root))
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(r"^train\s+training\.odgt\s+4\s", out.stdout, re.M)
    assert re.search(r"^test\s+test\.odgt\s+2\s+\d+\s+2\s+2\s+0$", out.stdout, re.M)
    assert "13 anomaly" in out.stdout and "OK: no problem found" in out.stdout
    assert "Traceback" not in out.stderr


def test_check_broken_folder_collects_every_problem(tmp_path):
    root = make_bdd(tmp_path / "bdd", form="lines", nested=True)
    _append_line(root / "validation.odgt", "not json")
    train = build_dataset(SPECS["BddAnomaly"], root, "train")
    train.samples[0].image.unlink()
    _rewrite_label(train.samples[1].label, 40)
    _rewrite_label(train.samples[2].label, 3, size=(H, W + 1))
    Path(train.samples[3].image).write_bytes(b"not a jpeg")
    out = run_check("--data", "BddAnomaly", "--dset_folder", str(root))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    expected = [r"validation\.odgt:3: invalid JSON", r"train\.odgt:1: image file not found",
                r"train\.odgt:2: annotation \S+ label ids 39 .*raw file values 40",
                r"train\.odgt:3: size mismatch",
                rf"train\.odgt:4: image \S+{train.samples[3].image.name}: cannot be read",
                r"FAILED: 5 problem\(s\) found"]
    for pattern in expected:
        assert re.search(pattern, out.stdout), pattern
    assert re.search(r"^train\s+train\.odgt\s+3\s", out.stdout, re.M)  # 3 labels read


def test_check_usage_errors_exit_2(tmp_path, capsys):
    for argv in (["--data", "Nowhere", "--dset_folder", "x"], ["--data", "CamVid"]):
        with pytest.raises(SystemExit) as info:
            check.main(argv)
        assert info.value.code == 2
    assert check.main(["--data", "CamVid", "--dset_folder", str(tmp_path / "none")]) == 1
    assert "dataset folder not found" in capsys.readouterr().out


def test_check_shared_camvid_sample():
    sample = SHARED / "data" / "camvid-sample"
    if not sample.is_dir():
        pytest.skip(f"shared CamVid sample not found at {sample}")
    out = run_check("--data", "CamVid", "--dset_folder", str(sample))
    assert out.returncode == 0, out.stdout + out.stderr
    rows = {m[1]: (int(m[2]), int(m[3])) for m in
            re.finditer(r"^(\w+)\s+\w+\.txt\s+(\d+)\s+(\d+)", out.stdout, re.M)}
    assert {k: v[0] for k, v in rows.items()} == {"train": 6, "val": 2, "test": 3, "test_ood": 3}
    assert rows["test_ood"][1] > 0 and rows["test"][1] == 0  # anomaly pixels
