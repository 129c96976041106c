"""DeepLabv3+ (Chen et al., ECCV 2018) with a ResNet-101 backbone, and its observer.

``DeepLabV3Plus(x, return_feat=True)`` returns the 7 maps of ``DeepLabV3Plus.FEATURES``
(logits last), the interface every uncertainty method and the observer rely on.
"""
import logging
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models import ResNet101_Weights, resnet101

from obsnet.models.blocks import ConvBNReLU, conv_bn_relu, resize, scaled, shared_dropout
from obsnet.models.checkpoint import CheckpointError, torchvision_state

LOG = logging.getLogger(__name__)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: a 1x1 branch, three dilated 3x3 branches, image pooling.

    The image-pooling branch has no batch norm (a 1x1 map per image would make training with
    batch size 1 fail); the five branches are concatenated and projected to ``out_channels``.
    """

    def __init__(self, in_channels: int, out_channels: int = 256, rates=(6, 12, 18)):
        super().__init__()
        self.branches = nn.ModuleList([conv_bn_relu(in_channels, out_channels)] + [
            conv_bn_relu(in_channels, out_channels, 3, rate) for rate in rates])
        self.pooling = nn.Sequential(nn.AdaptiveAvgPool2d(1),
                                     nn.Conv2d(in_channels, out_channels, 1), nn.ReLU(inplace=True))
        self.project = conv_bn_relu(out_channels * (len(rates) + 2), out_channels)

    def forward(self, x):
        pooled = self.pooling(x).expand(-1, -1, *x.shape[-2:])
        return self.project(torch.cat([branch(x) for branch in self.branches] + [pooled], dim=1))


class DeepLabV3Plus(nn.Module):
    """DeepLabv3+: ResNet-101 at output stride 16, ASPP (rates 6/12/18 + image pooling, 256
    channels), and a decoder fusing a 48-channel projection of the 1/4-resolution layer1 map.

    Args:
        input_channels: image channels (3 for pretrained backbones).
        output_channels: number of classes.
        backbone_weights: None (random init, says so), "imagenet" (torchvision's
            ``ResNet101_Weights.IMAGENET1K_V2``, downloaded) or a torchvision ResNet-101
            state_dict file (``fc.*`` ignored; strict on every other key).
        width_mult: only 1.0 (the backbone has a fixed width); anything else is rejected.

    Dropout (active in training, or in eval with ``mc_drop=True``): 0.5 after ASPP, 0.5 and
    0.1 after the two decoder convolutions.
    """

    # return_feat=True: these maps, in this order (channels, resolution for an H×W input)
    FEATURES = ("layer1",   # 256, H/4   ResNet stage 1 (also the decoder's low-level input)
                "layer2",   # 512, H/8
                "layer3",   # 1024, H/16
                "layer4",   # 2048, H/16 (dilated: output stride 16)
                "aspp",     # 256, H/16
                "decoder",  # 256, H/4   fused decoder output
                "logits")   # output_channels, H (upsampled to the input size)
    DROPOUT = {"aspp": 0.5, "decoder1": 0.5, "decoder2": 0.1}

    def __init__(self, input_channels: int = 3, output_channels: int = 12,
                 backbone_weights=None, width_mult: float = 1.0):
        super().__init__()
        if width_mult != 1.0:
            raise ValueError(f"DeepLabV3Plus: --width_mult {width_mult} is not supported (the "
                             f"ResNet-101 backbone has a fixed width); use --width_mult 1.0")
        self.in_channels, self.n_classes = input_channels, output_channels
        self.backbone = resnet101(weights=None, replace_stride_with_dilation=[False, False, True])
        self.backbone.fc = nn.Identity()  # classification head unused: no fc.* keys
        if input_channels != 3:
            self.backbone.conv1 = nn.Conv2d(input_channels, 64, 7, stride=2, padding=3, bias=False)
        self.aspp = ASPP(2048, 256, rates=(6, 12, 18))
        self.low_level = conv_bn_relu(256, 48)
        self.decoder1 = conv_bn_relu(256 + 48, 256, 3)
        self.decoder2 = conv_bn_relu(256, 256, 3)
        self.classifier = nn.Conv2d(256, output_channels, 1)
        if backbone_weights is None:
            LOG.info("DeepLabV3Plus: ResNet-101 backbone randomly initialised "
                     "(--backbone_weights imagenet|PATH to start from ImageNet weights)")
        else:
            source = load_resnet101_backbone(self.backbone, backbone_weights)
            LOG.info(f"DeepLabV3Plus: ResNet-101 backbone loaded from {source}")

    def _drop(self, name, x, mc_drop):
        return shared_dropout(x, self.DROPOUT[name], self.training, mc_drop)

    def forward(self, x, mc_drop: bool = False, return_feat: bool = False):
        """Class logits B×C×H×W at the input size, or the 7 maps of ``FEATURES`` (logits last).

        ``mc_drop``: keep dropout active in eval mode (Monte Carlo dropout).
        """
        size, b = x.shape[-2:], self.backbone
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        layer1 = b.layer1(x)
        layer2 = b.layer2(layer1)
        layer3 = b.layer3(layer2)
        layer4 = b.layer4(layer3)
        aspp = self.aspp(layer4)
        y = resize(self._drop("aspp", aspp, mc_drop), layer1.shape[-2:])
        y = self.decoder1(torch.cat([y, self.low_level(layer1)], dim=1))
        decoder = self.decoder2(self._drop("decoder1", y, mc_drop))
        logits = resize(self.classifier(self._drop("decoder2", decoder, mc_drop)), size)
        if not return_feat:
            return logits
        return [layer1, layer2, layer3, layer4, aspp, decoder, logits]


def load_resnet101_backbone(backbone: nn.Module, weights) -> str:
    """Load ``weights`` ("imagenet" or a torchvision ResNet-101 state_dict file) into
    ``backbone`` (a torchvision ResNet-101 with ``fc`` removed); return where they came from.

    Strict on every backbone key, ``fc.*`` ignored; nothing is loaded unless every key and
    shape fits (a ``CheckpointError`` names the file otherwise).
    """

    state, source = torchvision_state(weights, ResNet101_Weights.IMAGENET1K_V2, "ResNet-101")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    target = backbone.state_dict()
    problems = [f"missing {k}" for k in target if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in target]
    problems += [f"{k}: {tuple(getattr(state[k], 'shape', ()))} instead of {tuple(v.shape)}"
                 for k, v in target.items() if k in state
                 and tuple(getattr(state[k], "shape", ())) != tuple(v.shape)]
    if problems:
        more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise CheckpointError(f"{source}: not a torchvision ResNet-101 state_dict that fits the "
                              f"DeepLabV3Plus backbone ({'; '.join(problems[:3])}{more})")
    backbone.load_state_dict(state, strict=True)
    return source


class Obsnet_DeepLab(nn.Module):  # noqa: N801  (named like the original's observers)
    """The observer of DeepLabV3Plus: a small image encoder-decoder (``ConvBNReLU`` blocks)
    into which the segmenter's maps are added, projected by 1x1 conv + BN, where the
    resolutions match:

        1/4:  layer1, decoder     1/8:  layer2     1/16: layer3, layer4, aspp

    plus, at full resolution, two class-agnostic maps of the segmenter's logits (max softmax
    probability, entropy / log C). Returns one logit per pixel (B×1×H×W), higher = the
    segmenter is more likely wrong. ``no_residual`` ignores every segmenter map, ``no_img``
    replaces the image by zeros (ablations: plain attributes, not in the state_dict).
    """

    PROJECTED = {"layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048, "aspp": 256,
                 "decoder": 256}  # DeepLabV3Plus.FEATURES[:6] and their channels
    ADDED_AT = {"down2": ("layer1", "decoder"), "down3": ("layer2",),
                "down4": ("layer3", "layer4", "aspp")}
    DROPOUT = 0.1  # on the 1/16 bottleneck

    def __init__(self, input_channels: int = 3, output_channels: int = 1, width_mult: float = 1.0,
                 no_residual: bool = False, no_img: bool = False):
        super().__init__()
        self.no_residual, self.no_img = no_residual, no_img
        c32, c64, c128, c256 = (scaled(c, width_mult) for c in (32, 64, 128, 256))
        widths = {"down2": c128, "down3": c256, "down4": c256}
        self.stem = ConvBNReLU(input_channels, c32)  # H
        self.down1 = ConvBNReLU(c32, c64)  # H/2 (each downN: 2x2 max-pool then conv)
        self.down2 = ConvBNReLU(c64, c128)  # H/4
        self.down3 = ConvBNReLU(c128, c256)  # H/8
        self.down4 = ConvBNReLU(c256, c256)  # H/16
        self.proj = nn.ModuleDict({
            name: nn.Sequential(nn.Conv2d(self.PROJECTED[name], widths[stage], 1, bias=False),
                                nn.BatchNorm2d(widths[stage]))
            for stage, names in self.ADDED_AT.items() for name in names})
        self.up3 = ConvBNReLU(c256, c128)  # H/8: upsampled down4 + down3
        self.up2 = ConvBNReLU(c128, c64)  # H/4: upsampled up3 + down2
        self.head = nn.Sequential(ConvBNReLU(c64 + c32 + 2, c32),  # H: up2, stem, logit maps
                                  nn.Conv2d(c32, output_channels, 1))

    def forward(self, x, feat, mc_drop: bool = False):
        """``feat``: DeepLabV3Plus's 7 maps (``DeepLabV3Plus.FEATURES``, logits last)."""
        if len(feat) != len(self.PROJECTED) + 1:
            raise ValueError(f"Obsnet_DeepLab: expects DeepLabV3Plus's {len(self.PROJECTED) + 1} "
                             f"feature maps, got {len(feat)}")
        maps = dict(zip(self.PROJECTED, feat))
        if self.no_img:
            x = torch.zeros_like(x)
        s0 = self.stem(x)
        y, skips = self.down1(F.max_pool2d(s0, 2, ceil_mode=True)), {}
        for stage in ("down2", "down3", "down4"):
            y = getattr(self, stage)(F.max_pool2d(y, 2, ceil_mode=True))
            if not self.no_residual:
                for name in self.ADDED_AT[stage]:
                    y = y + resize(self.proj[name](maps[name]), y.shape[-2:])
            skips[stage] = y
        y = shared_dropout(y, self.DROPOUT, self.training, mc_drop)
        y = self.up3(resize(y, skips["down3"].shape[-2:]) + skips["down3"])
        y = self.up2(resize(y, skips["down2"].shape[-2:]) + skips["down2"])
        logits = feat[-1].float()
        if self.no_residual:
            summary = torch.zeros_like(s0[:, :2])
        else:
            prob = torch.softmax(logits, dim=1)
            entropy = -(prob * torch.log_softmax(logits, dim=1)).sum(dim=1, keepdim=True)
            entropy = entropy / math.log(max(logits.shape[1], 2))
            summary = resize(torch.cat([prob.amax(dim=1, keepdim=True), entropy], dim=1),
                             s0.shape[-2:]).to(s0.dtype)
        return self.head(torch.cat([resize(y, s0.shape[-2:]), s0, summary], dim=1))
