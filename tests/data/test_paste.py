"""``python -m obsnet.paste``: pasted OOD splits in the CamVid-OOD layout (tiny generated data)."""
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from obsnet.data import paste
from obsnet.paste import main
from obsnet.data.camvid import read_list
from obsnet.data.loaders import build_dataset
from obsnet.data.paste import PasteConfig, frame_rng, load_cutouts, paste_objects
from obsnet.data.specs import SPECS
from tests.helpers import SHARED
from tests.helpers.pasted import H, NAMES, W, files_of, make_split, ood_files

SAMPLE = SHARED / "data" / "camvid-sample"


@pytest.fixture
def root(tmp_path) -> Path:
    return make_split(tmp_path / "camvid")


def run_ok(*argv) -> None:
    assert main([*map(str, argv)]) == 0


def run_error(capsys, *argv) -> tuple[int, str]:
    """(exit code, stderr) of a failing run; stderr must be a single line without traceback."""
    capsys.readouterr()
    code = main([*map(str, argv)])
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return code, err


def bbox_side(mask: np.ndarray) -> int:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1)


def black_frame():
    """A black image (no texture colour is black) and random labels 0..11."""
    label = np.random.default_rng(2).integers(0, 12, (H, W), dtype=np.uint8)
    return np.zeros((H, W, 3), np.uint8), label


# ----------------------------------------------------------------------------- layout

def test_layout_list_file_and_loader(root):
    run_ok("--root", root, "--split", "val", "--count", 2, 3)
    lines = (root / "val_ood.txt").read_text().splitlines()
    assert lines == [f"val_ood/{n} valannot_ood/{n}" for n in NAMES]
    for folder in ("val_ood", "valannot_ood"):
        assert sorted(p.name for p in (root / folder).glob("*.png")) == list(NAMES)
        assert (root / folder / paste.MARKER).is_file()
    _, pairs = read_list(root, "val_ood")
    assert [p.image for p in pairs] == [root / "val_ood" / n for n in NAMES]
    dataset = build_dataset(SPECS["CamVid"], root, "val_ood", size=(H, W))
    assert len(dataset) == len(NAMES)
    for image, label in dataset:
        assert image.shape == (3, H, W) and label.shape == (H, W)
        assert (label == 12).any()
    with Image.open(root / "valannot_ood" / NAMES[0]) as img:
        assert img.mode == "L"


def test_out_root(root, tmp_path):
    out = tmp_path / "elsewhere"
    run_ok("--root", root, "--split", "val", "--out", out)
    assert (out / "val_ood.txt").is_file() and not (root / "val_ood.txt").exists()
    assert len(build_dataset(SPECS["CamVid"], out, "val_ood", size=(H, W))) == len(NAMES)


def test_suffix_writes_a_second_split_next_to_val_ood(root, objects):
    run_ok("--root", root, "--split", "val")
    procedural = ood_files(root)
    run_ok("--root", root, "--split", "val", "--objects", objects, "--suffix", "ood_real",
           "--feather", 0)
    assert ood_files(root) == procedural  # val_ood untouched
    lines = (root / "val_ood_real.txt").read_text().splitlines()
    assert lines == [f"val_ood_real/{n} valannot_ood_real/{n}" for n in NAMES]
    for folder in ("val_ood_real", "valannot_ood_real"):
        assert (root / folder / paste.MARKER).is_file()
    dataset = build_dataset(SPECS["CamVid"], root, "val_ood_real", size=(H, W))
    for (image, label), name in zip(dataset, NAMES):
        assert (label == 12).any()
        with Image.open(root / "val_ood_real" / name) as img, \
                Image.open(root / "valannot_ood_real" / name) as lab:
            pixels = np.asarray(img)[np.asarray(lab) == 12]
        # the cut-outs' colours (magenta disc, red / blue bar: no green), not the random
        # background nor a procedural texture
        assert len(pixels) and pixels[:, 1].max() < 8
    # --overwrite of one suffix replaces that split only
    run_ok("--root", root, "--split", "val", "--suffix", "ood_real", "--seed", 3, "--overwrite")
    assert ood_files(root) == procedural
    assert ood_files(root) != ood_files(root, suffix="ood_real")


# ----------------------------------------------------------------------------- pixels

@pytest.mark.parametrize("seed", range(5))
def test_labels_exactly_where_the_image_changed(seed):
    image, label = black_frame()
    config = PasteConfig(count=(1, 3), size=(0.2, 0.5), feather=0)
    pasted = paste_objects(image, label, frame_rng(seed, "x.png"), config)
    union = np.any(pasted.objects, axis=0)
    changed = (pasted.image != 0).any(-1)
    assert union.any()
    np.testing.assert_array_equal(changed, union)
    np.testing.assert_array_equal(pasted.label == 12, union | (label == 12))
    np.testing.assert_array_equal(pasted.label[~union], label[~union])
    assert not image.any() and label.max() < 12  # inputs untouched


def test_feather_changes_nothing_outside_the_mask():
    rng = np.random.default_rng(3)
    image, label = rng.integers(0, 256, (H, W, 3), dtype=np.uint8), np.zeros((H, W), np.uint8)
    pasted = paste_objects(image, label, frame_rng(0, "x.png"),
                           PasteConfig(count=(2, 2), size=(0.4, 0.6), anomaly_id=7, feather=2))
    union = np.any(pasted.objects, axis=0)
    np.testing.assert_array_equal(pasted.image[~union], image[~union])
    np.testing.assert_array_equal(pasted.label, np.where(union, 7, 0))


def test_count_and_size_ranges():
    image, label = black_frame()
    config = PasteConfig(count=(2, 4), size=(0.25, 0.5))
    counts, sides = set(), []
    for seed in range(40):
        pasted = paste_objects(image, label, frame_rng(seed, "x.png"), config)
        counts.add(len(pasted.objects))
        sides += [bbox_side(m) for m in pasted.objects]
    assert counts == {2, 3, 4}
    short = min(H, W)
    assert min(sides) >= round(0.25 * short) - 2 and max(sides) <= round(0.5 * short)
    assert max(sides) - min(sides) > 0.15 * short  # sizes do vary


@pytest.mark.parametrize("kind", paste.TEXTURES)
def test_textures(kind):
    tex = paste.texture(np.random.default_rng(0), 20, 30, kind)
    assert tex.shape == (20, 30, 3) and tex.min() >= 0 and tex.max() <= 255
    assert tex.std() > 1  # not flat


# ----------------------------------------------------------------------------- seeds

def test_same_seed_same_bytes_other_seed_differs(root, tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        run_ok("--root", root, "--split", "val", "--out", tmp_path / name, "--seed", seed)
    a, b, c = (ood_files(tmp_path / name) for name in "abc")
    assert a == b
    assert a.keys() == c.keys() and all(a[k] != c[k] for k in a if k.startswith("val_ood/"))


def test_a_frame_does_not_depend_on_the_others(root, tmp_path):
    make_split(tmp_path / "one", names=NAMES[1:2])
    shutil.copy(root / "val" / NAMES[1], tmp_path / "one" / "val" / NAMES[1])
    shutil.copy(root / "valannot" / NAMES[1], tmp_path / "one" / "valannot" / NAMES[1])
    run_ok("--root", root, "--split", "val")
    run_ok("--root", tmp_path / "one", "--split", "val")
    for folder in ("val_ood", "valannot_ood"):
        assert ((root / folder / NAMES[1]).read_bytes()
                == (tmp_path / "one" / folder / NAMES[1]).read_bytes())


# ----------------------------------------------------------------------------- cut-outs

@pytest.fixture
def objects(tmp_path) -> Path:
    """An RGBA disc (magenta) and an RGB bar (red left half, blue right) with its mask."""
    folder = tmp_path / "objects"
    folder.mkdir()
    yy, xx = np.mgrid[0:30, 0:30]
    rgba = np.zeros((30, 30, 4), np.uint8)
    rgba[..., [0, 2]] = 255
    rgba[..., 3] = np.where((yy - 15) ** 2 + (xx - 15) ** 2 < 100, 255, 0)
    Image.fromarray(rgba).save(folder / "disc.png")
    bar = np.zeros((20, 40, 3), np.uint8)
    bar[:, :20, 0], bar[:, 20:, 2] = 255, 255
    Image.fromarray(bar).save(folder / "bar.png")
    mask = np.zeros((20, 40), np.uint8)
    mask[5:15] = 1
    Image.fromarray(mask).save(folder / "bar_mask.png")
    return folder


def test_cutouts_rgba_and_mask(objects):
    cutouts = load_cutouts(objects)
    assert [c.mask.shape for c in cutouts] == [(10, 40), (19, 19)]  # sorted: bar, disc; cropped
    image, label = black_frame()
    config = PasteConfig(count=(1, 1), size=(0.5, 0.5), feather=0)
    firsts = set()
    for seed in range(30):
        pasted = paste_objects(image, label, frame_rng(seed, "x.png"), config, cutouts)
        mask = pasted.objects[0]
        np.testing.assert_array_equal((pasted.image != 0).any(-1), mask)
        np.testing.assert_array_equal(pasted.label == 12, mask | (label == 12))
        colours = {tuple(c) for c in (pasted.image[mask] // 64 * 64)}
        if (192, 0, 192) in colours:  # the disc: magenta only
            assert colours == {(192, 0, 192)}
        else:  # the bar: its leftmost column is red, or blue when flipped
            rows, cols = np.nonzero(mask)
            firsts.add(tuple(pasted.image[rows[cols == cols.min()][0], cols.min()] // 128))
    assert firsts == {(1, 0, 0), (0, 0, 1)}


def test_cutouts_through_the_cli(root, objects):
    run_ok("--root", root, "--split", "val", "--objects", objects)
    assert len(build_dataset(SPECS["CamVid"], root, "val_ood", size=(H, W))) == len(NAMES)


@pytest.mark.parametrize("bad", ["garbage", "rgb_without_mask", "empty_alpha", "orphan_mask",
                                 "mask_size"])
def test_bad_object_file_is_one_line(root, objects, capsys, bad):
    target = objects / "bad.png"
    if bad == "garbage":
        target.write_text("not a png")
    elif bad == "rgb_without_mask":
        Image.new("RGB", (8, 8), (1, 2, 3)).save(target)
    elif bad == "empty_alpha":
        Image.new("RGBA", (8, 8)).save(target)
    elif bad == "orphan_mask":
        target = objects / "ghost_mask.png"
        Image.new("L", (8, 8), 1).save(target)
    else:
        Image.new("RGB", (8, 8)).save(target)
        target = objects / "bad_mask.png"
        Image.new("L", (9, 8), 1).save(target)
    code, err = run_error(capsys, "--root", root, "--split", "val", "--objects", objects)
    assert code == 1 and target.name in err
    assert not (root / "val_ood").exists()


# ----------------------------------------------------------------------------- overwriting

@pytest.mark.parametrize("existing", ["val_ood", "valannot_ood", "val_ood.txt"])
def test_refuses_what_it_did_not_write(root, capsys, existing):
    path = root / existing
    if existing.endswith(".txt"):
        path.write_text("mine\n")
    else:
        path.mkdir()
        (path / "mine.txt").write_text("mine")
    before = files_of(root)
    for extra in ([], ["--overwrite"]):
        code, err = run_error(capsys, "--root", root, "--split", "val", *extra)
        assert code == 1 and str(path) in err
    assert files_of(root) == before


def test_overwrite_own_output_keeps_foreign_files(root, capsys):
    run_ok("--root", root, "--split", "val", "--seed", 0)
    (root / "val_ood" / "notes.txt").write_text("mine")
    code, err = run_error(capsys, "--root", root, "--split", "val", "--seed", 1)
    assert code == 1 and "val_ood" in err
    run_ok("--root", root, "--split", "val", "--seed", 1, "--overwrite")
    assert (root / "val_ood" / "notes.txt").read_text() == "mine"
    other = ood_files(root)
    assert other.pop("val_ood/notes.txt") == b"mine"
    shutil.rmtree(root / "val_ood"), shutil.rmtree(root / "valannot_ood")
    (root / "val_ood.txt").unlink()
    run_ok("--root", root, "--split", "val", "--seed", 1)
    assert ood_files(root) == other


def test_interrupted_run_leaves_nothing(root, monkeypatch):
    calls = []

    def interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    before = files_of(root)
    real = paste.paste_objects
    monkeypatch.setattr(paste, "paste_objects", interrupt)
    assert main(["--root", str(root), "--split", "val"]) == 130
    assert files_of(root) == before  # frames were written aside, then removed with their folder
    assert sorted(p.name for p in root.iterdir()) == ["val", "val.txt", "valannot"]
    monkeypatch.setattr(paste, "paste_objects", real)
    run_ok("--root", root, "--split", "val")  # nothing to overwrite
    assert (root / "val_ood.txt").is_file()


# ----------------------------------------------------------------------------- CLI errors

@pytest.mark.parametrize("argv, code, named", [
    (["--split", "val"], 2, "--root"),
    (["--root", "{root}"], 2, "--split"),
    (["--root", "{root}/nowhere", "--split", "val"], 1, "nowhere"),
    (["--root", "{root}", "--split", "test"], 1, "test.txt"),
    (["--root", "{root}", "--split", "val", "--count", "3", "1"], 2, "--count"),
    (["--root", "{root}", "--split", "val", "--count", "0", "0"], 2, "--count"),
    (["--root", "{root}", "--split", "val", "--count", "x", "1"], 2, "--count"),
    (["--root", "{root}", "--split", "val", "--size", "0", "2"], 2, "--size"),
    (["--root", "{root}", "--split", "val", "--size", "0.3", "0.1"], 2, "--size"),
    (["--root", "{root}", "--split", "val", "--anomaly_id", "256"], 2, "--anomaly_id"),
    (["--root", "{root}", "--split", "val", "--anomaly_id", "3"], 1, "--anomaly_id"),
    (["--root", "{root}", "--split", "val", "--seed", "-1"], 2, "--seed"),
    (["--root", "{root}", "--split", "val", "--feather", "-1"], 2, "--feather"),
    (["--root", "{root}", "--split", "val", "--objects", "{root}/none"], 2, "--objects"),
    (["--root", "{root}", "--split", "val", "--suffix="], 2, "--suffix"),
    (["--root", "{root}", "--split", "val", "--suffix", "a/b"], 2, "--suffix"),
    (["--root", "{root}", "--split", "val", "--suffix", ".."], 2, "--suffix"),
    (["--root", "{root}", "--split", "val", "--suffix", "ood real"], 2, "--suffix"),
    (["--root", "{root}", "--split", "val", "--suffix", "a\\b"], 2, "--suffix"),
    (["--root", "{root}", "--split", "val", "--suffix", "x" * 65], 2, "--suffix"),
])
def test_cli_errors(root, capsys, argv, code, named):
    argv = [a.format(root=root) for a in argv]
    got, err = run_error(capsys, *argv)
    assert got == code and named in err
    assert not (root / "val_ood").exists() and not (root / "val_ood.txt").exists()


def test_existing_anomaly_id_can_be_allowed(root, capsys):
    run_ok("--root", root, "--split", "val", "--anomaly_id", 3, "--allow_existing_id")
    assert "warning" in capsys.readouterr().err


def test_bad_label_is_one_line(root, capsys):
    Image.new("RGB", (W, H)).save(root / "valannot" / NAMES[1])
    code, err = run_error(capsys, "--root", root, "--split", "val")
    assert code == 1 and NAMES[1] in err and "val.txt:2" in err


# ----------------------------------------------------------------------------- real data

def test_real_camvid_sample(tmp_path):
    if not (SAMPLE / "val.txt").is_file():
        pytest.skip(f"real CamVid sample not found: {SAMPLE}")
    root = tmp_path / "camvid"
    root.mkdir()
    shutil.copy(SAMPLE / "val.txt", root / "val.txt")
    for folder in ("val", "valannot"):
        shutil.copytree(SAMPLE / folder, root / folder)
    run_ok("--root", root, "--split", "val", "--count", 1, 2)
    dataset = build_dataset(SPECS["CamVid"], root, "val_ood", size=(90, 120))
    _, pairs = read_list(root, "val")
    assert len(dataset) == len(pairs)
    for pair, out in zip(pairs, read_list(root, "val_ood")[1]):
        original = np.asarray(Image.open(pair.label))
        pasted = np.asarray(Image.open(out.label))
        assert original.max() <= 11 and (pasted == 12).any()
        np.testing.assert_array_equal(pasted[pasted != 12], original[pasted != 12])
