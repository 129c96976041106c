"""DeepLabv3+ and its observer, backbone weight files, VGG16 initialisation of the SegNet."""
import logging
import urllib.error

import pytest
import torch
from torchvision.models import resnet18, resnet101, vgg16
from torchvision.models._api import WeightsEnum

from obsnet.models.checkpoint import CheckpointError
from obsnet.models.deeplabv3plus import DeepLabV3Plus, Obsnet_DeepLab, load_resnet101_backbone
from obsnet.models.obsnet import Obsnet_Seg
from obsnet.models.observer_spec import ObserverSpec
from obsnet.models.registry import build_observer, build_segmenter
from obsnet.models.segnet import VGG16_CONVS, SegNet, init_encoder_from_vgg16

NCLASS = 5


@pytest.fixture(scope="module")
def deeplab():
    torch.manual_seed(0)
    return DeepLabV3Plus(3, NCLASS).eval()


@pytest.fixture(scope="module")
def image_and_feats(deeplab):
    torch.manual_seed(1)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        return x, deeplab(x, return_feat=True)


def test_shapes_feature_list_and_output_stride(deeplab, image_and_feats):
    x, feats = image_and_feats
    assert len(feats) == len(DeepLabV3Plus.FEATURES) == 7
    channels = [f.shape[1] for f in feats]
    assert channels == [256, 512, 1024, 2048, 256, 256, NCLASS]
    assert feats[-1].shape == (1, NCLASS, 64, 64)  # logits last, at the input size
    assert feats[0].shape[-2:] == (16, 16) and feats[5].shape[-2:] == (16, 16)  # 1/4
    assert feats[3].shape[-2:] == (4, 4)  # layer4 at output stride 16 (dilated, not 1/32)
    with torch.no_grad():
        assert torch.equal(deeplab(x), feats[-1])
        assert deeplab(torch.randn(1, 3, 70, 90)).shape == (1, NCLASS, 70, 90)


def test_mc_dropout_is_random_only_when_asked(deeplab, image_and_feats):
    x, feats = image_and_feats
    with torch.no_grad():
        assert torch.equal(deeplab(x), feats[-1])  # eval: deterministic
        assert not torch.equal(deeplab(x, mc_drop=True), deeplab(x, mc_drop=True))
    assert not deeplab.training


def test_observer_output_ablations_and_gradients(image_and_feats):
    x, feats = image_and_feats
    obs = Obsnet_DeepLab(3, 1, width_mult=0.25).eval()
    out = obs(x, feats)
    assert out.shape == (1, 1, 64, 64)
    for ablation in ("no_residual", "no_img"):  # an ablated twin, same weights
        twin = Obsnet_DeepLab(3, 1, width_mult=0.25, **{ablation: True}).eval()
        twin.load_state_dict(obs.state_dict())
        assert not torch.allclose(out, twin(x, feats)), ablation
    assert torch.equal(out, obs(x, feats))
    assert not torch.equal(obs(x, feats, mc_drop=True), obs(x, feats, mc_drop=True))
    obs.train()
    obs(x, feats).mean().backward()  # batch 1 trains (no 1x1 batch norm)
    assert all(p.grad is not None for p in obs.parameters())
    with pytest.raises(ValueError, match="7 feature maps"):
        obs(x, feats[:-1])


def test_random_init_message_and_training_batch_one(caplog):
    with caplog.at_level(logging.INFO, logger="obsnet"):
        net = DeepLabV3Plus(3, 3)
    assert "randomly initialised" in caplog.text
    out = net.train()(torch.randn(1, 3, 64, 64))  # image pooling has no batch norm
    assert out.shape == (1, 3, 64, 64)
    with pytest.raises(ValueError, match="width_mult"):
        DeepLabV3Plus(3, 3, width_mult=0.5)


def test_backbone_weights_from_file(tmp_path, caplog):
    reference = resnet101()  # a full torchvision state_dict: fc.* is ignored
    path = tmp_path / "resnet101.pth"
    torch.save(reference.state_dict(), path)
    with caplog.at_level(logging.INFO, logger="obsnet"):
        net = DeepLabV3Plus(3, NCLASS, backbone_weights=str(path))
    assert str(path) in caplog.text
    expected = {k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    loaded = net.backbone.state_dict()
    assert list(loaded) == list(expected)
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())
    # the {"state_dict": ...} form (other trainers' checkpoints) loads too
    other = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in expected.items()}
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": other, "epoch": 90}, wrapped)
    assert load_resnet101_backbone(net.backbone, wrapped) == str(wrapped)
    assert torch.equal(net.backbone.conv1.weight, other["conv1.weight"])


def test_wrong_backbone_file_names_it(tmp_path, deeplab):
    wrong = tmp_path / "resnet18.pth"
    torch.save(resnet18().state_dict(), wrong)
    before = deeplab.backbone.conv1.weight.clone()
    with pytest.raises(CheckpointError, match=r"resnet18\.pth.*ResNet-101"):
        load_resnet101_backbone(deeplab.backbone, wrong)
    assert torch.equal(deeplab.backbone.conv1.weight, before)  # nothing half-loaded
    with pytest.raises(CheckpointError, match="missing.pth.*not found"):
        DeepLabV3Plus(3, NCLASS, backbone_weights=tmp_path / "missing.pth")


def test_imagenet_without_network_says_to_pass_a_file(monkeypatch, deeplab):
    def offline(self, *args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", offline)
    with pytest.raises(CheckpointError, match="--backbone_weights PATH"):
        load_resnet101_backbone(deeplab.backbone, "imagenet")


def test_build_segmenter_and_observer_registry():
    seg = build_segmenter("deeplabv3plus", NCLASS, 1.0)
    obs = build_observer(ObserverSpec("deeplabv3plus"), seg, NCLASS, 1.0)
    assert isinstance(seg, DeepLabV3Plus) and isinstance(obs, Obsnet_DeepLab)
    assert seg.classifier.out_channels == NCLASS
    with pytest.raises(ValueError, match="--obs_mlp"):
        build_observer(ObserverSpec("deeplabv3plus", obs_mlp=True), seg, NCLASS, 1.0)
    with pytest.raises(ValueError, match="unknown"):
        build_segmenter("unet", NCLASS, 1.0)
    seg = build_segmenter("segnet", NCLASS, 0.125)
    obs = build_observer(ObserverSpec("segnet"), seg, NCLASS, 0.125)
    assert isinstance(seg, SegNet) and isinstance(obs, Obsnet_Seg)


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    torch.manual_seed(2)
    state = vgg16().state_dict()  # features.* and classifier.*
    path = tmp_path_factory.mktemp("vgg") / "vgg16.pth"
    torch.save(state, path)
    return path, state


def test_vgg16_initialises_the_13_encoder_convolutions(vgg_file, caplog):
    path, state = vgg_file
    with caplog.at_level(logging.INFO, logger="obsnet"):
        net = SegNet(3, NCLASS, vgg_weights=str(path))
    assert "13 convolutions" in caplog.text
    convs = [k for k in state if k.startswith("features.") and state[k].dim() == 4]
    assert len(convs) == len(VGG16_CONVS) == 13
    for key, name in zip(convs, VGG16_CONVS):
        conv = net.get_submodule(name).cbr_unit[0]
        assert torch.equal(conv.weight, state[key]), name
        assert torch.equal(conv.bias, state[key.replace("weight", "bias")]), name
    fresh = SegNet(3, NCLASS)
    assert init_encoder_from_vgg16(fresh, path) == 13
    assert torch.equal(fresh.down5.conv3.cbr_unit[0].weight, state["features.28.weight"])
    seg = build_segmenter("segnet", NCLASS, 1.0, backbone_weights=path)
    assert torch.equal(seg.down1.conv1.cbr_unit[0].weight, state["features.0.weight"])


def test_vgg16_errors(vgg_file, tmp_path):
    path, _ = vgg_file
    narrow = SegNet(3, NCLASS, width_mult=0.5)
    before = narrow.down1.conv1.cbr_unit[0].weight.clone()
    with pytest.raises(CheckpointError, match=r"vgg16\.pth.*width_mult 1\.0"):
        init_encoder_from_vgg16(narrow, path)
    assert torch.equal(narrow.down1.conv1.cbr_unit[0].weight, before)
    wrong = tmp_path / "resnet18.pth"
    torch.save(resnet18().state_dict(), wrong)
    with pytest.raises(CheckpointError, match=r"resnet18\.pth.*not a torchvision VGG16"):
        init_encoder_from_vgg16(SegNet(3, NCLASS, width_mult=0.125), wrong)
    with pytest.raises(ValueError, match="--vgg_weights PATH"):
        SegNet(3, NCLASS, init_vgg=True)
