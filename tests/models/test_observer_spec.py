"""An observer carries its spec (``ObserverSpec``): what its checkpoint records, how a command
line's request meets that record, and the segmenter and observer built and loaded separately
(``build_segmenter`` / ``build_observer`` / ``load_segmenter`` / ``load_observer``)."""
from dataclasses import replace

import pytest
import torch

from obsnet.models.checkpoint import CheckpointError, save_checkpoint, weights_fingerprint
from obsnet.models.generic import FeatureTap, LayerObserver
from obsnet.models.obsnet import Obsnet_Seg, Obsnet_Small, SegNetLayerObserver
from obsnet.models.observer_spec import (ObserverRequest, ObserverSpec, new_observer_spec,
                                         recorded_spec, resolve_observer)
from obsnet.models.registry import build_observer, build_segmenter, load_observer, load_segmenter
from tests.helpers import SHARED

NCLASS, WIDTH, SIZE = 12, 0.0625, (32, 48)
TOY = "tests.helpers.toy_segmenter:build"
# What checkpoints stored under "observer" before ObserverSpec existed (observer_record):
RECORD = {"obs_mlp": False, "no_residual": True, "no_img": False, "head": "linear",
          "model": "segnet", "layers": None, "inputs": "maps", "kind": "mirror"}


def segnet_file(tmp_path):
    """A freshly initialised SegNet checkpoint, and the SegNet loaded from it."""
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "segnet.pth", {"model": build_segmenter("segnet", NCLASS, WIDTH).state_dict()})
    return tmp_path / "segnet.pth", load_segmenter("segnet", NCLASS, WIDTH, tmp_path / "segnet.pth")


def observer_file(path, spec: ObserverSpec, segmenter, state=None):
    """An observer checkpoint as training writes it (weights, record, segmenter fingerprint);
    ``state``: what to save instead of that dict (an earlier version's, the original's)."""
    torch.manual_seed(1)
    observer = build_observer(spec, segmenter, NCLASS, WIDTH)
    weights = observer.state_dict()
    saved = {"model": weights, "observer": spec.record(),
             "segmenter": weights_fingerprint(segmenter)} if state is None else state(weights)
    save_checkpoint(path, saved)
    return observer


def scores(observer, segmenter, seed=2):
    torch.manual_seed(seed)
    x = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        return observer.eval()(x, segmenter(x, return_feat=True))


# ----------------------------------------------------------------------------- the record

def test_record_is_the_checkpoint_format_and_round_trips(tmp_path):
    spec = ObserverSpec(**RECORD)
    assert spec.record() == RECORD
    assert [type(v) for v in spec.record().values()] == [type(v) for v in RECORD.values()]
    generic = ObserverSpec(TOY, layers=("stem", "mid"))
    assert generic.record()["layers"] == ["stem", "mid"]  # a list, as before
    for each in (spec, generic, ObserverSpec("segnet", kind="layer", head="original")):
        save_checkpoint(tmp_path / "obs.pth", {"model": {}, "observer": each.record()})
        assert recorded_spec(tmp_path / "obs.pth") == each
        assert resolve_observer(tmp_path / "obs.pth", each) == each  # a resolved spec passes


def test_new_observer_spec_defaults_and_request():
    assert new_observer_spec(ObserverRequest(), "segnet") == ObserverSpec(
        "segnet", kind="mirror", head="linear", inputs="features")
    asked = ObserverRequest(model="x", kind="layer", head="original", inputs="logits",
                            layers=("a",), no_img=True)
    spec = new_observer_spec(asked, "segnet")
    assert (spec.model, spec.kind, spec.head, spec.inputs, spec.layers, spec.no_img) == \
        ("segnet", "layer", "original", "logits", ("a",), True)


@pytest.mark.parametrize("request_,words", [
    (ObserverRequest(no_img=True), "trained without --no_img; drop --no_img"),
    (ObserverRequest(obs_mlp=True), "trained without --obs_mlp; drop --obs_mlp"),
    (ObserverRequest(head="original"), "has the linear head, not --obs_head original"),
    (ObserverRequest(inputs="logits"), "has --obs_inputs maps, not --obs_inputs logits"),
    (ObserverRequest(kind="layer"), "has --obs_kind mirror, not --obs_kind layer"),
    (ObserverRequest(model="deeplabv3plus"), "trained with --model segnet, not --model deeplabv3plus"),
    (ObserverRequest(layers=("a",)), "reads --observe_layers its model's default; drop --observe_layers"),
])
def test_a_contradicting_request_is_one_line_naming_the_flag(tmp_path, request_, words):
    save_checkpoint(tmp_path / "obs.pth", {"model": {}, "observer": RECORD})
    with pytest.raises(CheckpointError) as caught:
        resolve_observer(tmp_path / "obs.pth", request_)
    message = str(caught.value)
    assert words in message and "\n" not in message and message.startswith(str(tmp_path / "obs.pth"))


def test_the_request_agreeing_with_the_record_is_accepted(tmp_path):
    save_checkpoint(tmp_path / "obs.pth", {"model": {}, "observer": RECORD})
    same = ObserverRequest(model="segnet", head="linear", inputs="maps", kind="mirror",
                           no_residual=True)
    assert resolve_observer(tmp_path / "obs.pth", same) == ObserverSpec(**RECORD)
    assert resolve_observer(tmp_path / "obs.pth", ObserverRequest()) == ObserverSpec(**RECORD)


# ----------------------------------------------------------------------------- load_observer

def test_load_observer_of_this_version(tmp_path):
    path, segnet = segnet_file(tmp_path)
    spec = ObserverSpec("segnet", inputs="maps")
    saved = observer_file(tmp_path / "obs.pth", spec, segnet)
    observer, loaded = load_observer(tmp_path / "obs.pth", ObserverRequest(model="segnet"), segnet,
                                     NCLASS, WIDTH, segnet_where=f"--segnet_file {path}")
    assert loaded == spec and type(observer) is Obsnet_Seg
    assert all(torch.equal(v, observer.state_dict()[k]) for k, v in saved.state_dict().items())
    assert torch.equal(scores(observer, segnet), scores(saved, segnet))


def test_load_observer_of_an_earlier_version(tmp_path):
    """Earlier checkpoints record the flags only (no model, head, inputs, kind, layers): the
    original head, features, mirror; the command line's model."""
    _, segnet = segnet_file(tmp_path)
    flags = {"obs_mlp": False, "no_residual": False, "no_img": False}
    saved = observer_file(tmp_path / "obs.pth", ObserverSpec("segnet", head="original"), segnet,
                          state=lambda weights: {"model": weights, "observer": flags})
    observer, spec = load_observer(tmp_path / "obs.pth", ObserverRequest(model="segnet"), segnet,
                                   NCLASS, WIDTH)
    assert spec == ObserverSpec("segnet", kind="mirror", head="original", inputs="features")
    assert torch.equal(scores(observer, segnet), scores(saved, segnet))


def test_load_observer_of_an_original_plain_state_dict(tmp_path):
    """The original's observer files are the bare state_dict: the original head (its ReLU'd
    last channel), unless the request names another."""
    _, segnet = segnet_file(tmp_path)
    saved = observer_file(tmp_path / "obs.pth", ObserverSpec("segnet", head="original"), segnet,
                          state=lambda weights: weights)
    observer, spec = load_observer(tmp_path / "obs.pth", ObserverRequest(model="segnet"), segnet,
                                   NCLASS, WIDTH)
    assert spec.head == "original" and spec.record()["head"] == "original"
    assert torch.equal(scores(observer, segnet), scores(saved, segnet))
    linear, spec = load_observer(tmp_path / "obs.pth", ObserverRequest(model="segnet", head="linear"),
                                 segnet, NCLASS, WIDTH)
    assert spec.head == "linear" and not torch.equal(scores(linear, segnet), scores(saved, segnet))


def test_load_observer_of_a_generic_model_with_recorded_layers(tmp_path):
    """resolve_observer gives the recorded layers, the segmenter is built with them, and the
    resolved spec loads the observer; a segmenter observing other layers is refused."""
    torch.manual_seed(0)
    tap = build_segmenter(TOY, NCLASS, WIDTH, layers=("stem", "mid"), probe_size=SIZE)
    save_checkpoint(tmp_path / "seg.pth", {"model": tap.state_dict()})
    tap = load_segmenter(TOY, NCLASS, WIDTH, tmp_path / "seg.pth", probe_size=SIZE,
                         layers=("stem", "mid"))
    saved = observer_file(tmp_path / "obs.pth", ObserverSpec(TOY, layers=("stem", "mid")), tap)
    spec = resolve_observer(tmp_path / "obs.pth", ObserverRequest(model=TOY))
    assert spec.layers == ("stem", "mid")
    segmenter = load_segmenter(TOY, NCLASS, WIDTH, tmp_path / "seg.pth", layers=spec.layers,
                               probe_size=SIZE)
    assert isinstance(segmenter, FeatureTap) and segmenter.channels[-1] == NCLASS
    observer, loaded = load_observer(tmp_path / "obs.pth", spec, segmenter, NCLASS, WIDTH)
    assert loaded == spec and isinstance(observer, LayerObserver)
    assert torch.equal(scores(observer, segmenter), scores(saved, tap))
    default = load_segmenter(TOY, NCLASS, WIDTH, tmp_path / "seg.pth", probe_size=SIZE)
    with pytest.raises(CheckpointError, match="reads --observe_layers stem,mid, and the segmenter "
                                              "observes stem,down,mid,head"):
        load_observer(tmp_path / "obs.pth", spec, default, NCLASS, WIDTH)


@pytest.mark.parametrize("ablation", ["no_residual", "no_img"])
def test_an_ablated_observer_runs_its_ablation(tmp_path, ablation):
    """The ablation recorded in the checkpoint reaches forward: the loaded observer scores as
    an observer built with it, and otherwise than the same weights without it."""
    _, segnet = segnet_file(tmp_path)
    spec = ObserverSpec("segnet", **{ablation: True})
    saved = observer_file(tmp_path / "obs.pth", spec, segnet)
    saved.up1.conv2.cbr_unit[1].bias.data.fill_(1.0)  # a fresh observer may score flat
    save_checkpoint(tmp_path / "obs.pth", {"model": saved.state_dict(), "observer": spec.record()})
    observer, loaded = load_observer(tmp_path / "obs.pth", ObserverRequest(model="segnet"), segnet,
                                     NCLASS, WIDTH)
    assert getattr(loaded, ablation) and getattr(observer, ablation)
    plain = build_observer(replace(spec, **{ablation: False}), segnet, NCLASS, WIDTH)
    plain.load_state_dict(saved.state_dict())
    ablated = scores(observer, segnet)
    assert torch.equal(ablated, scores(saved, segnet))
    assert not torch.allclose(ablated, scores(plain, segnet))


def test_the_light_observer_takes_no_ablation():
    segnet = build_segmenter("segnet", NCLASS, WIDTH)
    with pytest.raises(ValueError, match="--obs_mlp with --no_img"):
        build_observer(ObserverSpec("segnet", obs_mlp=True, no_img=True), segnet, NCLASS, WIDTH)
    assert not hasattr(build_observer(ObserverSpec("segnet", obs_mlp=True), segnet, NCLASS, WIDTH),
                       "no_residual")


def test_missing_segnet_file_says_how_to_train_one(tmp_path):
    with pytest.raises(CheckpointError, match=r"--segnet_file .*none.pth: file not found \(train "
                                              r"one with --train_segnet\)"):
        load_segmenter("segnet", NCLASS, WIDTH, tmp_path / "none.pth")
    with pytest.raises(CheckpointError, match=r"--ensemble member .*none.pth: file not found$"):
        load_segmenter("segnet", NCLASS, WIDTH, tmp_path / "none.pth", label="--ensemble member")


# ----------------------------------------------------------------------------- state_dict keys

# (spec, observer class, state_dict tensors, segmenter tensors) as build_models gave them before
# the segmenter and the observer were built separately (measured at commit 495b582).
KEY_COUNTS = [
    (ObserverSpec("segnet"), Obsnet_Seg, 184, 182),
    (ObserverSpec("segnet", obs_mlp=True), Obsnet_Small, 51, 182),
    (ObserverSpec("segnet", kind="layer"), SegNetLayerObserver, 50, 182),
    (ObserverSpec("segnet", inputs="maps"), Obsnet_Seg, 189, 182),
    (ObserverSpec("segnet", kind="layer", inputs="logits"), SegNetLayerObserver, 57, 182),
    (ObserverSpec(TOY), LayerObserver, 56, 20),
    (ObserverSpec(TOY, inputs="maps"), LayerObserver, 63, 20),
]


@pytest.mark.parametrize("spec,cls,observer_keys,segmenter_keys", KEY_COUNTS)
def test_separate_builders_keep_the_state_dict_keys(spec, cls, observer_keys, segmenter_keys):
    width = 0.25 if spec.model == TOY else WIDTH
    segmenter = build_segmenter(spec.model, NCLASS, width, probe_size=(32, 32))
    observer = build_observer(spec, segmenter, NCLASS, width)
    assert type(observer) is cls
    assert (len(observer.state_dict()), len(segmenter.state_dict())) == (observer_keys, segmenter_keys)
    ablated = build_observer(replace(spec, no_img=not spec.obs_mlp), segmenter, NCLASS, width)
    assert ablated.state_dict().keys() == observer.state_dict().keys()  # not buffers


@pytest.mark.parametrize("name,spec", [("Obsnet_Seg", ObserverSpec("segnet")),
                                       ("Obsnet_Small", ObserverSpec("segnet", obs_mlp=True))])
def test_separate_builders_give_the_originals_keys(name, spec):
    path = SHARED / "reference" / f"{name}_keys.txt"
    if not path.is_file():
        pytest.skip(f"{path} absent: the original's key lists live in ../shared/reference")
    expected = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, shape = line.split()
            expected[key] = () if shape == "scalar" else tuple(int(s) for s in shape.split("x"))
    segmenter = build_segmenter("segnet", NCLASS, 1.0)
    for ablated in (spec, replace(spec, no_residual=not spec.obs_mlp)):
        state = build_observer(ablated, segmenter, NCLASS, 1.0).state_dict()
        assert {k: tuple(v.shape) for k, v in state.items()} == expected
