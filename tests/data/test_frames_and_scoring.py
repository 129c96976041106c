"""Issue 25, items 8 and 13: no benchmark frame is left out silently (every format the layout
names, extensions in any letter case; one frame in two files refused, naming both; other
formats reported by ``python -m obsnet.check``), ``inference.py`` reads ``.webp``, a split with
nothing to score stops in one line, and ``obsnet.check`` reports benchmark mask values other
than 0 / 1 / 255.

Layouts are built in tmp_path with ``test_smiyc``'s helpers; the networks are untrained tiny
SegNets saved as plain state_dicts (only the data matters here)."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from obsnet.check import main as check_main
from obsnet.data.errors import DatasetError
from obsnet.data.loaders import build_dataset
from obsnet.data.specs import SPECS
from obsnet.inference import main as inference_main
from obsnet.models.checkpoint import save_checkpoint
from obsnet.models.obsnet import Obsnet_Seg
from obsnet.models.segnet import SegNet
from tests.helpers.runner import main_py
from tests.helpers.smiyc import ANOMALY_STEMS, FISHY, OBSTACLE_STEMS, make_anomaly, make_fishy, make_track

LAF_TEST = "leftImg8bit/test/02_Hanns_Klemm_Str_44"


def _image(path: Path, h: int = 24, w: int = 40) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(path.name))
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def _laf_test_frames(laf: Path, names) -> list[Path]:
    """LostAndFound test images ``<fid>_leftImg8bit.<ext>`` in one scene folder."""
    return [_image(laf / LAF_TEST / f"02_Hanns_Klemm_Str_44_000000_0000{i}0_leftImg8bit.{ext}")
            for i, ext in names]


def _check(capsys, *args) -> tuple[int, str]:
    code = check_main(["--workers", "1", *args])
    return code, capsys.readouterr().out


def _split_row(out: str, split: str) -> list[str]:
    return next(line.split() for line in out.splitlines() if line.startswith(f"{split} "))


# item 8: frames silently left out ---------------------------------------------------------

def test_laf_test_split_reads_every_format(tmp_path, capsys):
    """One png and two webp frames (one .WEBP): all three are read, not the png alone."""
    datasets = tmp_path / "datasets"
    _, laf = make_fishy(datasets)
    shutil.rmtree(laf / "leftImg8bit" / "test")  # only the frames made here
    made = _laf_test_frames(laf, [(1, "png"), (2, "webp"), (3, "WEBP")])
    data = build_dataset(SPECS["FishyscapesLAF"], datasets, "test", (32, 64))
    assert [p.image for p in data.samples] == [p.absolute() for p in made]
    assert all(p.label is None for p in data.samples)
    code, out = _check(capsys, "--data", "FishyscapesLAF", "--dset_folder", str(datasets),
                       "--splits", "test")
    assert code == 0 and _split_row(out, "test")[2] == "3", out
    assert out.rstrip().endswith("OK: no problem found"), out


def test_upper_case_extensions_are_read_in_every_layout(tmp_path, capsys):
    """validation0003.JPG (AnomalyTrack), a .WEBP obstacle frame, a .PNG Fishyscapes label and
    a .JPG LostAndFound image of a Fishyscapes frame."""
    datasets = tmp_path / "datasets"
    anomaly = make_anomaly(datasets)
    make_track(datasets / "upper", "dataset_AnomalyTrack", ["validation0003"], "JPG")
    for sub in ("images/validation0003.JPG", "labels_masks/validation0003_labels_semantic.png"):
        (datasets / "upper" / "dataset_AnomalyTrack" / sub).rename(anomaly / sub)
    data = build_dataset(SPECS["RoadAnomaly21"], datasets, "validation")
    assert [p.image.name for p in data.samples] == [
        "validation0000.jpg", "validation0001.jpg", "validation0002.jpg", "validation0003.JPG"]
    code, out = _check(capsys, "--data", "RoadAnomaly21", "--dset_folder", str(datasets))
    assert _split_row(out, "validation")[2] == "4", out  # (stray label values: see item 13)

    obstacle = make_track(datasets, "dataset_ObstacleTrack", OBSTACLE_STEMS, "webp")
    (obstacle / "images" / "validation_2.webp").rename(obstacle / "images" / "validation_2.WEBP")
    data = build_dataset(SPECS["RoadObstacle21"], datasets, "validation")
    assert [p.image.name for p in data.samples] == ["validation_1.webp", "validation_2.WEBP"]

    fishy, laf = make_fishy(datasets)
    label = fishy / "labels" / "val" / f"{FISHY[0]}_fishy-labels.png"
    label.rename(label.with_suffix(".PNG"))
    image = next((laf / "leftImg8bit").rglob(f"{FISHY[1]}_leftImg8bit.png"))
    Image.open(image).save(image.with_suffix(".JPG"), format="JPEG")
    image.unlink()
    data = build_dataset(SPECS["FishyscapesLAF"], datasets, "val")
    assert sorted(p.label.name for p in data.samples) == sorted(
        [f"{FISHY[0]}_fishy-labels.PNG", f"{FISHY[1]}_fishy-labels.png"])
    assert f"{FISHY[1]}_leftImg8bit.JPG" in [p.image.name for p in data.samples]


def test_one_frame_in_two_files_is_refused_naming_both(tmp_path, capsys):
    datasets = tmp_path / "datasets"
    anomaly = make_anomaly(datasets)
    twin = shutil.copy(anomaly / "images" / "validation0001.jpg",
                       anomaly / "images" / "validation0001.JPG")
    with pytest.raises(DatasetError) as caught:
        build_dataset(SPECS["RoadAnomaly21"], datasets, "validation")
    message = str(caught.value)
    assert str(anomaly.absolute() / "images" / "validation0001.jpg") in message
    assert str(Path(twin).absolute()) in message and "keep one" in message
    code, out = _check(capsys, "--data", "RoadAnomaly21", "--dset_folder", str(datasets))
    assert code == 1 and "validation0001.jpg: 2 files of one frame (validation0001)" in out, out
    assert _split_row(out, "validation")[2] == "2", out  # the two other frames are read

    _, laf = make_fishy(datasets)
    png, webp = _laf_test_frames(laf, [(1, "png"), (1, "webp")])
    with pytest.raises(DatasetError, match="2 files of one frame") as caught:
        build_dataset(SPECS["FishyscapesLAF"], datasets, "test")
    assert str(png.absolute()) in str(caught.value) and str(webp.absolute()) in str(caught.value)
    code, out = _check(capsys, "--data", "FishyscapesLAF", "--dset_folder", str(datasets),
                       "--splits", "test")
    assert code == 1 and f"{png.name} and " in out and webp.name in out, out


def test_frames_of_other_formats_are_reported_by_check(tmp_path, capsys):
    """Images of a format the layout does not name are left out by the loader, as the official
    code leaves them, and reported by the check; hidden files are no frames."""
    datasets = tmp_path / "datasets"
    obstacle = make_track(datasets, "dataset_ObstacleTrack", OBSTACLE_STEMS, "webp", stray=False)
    other = _image(obstacle / "images" / "validation_3.png")
    _image(obstacle / "images" / "._validation_1.webp")  # macOS metadata, not an image
    (obstacle / "images" / "validation_notes.txt").write_text("not an image")
    data = build_dataset(SPECS["RoadObstacle21"], datasets, "validation")
    assert [p.image.name for p in data.samples] == ["validation_1.webp", "validation_2.webp"]
    code, out = _check(capsys, "--data", "RoadObstacle21", "--dset_folder", str(datasets))
    problems = [line.strip() for line in out.splitlines() if line.startswith("  ")]
    assert code == 1 and problems == [
        f"{other.absolute()}: left out: only .webp files are read here (in any letter case), "
        f"as the official code does"], out
    other.unlink()
    code, out = _check(capsys, "--data", "RoadObstacle21", "--dset_folder", str(datasets))
    assert code == 0, out


@pytest.fixture(scope="module")
def tiny_networks(tmp_path_factory):
    """An untrained 12-class SegNet and its observer (CamVid's classes, width 1/16), and a
    19-class SegNet (Cityscapes', for the benchmark presets)."""
    root = tmp_path_factory.mktemp("networks")
    torch.manual_seed(0)
    save_checkpoint(root / "segnet.pth", {"model": SegNet(3, 12, width_mult=0.0625).state_dict()})
    save_checkpoint(root / "obsnet" / "best.pth",
                    {"model": Obsnet_Seg(3, 1, width_mult=0.0625).state_dict()})
    save_checkpoint(root / "segnet19.pth", {"model": SegNet(3, 19, width_mult=0.0625).state_dict()})
    return root


def test_main_refuses_one_frame_in_two_files_in_one_line(tiny_networks, tmp_path):
    datasets = tmp_path / "datasets"
    anomaly = make_anomaly(datasets)
    shutil.copy(anomaly / "images" / "validation0002.jpg", anomaly / "images" / "validation0002.JPG")
    line = _one_error_line(_benchmark_run(tiny_networks, datasets, tmp_path / "logs"))
    images = anomaly.absolute() / "images"
    assert line == (f"main.py: error: {images / 'validation0002.JPG'} and "
                    f"{images / 'validation0002.jpg'}: 2 files of one frame (validation0002); "
                    f"keep one: a frame is read from one file, and its score maps are exported "
                    f"under its id"), line


def test_inference_reads_webp(tiny_networks, tmp_path, capsys):
    images = tmp_path / "images"
    _image(images / "road.webp", 40, 60)
    _image(images / "car.WEBP", 33, 50)
    out = tmp_path / "out"
    code = inference_main(["--data", "CamVid", "--segnet_file", str(tiny_networks / "segnet.pth"),
                           "--obsnet_file", str(tiny_networks / "obsnet"), "--img_folder",
                           str(images), "--out", str(out), "--width_mult", "0.0625",
                           "--size", "32", "48"])
    assert code == 0, capsys.readouterr()
    assert "left out" not in capsys.readouterr().out
    for name, shape in (("road.webp", (40, 60)), ("car.WEBP", (33, 50))):
        maps = [p for p in out.iterdir() if p.name.startswith(name) and p.suffix == ".npy"]
        assert len(maps) == 1 and np.load(maps[0]).shape == shape, sorted(out.iterdir())


# item 13: splits with nothing to score ----------------------------------------------------

def _camvid(root: Path, labels: list[np.ndarray]) -> Path:
    """A CamVid-layout ``test`` split of 32×48 frames with the given labels."""
    lines = []
    for i, label in enumerate(labels):
        _image(root / "test" / f"f{i}.png", 32, 48)
        (root / "testannot").mkdir(parents=True, exist_ok=True)
        Image.fromarray(label.astype(np.uint8)).save(root / "testannot" / f"f{i}.png")
        lines.append(f"test/f{i}.png testannot/f{i}.png")
    (root / "test.txt").write_text("\n".join(lines) + "\n")
    return root


def _camvid_run(networks: Path, data: Path, logs: Path, *extra: str):
    return main_py("--data", "CamVid", "--dset_folder", str(data), "--size", "32", "48",
                   "--width_mult", "0.0625", "--bsize", "2", "--segnet_file",
                   str(networks / "segnet.pth"), "--obsnet_file", str(networks / "obsnet"),
                   "--tboard", str(logs), "--test_only", "--test_split", "test", *extra)


def _benchmark_run(networks: Path, datasets: Path, logs: Path, *extra: str):
    return main_py("--data", "RoadAnomaly21", "--dset_folder", str(datasets), "--size", "32", "64",
                   "--width_mult", "0.0625", "--bsize", "2", "--segnet_file",
                   str(networks / "segnet19.pth"), "--obsnet_file", str(networks / "obs19"),
                   "--tboard", str(logs), "--test_only", "--test_multi", "mcp", *extra)


def _one_error_line(out) -> str:
    """The one line main.py printed (exit 1; the progress bars aside)."""
    lines = [line for line in out.stderr.splitlines() if line.startswith("main.py:")]
    assert out.returncode == 1 and len(lines) == 1 and "Traceback" not in out.stderr, \
        out.stdout + out.stderr
    assert out.stderr.rstrip().endswith(lines[0]) and "results" not in out.stdout, out.stdout
    return lines[0]


def test_all_void_split_stops_in_one_line(tiny_networks, tmp_path):
    data = _camvid(tmp_path / "camvid", [np.full((32, 48), 255)] * 3)
    logs = tmp_path / "logs"
    line = _one_error_line(_camvid_run(tiny_networks, data, logs, "--test_multi", "mcp"))
    assert line == ("main.py: error: --test_split test: nothing to score: every label pixel of "
                    "its 3 image(s) is void or ignored; nothing written")
    assert not list(logs.glob("results*"))

    datasets = tmp_path / "datasets"
    anomaly = make_anomaly(datasets)
    for label in (anomaly / "labels_masks").iterdir():
        Image.fromarray(np.full(Image.open(label).size[::-1], 255, np.uint8)).save(label)
    export = tmp_path / "export"
    line = _one_error_line(_benchmark_run(tiny_networks, datasets, logs,
                                          "--export_scores", str(export)))
    assert line == ("main.py: error: --test_split validation: nothing to score: every label "
                    "pixel of its 3 image(s) is void or ignored; nothing written")
    assert not list(logs.glob("results*"))
    assert not export.exists() or not [p for p in export.rglob("*") if p.is_file()]


def test_benchmark_without_anomaly_pixel_stops_in_one_line(tiny_networks, tmp_path):
    datasets = tmp_path / "datasets"
    anomaly = make_anomaly(datasets)
    for label in (anomaly / "labels_masks").iterdir():
        values = np.asarray(Image.open(label))
        Image.fromarray(np.where(values == 1, 0, values).astype(np.uint8)).save(label)
    logs = tmp_path / "logs"
    line = _one_error_line(_benchmark_run(tiny_networks, datasets, logs))
    assert line == ("main.py: error: --test_split validation: nothing to score: its 3 image(s) "
                    "hold no anomaly pixel (label 1), and RoadAnomaly21's metrics are all OOD "
                    "ones; nothing written")
    assert not list(logs.glob("results*"))


def test_split_without_anomaly_pixel_warns_and_scores_errors(tiny_networks, tmp_path):
    rng = np.random.default_rng(0)
    data = _camvid(tmp_path / "camvid", [rng.integers(0, 11, (32, 48)) for _ in range(2)])
    logs = tmp_path / "logs"
    out = _camvid_run(tiny_networks, data, logs, "--test_multi", "obsnet,mcp")
    assert out.returncode == 0, out.stdout + out.stderr
    warnings = [line for line in out.stderr.splitlines() if "warning" in line]
    assert warnings == ["main.py: warning: --test_split test: its 2 image(s) hold no anomaly "
                        "pixel: the OOD metrics are undefined (n/a); the error-detection "
                        "metrics are scored"], out.stderr
    header = next(line.split() for line in out.stdout.splitlines()
                  if line.lstrip().startswith("Method"))
    for line in out.stdout.splitlines():
        cells = line.split()
        if cells and cells[0] in ("obsnet", "mcp"):
            assert cells[2:8] == ["n/a"] * 6, (header, line)  # the OOD columns
    results = json.loads((logs / "results_test.json").read_text())
    assert results["pixels"] == {"scored": 2 * 32 * 48, "anomaly": 0}
    assert "ood" not in results["methods"]["mcp"] and "error" in results["methods"]["mcp"]


def test_check_reports_benchmark_mask_values(tmp_path, capsys):
    datasets = tmp_path / "datasets"
    anomaly = make_track(datasets, "dataset_AnomalyTrack", ANOMALY_STEMS, "jpg")  # stray values
    code, out = _check(capsys, "--data", "RoadAnomaly21", "--dset_folder", str(datasets))
    problems = [line.strip() for line in out.splitlines() if line.startswith("  ")]
    assert code == 1 and len(problems) == 3, out
    for stem in ANOMALY_STEMS:
        label = anomaly.absolute() / "labels_masks" / f"{stem}_labels_semantic.png"
        values = sorted(set(np.unique(np.asarray(Image.open(label))).tolist()) - {0, 1, 255})
        assert len(values) == 1
        assert (f"{anomaly.absolute()}/images/{stem}.jpg: annotation {label}: values {values[0]} "
                f"(6 pixels) are not 0 (in-distribution), 1 (anomaly) or 255 (void); the loader "
                f"reads them as void") in problems, problems
