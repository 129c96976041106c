"""--export_scores: score maps in the SegmentMeIfYouCan evaluator's layout (HDF5 ``value``)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from obsnet.errors import UsageError
from obsnet.score_export import (IDENTITY, LOG1P, apply_mapping, choose_mapping, frame_target,
                                 write_score_map)
from tests.helpers.runner import main_py
from tests.helpers.cityscapes import H, W, make_cityscapes, train_cityscapes_pair
from tests.helpers.smiyc import (ANOMALY_STEMS, FISHY, OBSTACLE_STEMS, make_anomaly, make_fishy, make_track,
                        mcp_reference)

h5py = pytest.importorskip("h5py")


def read_value(path: Path):
    with h5py.File(path, "r") as f:
        value = f["value"]
        return value[:], value.compression, value.attrs["mapping"]


def test_writer_round_trip_is_the_float16_map(tmp_path):
    rng = np.random.default_rng(0)
    score = rng.normal(0, 100, (37, 53)).astype(np.float32)
    path = tmp_path / "anomaly_p" / "m" / "AnomalyTrack-all" / "validation0001.hdf5"
    write_score_map(path, score)
    value, compression, mapping = read_value(path)
    assert value.dtype == np.float16 and value.shape == (37, 53)
    assert compression == "gzip" and mapping == IDENTITY
    np.testing.assert_array_equal(value, score.astype(np.float16))
    assert [p.name for p in path.parent.iterdir()] == ["validation0001.hdf5"]  # no temporary left


def test_mapping_beyond_float16_keeps_the_ranking():
    rng = np.random.default_rng(1)
    magnitudes = np.geomspace(1e-2, 1e6, 200)
    score = (rng.permutation(np.concatenate([magnitudes, -magnitudes]))).astype(np.float32)
    assert choose_mapping([score[:10], score]) == LOG1P
    assert choose_mapping([np.array([1.0, -6e4, np.inf], np.float32)]) == IDENTITY
    mapped = apply_mapping(score, LOG1P)
    assert np.isfinite(mapped).all()
    np.testing.assert_array_equal(np.argsort(mapped, kind="stable"), np.argsort(score, kind="stable"))
    # and never reverses two scores, even when float16 ties them
    dense = np.sort(rng.uniform(-1e6, 1e6, 10_000).astype(np.float32))
    assert (np.diff(apply_mapping(dense, LOG1P).astype(np.float64)) >= 0).all()


def test_frame_targets():
    assert frame_target("RoadAnomaly21", Path("x/images/validation0001.jpg")) == \
        ("AnomalyTrack-all", "validation0001")
    assert frame_target("RoadObstacle21", Path("x/images/validation_2.webp")) == \
        ("ObstacleTrack-all", "validation_2")
    laf = Path("laf/leftImg8bit/test/04_Maurener_Weg_8/04_Maurener_Weg_8_000000_000030_leftImg8bit.png")
    assert frame_target("FishyscapesLAF", laf) == ("LostAndFound-test", "04_Maurener_Weg_8_000000_000030")


def test_export_refused_for_other_data(tmp_path):
    out = main_py("--data", "Synthetic", "--dset_folder", str(tmp_path / "syn"), "--test_only",
                  "--export_scores", str(tmp_path / "export"), "--tboard", str(tmp_path / "logs"))
    assert out.returncode == 2, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "--export_scores" in lines[0] and "Synthetic" in lines[0], out.stderr
    assert not (tmp_path / "export").exists()


def test_cli_export_layout_round_trip_and_refusal(tmp_path):
    cs, common = train_cityscapes_pair(tmp_path, (H, W))
    datasets = tmp_path / "datasets"
    track = make_anomaly(datasets)
    export = tmp_path / "export"
    run = ["--data", "RoadAnomaly21", "--dset_folder", str(datasets), *common,
           "--tboard", str(tmp_path / "logs"), "--test_only", "--test_multi", "obsnet,mcp",
           "--export_scores", str(export)]
    out = main_py(*run)
    assert out.returncode == 0, out.stdout + out.stderr
    results = json.loads((tmp_path / "logs" / "results_validation.json").read_text())
    mcp_maps, _ = mcp_reference(tmp_path / "segnet.pth", datasets)
    for method in ("obsnet", "mcp"):
        folder = export / "anomaly_p" / method / "AnomalyTrack-all"
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            [f"{s}.hdf5" for s in ANOMALY_STEMS] + ["mapping.txt"])
        assert folder.joinpath("mapping.txt").read_text().split("\n")[0] == IDENTITY
        scores, truth = [], []
        for stem in sorted(ANOMALY_STEMS):
            value, compression, mapping = read_value(folder / f"{stem}.hdf5")
            label = np.asarray(Image.open(track / "labels_masks" / f"{stem}_labels_semantic.png"))
            assert label.shape != (H, W)  # written at the frame's size, not at --size
            assert value.dtype == np.float16 and value.shape == label.shape
            assert compression == "gzip" and mapping == IDENTITY
            if method == "mcp":  # float16 of the map upsampled here with PIL (within 1 step)
                reference = mcp_maps[sorted(ANOMALY_STEMS).index(stem)]
                step = np.spacing(reference.astype(np.float16)).astype(np.float32)
                assert (np.abs(value.astype(np.float32) - reference) <= step).all()
            keep = (label == 0) | (label == 1)
            scores.append(value[keep].astype(np.float64))
            truth.append(label[keep] == 1)
        auroc = roc_auc_score(np.concatenate(truth), np.concatenate(scores))
        print(f"{method}: AUROC of the files {auroc:.6f}, results_validation.json "
              f"{results['methods'][method]['ood']['auroc']:.6f}")
        if method == "obsnet":  # spread-out scores: float16's rounding changes nothing
            assert abs(auroc - results["methods"][method]["ood"]["auroc"]) <= 1e-3, auroc
    before = (export / "anomaly_p" / "mcp" / "AnomalyTrack-all" / "validation0000.hdf5").stat()
    # into another --tboard: the results files of the same one would be refused first
    rerun = [str(tmp_path / "logs2") if a == str(tmp_path / "logs") else a for a in run]
    out = main_py(*rerun)  # the same DIR again, without --overwrite: refused before any work
    assert out.returncode == 2, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "--overwrite" in lines[0] and str(export) in lines[0], out.stderr
    after = (export / "anomaly_p" / "mcp" / "AnomalyTrack-all" / "validation0000.hdf5").stat()
    assert after.st_mtime_ns == before.st_mtime_ns
    out = main_py(*run, "--overwrite")
    assert out.returncode == 0, out.stdout + out.stderr


def tiny_cityscapes_segnet(tmp_path: Path) -> Path:
    """A 1-epoch SegNet trained on generated Cityscapes folders (its checkpoint records its preset)."""
    cs = make_cityscapes(tmp_path / "cs")
    out = main_py("--data", "Cityscapes", "--dset_folder", str(cs), "--size", str(H), str(W),
                  "--width_mult", "0.0625", "--bsize", "2", "--epoch", "1", "--seed", "0",
                  "--segnet_file", str(tmp_path / "segnet.pth"), "--tboard", str(tmp_path / "cl"),
                  "--train_segnet")
    assert out.returncode == 0, out.stdout + out.stderr
    return tmp_path / "segnet.pth"


def test_cli_obstacle_and_fishyscapes_export_under_the_official_names(tmp_path):
    """RoadObstacle21 and FishyscapesLAF through the CLI, with --segnet_file alone (its preset):
    the split's frames, components, and files named as the official evaluator reads them."""
    segnet = tiny_cityscapes_segnet(tmp_path)
    datasets = tmp_path / "datasets"
    obstacle = make_track(datasets, "dataset_ObstacleTrack", OBSTACLE_STEMS, "webp")
    fishy, laf = make_fishy(datasets)
    cases = (("RoadObstacle21", "validation", {"ObstacleTrack-all": ["validation_1", "validation_2"]}),
             ("FishyscapesLAF", "val", {"LostAndFound-train": [FISHY[0]], "LostAndFound-test": [FISHY[1]]}))
    for name, split, expected in cases:
        export, logs = tmp_path / f"export_{name}", tmp_path / f"logs_{name}"
        out = main_py("--data", name, "--dset_folder", str(datasets), "--segnet_file", str(segnet),
                      "--bsize", "2", "--tboard", str(logs),
                      "--test_only", "--test_multi", "mcp,entropy", "--export_scores", str(export))
        assert out.returncode == 0, out.stdout + out.stderr
        results = json.loads((logs / f"results_{split}.json").read_text())
        n_frames = sum(len(v) for v in expected.values())
        assert results["split"] == split and results["n_images"] == n_frames
        for method in ("mcp", "entropy"):
            assert set(results["methods"][method]["components"]) == {"siou", "ppv", "mean_f1",
                                                                     "threshold"}
            for dset, fids in expected.items():
                folder = export / "anomaly_p" / method / dset
                assert sorted(p.name for p in folder.iterdir()) == sorted(
                    [f"{f}.hdf5" for f in fids] + ["mapping.txt"])
                for fid in fids:
                    value, _, _ = read_value(folder / f"{fid}.hdf5")
                    label = (obstacle / "labels_masks" / f"{fid}_labels_semantic.png"
                             if name == "RoadObstacle21"
                             else fishy / "labels" / "val" / f"{fid}_fishy-labels.png")
                    assert value.shape == np.asarray(Image.open(label)).shape


def test_cli_test_splits_export_without_labels_and_keep_the_results(tmp_path):
    """The test frames (labels hidden): nothing scored, no results file written (a labelled
    run's kept), every file at the image's resolution under the name the leaderboard reads."""
    segnet = tiny_cityscapes_segnet(tmp_path)
    datasets = tmp_path / "datasets"
    obstacle = make_track(datasets, "dataset_ObstacleTrack", OBSTACLE_STEMS, "webp")
    _, laf = make_fishy(datasets)
    Image.fromarray(np.zeros((70, 90, 3), np.uint8)).save(obstacle / "images" / "gravel_0001.webp")
    Image.fromarray(np.zeros((50, 60, 3), np.uint8)).save(obstacle / "images" / "driveway_0001.webp")
    anomaly = make_anomaly(datasets)  # its test frame: images/cow0000.jpg, 8x8
    laf_test = laf / "leftImg8bit/test/01_Hanns_Klemm_Str_45" / f"{FISHY[1]}_leftImg8bit.png"
    cases = (("RoadObstacle21", "ObstacleTrack-all", obstacle / "images" / "gravel_0001.webp"),
             ("RoadAnomaly21", "AnomalyTrack-all", anomaly / "images" / "cow0000.jpg"),
             ("FishyscapesLAF", "LostAndFound-test", laf_test))
    for name, dset, image in cases:
        export, logs = tmp_path / f"test_export_{name}", tmp_path / f"test_logs_{name}"
        logs.mkdir()
        (logs / "results_validation.json").write_text("{}")  # a labelled run's, kept
        out = main_py("--data", name, "--dset_folder", str(datasets), "--segnet_file", str(segnet),
                      "--tboard", str(logs), "--test_only", "--test_split", "test",
                      "--test_multi", "mcp", "--export_scores", str(export))
        assert out.returncode == 0, out.stdout + out.stderr
        assert "nothing scored; results_test.json and results_test.csv not written" in out.stdout
        assert (logs / "results_validation.json").read_text() == "{}"
        assert not (logs / "results_test.json").exists() and not (logs / "results_test.csv").exists()
        fid = image.stem[: -len("_leftImg8bit")] if name == "FishyscapesLAF" else image.stem
        folder = export / "anomaly_p" / "mcp" / dset
        assert sorted(p.name for p in folder.iterdir()) == [f"{fid}.hdf5", "mapping.txt"]
        value, _, _ = read_value(folder / f"{fid}.hdf5")
        with Image.open(image) as im:
            assert value.shape == (im.height, im.width) and np.isfinite(value).all()
        assert [p.name for p in export.iterdir()] == ["anomaly_p"]  # the temporary folder is gone


def test_score_export_temporary_folder_is_its_own_and_removed(tmp_path):
    from obsnet.data.base import Pair
    from obsnet.score_export import ScoreExport

    root = tmp_path / "export"
    root.mkdir()
    (root / "notes.txt").write_text("the user's")
    image = tmp_path / "validation0001.jpg"
    Image.fromarray(np.zeros((12, 20, 3), np.uint8)).save(image)
    export = ScoreExport(root, "RoadAnomaly21", ["mcp"], [Pair(image, None, str(image))])
    export.add("mcp", torch.arange(24, dtype=torch.float32).reshape(1, 4, 6))
    assert export.tmp.parent == root and len(list(export.tmp.iterdir())) == 1
    files = export.finish()
    export.discard()
    assert sorted(p.name for p in root.iterdir()) == ["anomaly_p", "notes.txt"]
    assert (root / "notes.txt").read_text() == "the user's" and len(files) == 2
    value, _, _ = read_value(root / "anomaly_p/mcp/AnomalyTrack-all/validation0001.hdf5")
    assert value.shape == (12, 20)  # the image's size: no label file
    incomplete = ScoreExport(root, "RoadAnomaly21", ["mcp"], [Pair(image, None, str(image))] * 2)
    incomplete.add("mcp", torch.zeros(1, 4, 6))
    with pytest.raises(RuntimeError, match="1 maps for 2 frames"):
        incomplete.finish()
    incomplete.discard()
    assert sorted(p.name for p in root.iterdir()) == ["anomaly_p", "notes.txt"]
    # another frame into the same folder with another mapping: refused before writing
    other = tmp_path / "validation0002.jpg"
    Image.fromarray(np.zeros((12, 20, 3), np.uint8)).save(other)
    huge = ScoreExport(root, "RoadAnomaly21", ["mcp"], [Pair(other, None, str(other))])
    huge.add("mcp", torch.full((1, 4, 6), 1e6))
    with pytest.raises(UsageError, match="1 frame.* written with identity, these scores need sign"):
        huge.finish()
    huge.discard()
    assert not (root / "anomaly_p/mcp/AnomalyTrack-all/validation0002.hdf5").exists()
