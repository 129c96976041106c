"""Tiny user segmenters for ``--model tests.helpers.toy_segmenter:<factory>``
(tests/models/test_generic.py).

Each factory builds a network of a few thousand weights that takes B×3×H×W images; ``build``
and ``build_dict`` are valid segmenters, the others each have one flaw a test looks at (those
under "flawed factories": tests/models/test_generic.py through main.py,
tests/api/test_api_inputs.py through the Python API).
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


# ----------------------------------------------------------------------------- flawed factories

class DictWithoutOut(nn.Module):
    """Answers a dict, as torchvision's models do, but names its logits "logits", not "out"."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.body = _block(3, WIDTH)
        self.head = nn.Conv2d(WIDTH, num_classes, 1)

    def forward(self, x):
        return {"logits": self.head(self.body(x)), "aux": x}


def dict_without_out(num_classes: int) -> DictWithoutOut:
    return DictWithoutOut(num_classes)


class InPlaceInput(nn.Module):
    """Changes its input in place (``x.clamp_``) before segmenting it."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.body = _block(3, WIDTH)
        self.head = nn.Conv2d(WIDTH, num_classes, 1)

    def forward(self, x):
        x.clamp_(-3.0, 3.0)
        return self.head(self.body(x))


def in_place_input(num_classes: int) -> InPlaceInput:
    return InPlaceInput(num_classes)


def half(num_classes: int) -> nn.Sequential:
    """A valid segmenter in half precision (float16 weights)."""
    return build(num_classes).half()


class FixedSize(nn.Module):
    """Adds a learned position map of a fixed size (32×48, the tests' --size): other image
    sizes fail inside forward."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.body = _block(3, WIDTH)
        self.position = nn.Parameter(torch.zeros(1, WIDTH, 32, 48))
        self.head = nn.Conv2d(WIDTH, num_classes, 1)

    def forward(self, x):
        return self.head(self.body(x) + self.position)


def fixed_size(num_classes: int) -> FixedSize:
    return FixedSize(num_classes)


def scripted(num_classes: int) -> torch.jit.ScriptModule:
    """A valid segmenter compiled with TorchScript (torch.jit.script)."""
    return torch.jit.script(build(num_classes))


def traced(num_classes: int) -> torch.jit.ScriptModule:
    """A valid segmenter traced with TorchScript (torch.jit.trace, at 32×48)."""
    return torch.jit.trace(build(num_classes).eval(), torch.rand(1, 3, 32, 48))


class Classifier(nn.Module):
    """An image classifier: B×C scores, no map."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.body = _block(3, WIDTH)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(WIDTH, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.body(x)))


def classifier(num_classes: int) -> Classifier:
    return Classifier(num_classes)


def nan_output(num_classes: int) -> nn.Sequential:
    """A segmenter whose weights hold NaN (as a bad initialisation or a diverged load gives)."""
    net = build(num_classes)
    with torch.no_grad():
        net.head.weight.fill_(float("nan"))
    return net
