"""The segmenter's preset recorded in its checkpoint, adopted by the evaluation-only benchmarks."""
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from obsnet.data.specs import SPECS
from obsnet.errors import UsageError
from obsnet.preset import adopt_segmenter_preset, preset_of, recorded_preset


def _given(segnet_file, **given):
    """The command line's values, as ``adopt_segmenter_preset`` reads them."""
    base = dict(segnet_file=str(segnet_file), model="segnet", width_mult=1.0, nclass=None,
                size=None)
    return base | given


def _adopted(given: dict, adopted: dict) -> SimpleNamespace:
    """The flags after adoption, as the command line applies them."""
    return SimpleNamespace(**(given | adopted))


def test_record_names_classes_normalisation_and_size():
    record = preset_of("Synthetic", "segnet", 0.25, 14, (32, 48))
    spec = SPECS["Synthetic"]
    assert record["nclass"] == 14 and record["size"] == [32, 48] and record["width_mult"] == 0.25
    assert record["class_names"] == [*spec.class_names, "class 12", "class 13"]
    assert record["mean"] == list(spec.mean) and record["std"] == list(spec.std)


def test_benchmark_adopts_a_camvid_segmenter(tmp_path):
    path = tmp_path / "segnet.pth"
    torch.save({"model": {}, "preset": preset_of("Synthetic", "segnet", 0.0625, 12, (32, 48))}, path)
    given = _given(path)
    spec, adopted = adopt_segmenter_preset(given, SPECS["RoadAnomaly21"], frozenset())
    args = _adopted(given, adopted)
    assert (args.model, args.width_mult, args.nclass, args.size) == ("segnet", 0.0625, 12, (32, 48))
    assert spec.mean == SPECS["Synthetic"].mean and spec.std == SPECS["Synthetic"].std
    assert spec.class_names == SPECS["Synthetic"].class_names and spec.test_only
    # anomaly / inlier ids right after the segmenter's classes; a colour for each id
    assert spec.anomaly_ids == (12,) and spec.inlier_id == 13 and len(spec.colors) == 14
    assert spec.test_split == "validation" and spec.name == "RoadAnomaly21"
    sized = _given(path, size=(64, 96))  # --size given: kept
    _, adopted = adopt_segmenter_preset(sized, SPECS["FishyscapesLAF"], frozenset({"size"}))
    assert _adopted(sized, adopted).size == (64, 96)


def test_contradicting_flag_is_refused_and_plain_weights_change_nothing(tmp_path):
    path = tmp_path / "segnet.pth"
    torch.save({"model": {}, "preset": preset_of("Cityscapes", "segnet", 0.0625, 19, (64, 128))},
               path)
    with pytest.raises(UsageError, match=r"--width_mult 0.5: .* trained with --width_mult 0.0625"):
        adopt_segmenter_preset(_given(path, width_mult=0.5), SPECS["RoadObstacle21"],
                               frozenset({"width_mult"}))
    same = _given(path, width_mult=0.0625)
    spec, adopted = adopt_segmenter_preset(same, SPECS["RoadObstacle21"], frozenset({"width_mult"}))
    # a Cityscapes segmenter: the default benchmark spec, at the segmenter's size
    assert spec == replace(SPECS["RoadObstacle21"], size=(64, 128))
    assert _adopted(same, adopted).size == (64, 128)
    plain = tmp_path / "plain.pth"
    torch.save({"conv.weight": torch.zeros(1)}, plain)
    spec, adopted = adopt_segmenter_preset(_given(plain), SPECS["RoadAnomaly21"])
    assert spec is SPECS["RoadAnomaly21"]
    args = _adopted(_given(plain), adopted)
    assert args.width_mult == 1.0 and args.size is None
    missing = _given(tmp_path / "none.pth")  # not there yet: the stage says so later
    assert adopt_segmenter_preset(missing, SPECS["RoadAnomaly21"]) == (SPECS["RoadAnomaly21"], {})


def test_checkpoint_of_an_earlier_version_is_read_from_its_args(tmp_path):
    path = tmp_path / "segnet.pth"
    torch.save({"model": {}, "args": {"data": "CamVid", "nclass": 12, "model": "segnet",
                                      "width_mult": 0.25, "size": [90, 120]}}, path)
    assert recorded_preset(path) == preset_of("CamVid", "segnet", 0.25, 12, (90, 120))
    torch.save({"model": {}}, path)
    assert recorded_preset(path) is None
