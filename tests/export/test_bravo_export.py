"""--data BRAVO and --export_bravo end to end through main.py: the submission tree and file
formats the BRAVO toolkit's encoder reads, refusals, and the run's BRAVO metrics recomputed from
the exported 16-bit files on a labelled split (tests/helpers/bravo_reference.py)."""
import json

import numpy as np
import pytest
from PIL import Image

from obsnet.data.bravo import BRAVO
from tests.helpers import bravo_reference as ref
from tests.helpers.bravo import FRAMES, make_bravo, submission_name
from tests.helpers.cityscapes import train_cityscapes_pair
from tests.helpers.runner import main_py

H, W = 32, 64
METHODS = ("obsnet", "mcp")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny Cityscapes SegNet and observer (one epoch each), and its generated data."""
    root = tmp_path_factory.mktemp("bravo")
    cs, common = train_cityscapes_pair(root, (H, W))
    return root, cs, common


def test_reader_lists_every_subset_and_one_by_name(tmp_path):
    make_bravo(tmp_path)
    _, pairs = BRAVO.read_pairs(tmp_path, "all")
    assert sorted(str(p.image.relative_to(tmp_path)) for p in pairs) == sorted(FRAMES)
    assert all(p.label is None for p in pairs)
    _, acdc = BRAVO.read_pairs(tmp_path, "ACDC")
    assert len(acdc) == 2


def test_bravo_export_tree_formats_and_refusal(trained, tmp_path):
    root, _, common = trained
    data, export = make_bravo(tmp_path / "bravo"), tmp_path / "submission"
    run = ["--data", "BRAVO", "--dset_folder", str(data), *common, "--test_only",
           "--test_multi", ",".join(METHODS), "--export_bravo", str(export)]
    out = main_py(*run, "--tboard", str(tmp_path / "logs"))
    assert out.returncode == 0, out.stdout + out.stderr
    for method in METHODS:
        written = sorted(str(p.relative_to(export / method))
                         for p in (export / method).rglob("*") if p.is_file())
        assert written == sorted(submission_name(f, k) for f in FRAMES for k in ("pred", "conf"))
        for rel, size in FRAMES.items():
            pred = Image.open(export / method / submission_name(rel, "pred"))
            conf = Image.open(export / method / submission_name(rel, "conf"))
            assert pred.mode == "L" and conf.mode in ("I;16", "I;16B", "I")
            assert pred.size == conf.size == (size[1], size[0])  # the image's own size
            assert np.asarray(pred).max() <= 18
            assert np.asarray(conf).dtype == np.uint16 or np.asarray(conf).max() <= 65535
    before = (export / "mcp" / submission_name(next(iter(FRAMES)), "conf")).read_bytes()
    again = main_py(*run, "--tboard", str(tmp_path / "logs2"))
    lines = again.stderr.strip().splitlines()
    assert again.returncode == 2 and len(lines) == 1 and "--export_bravo" in lines[0], again.stderr
    assert "--overwrite" in lines[0]
    assert (export / "mcp" / submission_name(next(iter(FRAMES)), "conf")).read_bytes() == before
    forced = main_py(*run, "--tboard", str(tmp_path / "logs3"), "--overwrite")
    assert forced.returncode == 0, forced.stdout + forced.stderr


def test_metrics_of_a_labelled_split_match_its_exported_files(trained, tmp_path):
    """Cityscapes val: the run's ``bravo`` block against the toolkit's formulas rewritten pixel by
    pixel, from the exported _pred.png / _conf.png and the label files. At --size the files'
    own (64×128): the labels the run scores are the files' (a resized split would differ)."""
    _, cs, common = trained
    export, native = tmp_path / "export", ["--size", "64", "128"]
    out = main_py("--data", "Cityscapes", "--dset_folder", str(cs), *common, *native,
                  "--test_only",
                  "--test_multi", ",".join(METHODS), "--export_bravo", str(export),
                  "--tboard", str(tmp_path / "logs"))
    assert out.returncode == 0, out.stdout + out.stderr
    results = json.loads((tmp_path / "logs" / "results_val.json").read_text())
    labels_dir = cs / "gtFine" / "val"
    for method in METHODS:
        levels, pred, labels = [], [], []
        for conf_file in sorted((export / method).rglob("*_conf.png")):
            stem = conf_file.name[:-len("_leftImg8bit_conf.png")]
            city = conf_file.parent.name
            levels.append(np.asarray(Image.open(conf_file)).astype(np.int64).ravel())
            pred.append(np.asarray(Image.open(str(conf_file).replace("_conf", "_pred"))).ravel())
            labels.append(np.asarray(Image.open(
                labels_dir / city / f"{stem}_gtFine_labelTrainIds.png")).ravel())
        levels, pred, labels = (np.concatenate(a).astype(np.int64) for a in (levels, pred, labels))
        assert levels.size > 0
        valid = labels != 255
        want = ref.all_metrics(levels, pred, labels, valid, np.zeros_like(valid), 19)
        got = results["methods"][method]["bravo"]
        for key in ("miou_valid", "ece_valid", "auroc_valid", "auprc_success_valid",
                    "auprc_error_valid", "fpr95_valid", "semantic_hmean"):
            assert got[key] == pytest.approx(want[key], abs=1e-4), (method, key)


def test_bravo_refuses_a_segmenter_of_other_classes(tmp_path):
    make_bravo(tmp_path / "bravo")
    out = main_py("--data", "BRAVO", "--dset_folder", str(tmp_path / "bravo"), "--test_only",
                  "--nclass", "12", "--segnet_file", str(tmp_path / "none.pth"),
                  "--tboard", str(tmp_path / "logs"), "--test_multi", "mcp")
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and "19" in lines[0], out.stderr


def _one_image_export(tmp_path, root):
    from types import SimpleNamespace

    from obsnet.bravo_export import BravoExport
    from obsnet.methods import MethodConfig
    data = tmp_path / "data" / "bravo_ACDC" / "night"
    data.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 12, 3), np.uint8)).save(data / "a.png")
    pairs = [SimpleNamespace(image=data / "a.png", label=None)]
    return BravoExport(root, ["mcp"], tmp_path / "data", pairs, MethodConfig())


def test_export_files_appear_only_when_finished_and_a_failed_write_leaves_none(tmp_path,
                                                                                monkeypatch):
    import torch

    from obsnet import bravo_export
    export = _one_image_export(tmp_path, tmp_path / "out")
    export.add_scores("mcp", torch.rand(1, 8, 12))
    export.add_pred(torch.zeros(1, 8, 12, dtype=torch.long))
    final = tmp_path / "out" / "mcp" / "bravo_ACDC" / "night" / "a_conf.png"
    assert not final.exists()  # aside until the table is out
    assert export.finish() and final.is_file()
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mcp"]  # no temporary folder left

    def full_disk(path, array):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(bravo_export, "write_png", full_disk)
    failed = _one_image_export(tmp_path / "again", tmp_path / "out2")
    failed.add_scores("mcp", torch.rand(1, 8, 12))
    failed.add_pred(torch.zeros(1, 8, 12, dtype=torch.long))  # the pass goes on
    with pytest.raises(OSError, match="No space left"):
        failed.finish()
    assert list((tmp_path / "out2").iterdir()) == []


def test_a_linked_subset_folder_keeps_its_place_in_the_tree(tmp_path):
    from obsnet.bravo_export import frame_files
    store = tmp_path / "store" / "ACDC" / "night"
    store.mkdir(parents=True)
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "bravo_ACDC").symlink_to(tmp_path / "store" / "ACDC")
    pred, _ = frame_files(tmp_path / "out", "obsnet", tmp_path / "ds",
                          tmp_path / "ds" / "bravo_ACDC" / "night" / "a.png")
    assert pred == tmp_path / "out" / "obsnet" / "bravo_ACDC" / "night" / "a_pred.png"
