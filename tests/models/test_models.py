"""SegNet / ObsNet shapes, checkpoint compatibility with the original, initialisation."""
import pytest
import torch

from obsnet.models.checkpoint import CheckpointError, load_weights, model_state, save_checkpoint
from obsnet.models.obsnet import Obsnet_Seg, Obsnet_Small
from obsnet.models.registry import init_from_segnet
from obsnet.models.segnet import SegNet
from tests.helpers import SHARED

REFERENCE = SHARED / "reference"


def reference_state(name: str) -> dict:
    """A random state_dict with the original checkpoint's keys and shapes."""
    path = REFERENCE / f"{name}_keys.txt"
    if not path.is_file():
        pytest.skip(f"{path} absent: the original's key lists live in ../shared/reference")
    state = {}
    for line in path.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape = line.split()
        if shape == "scalar":
            state[key] = torch.tensor(7)
        else:
            state[key] = torch.randn(*(int(s) for s in shape.split("x")))
    return state


@pytest.mark.parametrize("name,build", [
    ("SegNet", lambda: SegNet(3, 12)),
    ("Obsnet_Seg", lambda: Obsnet_Seg(3, 1)),
    ("Obsnet_Small", lambda: Obsnet_Small(512, 1)),
])
def test_original_checkpoint_loads_strictly(name, build, tmp_path):
    state = reference_state(name)
    model = build()
    assert list(model.state_dict()) == list(state)
    path = tmp_path / "original.pth"
    torch.save({f"module.{k}": v for k, v in state.items()}, path)  # DataParallel-style keys
    load_weights(model, path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_segnet_shapes_and_features():
    net = SegNet(3, 12, width_mult=0.125).eval()
    x = torch.randn(2, 3, 70, 90)  # not divisible by 32: unpooling restores every size
    feats = net(x, return_feat=True)
    assert len(feats) == 10
    assert feats[-1].shape == (2, 12, 70, 90)
    assert feats[0].shape == (2, 8, 35, 45) and feats[4].shape[1] == 64
    assert torch.equal(net(x), feats[-1])


def test_mc_dropout_is_random_only_when_asked():
    net = SegNet(3, 5, width_mult=0.125).eval()
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(net(x), net(x))
    assert not torch.equal(net(x, mc_drop=True), net(x, mc_drop=True))
    assert not net.training


@pytest.mark.parametrize("cls", [Obsnet_Seg, Obsnet_Small])
def test_observer_output_and_ablations(cls):
    seg = SegNet(3, 4, width_mult=0.125).eval()
    obs = cls(3, 1, width_mult=0.125).eval()
    obs.up1.conv2.cbr_unit[1].bias.data.fill_(1.0)  # a fresh 1-channel ReLU is often all zero
    x = torch.randn(2, 3, 64, 96)
    feats = seg(x, return_feat=True)
    out = obs(x, feats)
    assert out.shape == (2, 1, 64, 96)
    if cls is Obsnet_Seg:  # an ablated twin with the same weights scores otherwise
        for ablation in ("no_residual", "no_img"):
            twin = cls(3, 1, width_mult=0.125, **{ablation: True}).eval()
            twin.load_state_dict(obs.state_dict())
            assert getattr(twin, ablation) and not getattr(obs, ablation)
            assert not torch.allclose(out, twin(x, feats)), ablation


def test_observer_starts_from_segnet_weights():
    seg, obs = SegNet(3, 12, width_mult=0.125), Obsnet_Seg(3, 1, width_mult=0.125)
    copied = init_from_segnet(obs, seg)
    seg_state, obs_state = seg.state_dict(), obs.state_dict()
    same = [k for k in obs_state if k in seg_state and obs_state[k].shape == seg_state[k].shape]
    assert copied == len(same) > 100
    assert all(torch.equal(obs_state[k], seg_state[k]) for k in same)
    assert not torch.equal(obs_state["up1.conv2.cbr_unit.0.weight"][:1],
                           seg_state["up1.conv2.cbr_unit.0.weight"][:1])


def test_full_checkpoint_roundtrip_and_mismatch(tmp_path):
    net = SegNet(3, 6, width_mult=0.125)
    path = tmp_path / "ckpt" / "segnet.pth"
    save_checkpoint(path, {"model": net.state_dict(), "epoch": 3})
    other = SegNet(3, 6, width_mult=0.125)
    assert load_weights(other, path)["epoch"] == 3
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), other.state_dict().values()))
    assert [p.name for p in path.parent.iterdir()] == ["segnet.pth"]  # no temporary left over
    with pytest.raises(CheckpointError, match="segnet.pth.*does not fit"):
        load_weights(SegNet(3, 7, width_mult=0.125), path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cannot be loaded"):
        load_weights(other, path)
    assert model_state({"a": 1}) == {"a": 1}
