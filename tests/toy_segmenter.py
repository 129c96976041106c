"""Tiny user segmenters for ``--model tests.toy_segmenter:<factory>`` (tests/test_generic.py).

Each factory builds a network of a few thousand weights that takes B×3×H×W images; ``build``
and ``build_dict`` are valid segmenters, the others each have one flaw a test looks at.
"""
from collections import OrderedDict

import torch
import torch.nn as nn

NCLASS = 12  # what build_dict() gives (it takes no num_classes): Synthetic's classes
WIDTH = 8


def _block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU())


def build(num_classes: int) -> nn.Sequential:
    """stem, a stride-2 step, a middle block, 1×1 logits at half resolution, 2× upsampling:
    B×num_classes×H×W logits (H and W even)."""
    return nn.Sequential(OrderedDict(
        stem=_block(3, WIDTH), down=_block(WIDTH, 2 * WIDTH, stride=2),
        mid=_block(2 * WIDTH, 2 * WIDTH), head=nn.Conv2d(2 * WIDTH, num_classes, 1),
        up=nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)))


class DictSegmenter(nn.Module):
    """Answers as torchvision's models do: ``{"out": logits}``, NCLASS classes."""

    def __init__(self):
        super().__init__()
        self.body = _block(3, WIDTH)
        self.classifier = nn.Conv2d(WIDTH, NCLASS, 1)

    def forward(self, x):
        return {"out": self.classifier(self.body(x))}


def build_dict() -> DictSegmenter:
    """A factory without ``num_classes``: always NCLASS classes."""
    return DictSegmenter()


class Gated(nn.Module):
    """``summary`` gives a B×C vector (not a map), which gates the features."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.features = _block(3, WIDTH)
        self.summary = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Conv2d(WIDTH, num_classes, 1)

    def forward(self, x):
        f = self.features(x)
        return self.head(f * torch.sigmoid(self.summary(f))[:, :, None, None])


def gated(num_classes: int) -> Gated:
    return Gated(num_classes)


class WithUnused(DictSegmenter):
    """A layer (``spare``) that forward never calls."""

    def __init__(self):
        super().__init__()
        self.spare = nn.Conv2d(3, WIDTH, 1)


def with_unused() -> WithUnused:
    return WithUnused()


class WithNetChild(nn.Module):
    """A network whose first layer is called ``net`` (so its state_dict keys start "net.")."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.net = _block(3, WIDTH)
        self.head = nn.Conv2d(WIDTH, num_classes, 1)

    def forward(self, x):
        return self.head(self.net(x))


def with_net_child(num_classes: int) -> WithNetChild:
    return WithNetChild(num_classes)


def not_a_module(num_classes: int) -> dict:
    """A factory that returns no network."""
    return {"num_classes": num_classes}


def broken(num_classes):
    """A factory that fails, as user code may."""
    raise TypeError(f"cannot build {num_classes} classes")
