"""Observe any segmentation network: torchvision's, or one the user's own factory builds.

``--model torchvision:<name>`` builds one of ``torchvision.models.segmentation``'s networks;
``--model package.module:factory`` calls ``factory(num_classes=...)`` (or ``factory()`` when it
takes no ``num_classes``), which returns an ``nn.Module`` whose output is B×C×H×W logits or
torchvision's ``{"out": logits}``. ``FeatureTap`` wraps the network so that it answers like this
project's SegNet (``return_feat=True`` gives the observed maps, logits last; ``mc_drop=True``
keeps its dropout layers active), and ``LayerObserver`` is the observer that reads those maps.
"""
import importlib
import inspect
import os
import sys
from collections.abc import Mapping, Sequence
from contextlib import contextmanager

import torch
import torch.nn as nn
from torchvision import models as tv_models

from obsnet.models.blocks import conv_bn_relu, resize, scaled, shared_dropout
from obsnet.models.checkpoint import CheckpointError, torchvision_state

TORCHVISION = "torchvision:"
# The observed layers of torchvision's segmentation models, by backbone family: the backbone's
# stages from 1/4 resolution down (module names, as named_modules() and, for module outputs,
# torchvision.models.feature_extraction.get_graph_node_names list them).
FAMILY_LAYERS = {
    "resnet": ("backbone.layer1", "backbone.layer2", "backbone.layer3", "backbone.layer4"),
    "mobilenet_v3": ("backbone.3", "backbone.6", "backbone.12", "backbone.16"),
}
PROBE_SIDE = 64  # the image side of the one forward pass that finds the observed maps' channels


def is_generic(model: str) -> bool:
    """True for ``torchvision:<name>`` and ``package.module:factory`` model specs."""
    return ":" in model


def torchvision_segmenters() -> list[str]:
    """The names of torchvision's segmentation model builders."""
    return sorted(tv_models.list_models(module=tv_models.segmentation))


def resolve_factory(model: str):
    """The callable that builds ``model`` (a generic spec); ValueError naming --model if it
    cannot be found or imported."""
    if model.startswith(TORCHVISION):
        name = model[len(TORCHVISION):]
        if name not in torchvision_segmenters():
            raise ValueError(f"--model {model}: not one of torchvision's segmentation models "
                             f"({', '.join(torchvision_segmenters())})")
        return tv_models.get_model_builder(name)
    module_name, _, attr = model.partition(":")
    if not module_name or not attr:
        raise ValueError(f"--model {model}: expected torchvision:<name> or package.module:factory")
    if os.getcwd() not in sys.path:  # as `python -m` would, also for the `obsnet` script
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # the user's module may fail in any way while importing
        raise ValueError(f"--model {model}: cannot import {module_name} "
                         f"({type(exc).__name__}: {exc})") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"--model {model}: {module_name} has no callable {attr}")
    return factory


def family_layers(net: nn.Module) -> tuple[str, ...] | None:
    """The observed layers of the first family in ``FAMILY_LAYERS`` whose layer names all
    exist in ``net`` (torchvision's segmentation models, and networks built on their
    backbones), or None."""
    names = {name for name, _ in net.named_modules()}
    return next((layers for layers in FAMILY_LAYERS.values() if names.issuperset(layers)), None)


def build_network(model: str, nclass: int, backbone_weights=None) -> nn.Module:
    """The network of a generic spec with ``nclass`` outputs; ``backbone_weights`` ("imagenet"
    or a torchvision classification state_dict file) initialises a torchvision model's
    backbone."""
    factory = resolve_factory(model)
    if model.startswith(TORCHVISION):
        net = factory(weights=None, weights_backbone=None, num_classes=nclass)
        if backbone_weights:
            load_backbone(net, model[len(TORCHVISION):].split("_", 1)[1], backbone_weights)
        return net
    if backbone_weights:
        raise ValueError(f"--backbone_weights is for torchvision models; --model {model}'s "
                         f"factory loads its own weights")
    takes_nclass = "num_classes" in inspect.signature(factory).parameters
    try:
        net = factory(num_classes=nclass) if takes_nclass else factory()
    except Exception as exc:  # the user's code may fail in any way
        raise ValueError(f"--model {model}: the factory failed ({type(exc).__name__}: "
                         f"{exc})") from None
    if not isinstance(net, nn.Module):
        raise ValueError(f"--model {model}: the factory returned a {type(net).__name__}, "
                         f"not a torch.nn.Module")
    return net


def load_backbone(net: nn.Module, backbone: str, source) -> None:
    """Copy a torchvision classification network's weights (``backbone``, e.g. "resnet50")
    into a segmentation model's backbone; ``source``: "imagenet" or a state_dict file."""
    # V1: the ImageNet weights torchvision's own segmentation models were trained from
    weights = tv_models.get_model_weights(backbone)["IMAGENET1K_V1"]
    state, where = torchvision_state(source, weights, backbone)
    state = {k.removeprefix("features."): v for k, v in state.items()}
    target = net.backbone.state_dict()
    missing = [k for k, v in target.items() if k not in state or state[k].shape != v.shape]
    if missing:
        raise CheckpointError(f"{where}: not a torchvision {backbone} state_dict (e.g. no "
                              f"{missing[0]} of shape {tuple(target[missing[0]].shape)})")
    net.backbone.load_state_dict({k: state[k] for k in target})


@contextmanager
def active_dropout(net: nn.Module, active: bool):
    """Keep ``net``'s dropout layers in training mode inside the block when ``active``."""
    layers = [m for m in net.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    modes = [m.training for m in layers]
    for m in layers:
        m.train(m.training or active)
    try:
        yield
    finally:
        for m, mode in zip(layers, modes):
            m.train(mode)


def logits_of(output) -> torch.Tensor:
    """The class logits of a network's output: a tensor, a list of maps (logits last, this
    project's ``return_feat=True``) or a dict with ``"out"`` (torchvision's)."""
    if isinstance(output, Mapping):
        return output["out"]
    if isinstance(output, (list, tuple)):
        return output[-1]
    return output


class FeatureTap(nn.Module):
    """A segmentation network that answers like this project's SegNet.

    ``tap(x)`` returns the logits (resized to the image when the network returns them
    smaller); ``tap(x, return_feat=True)`` the outputs of ``layers`` (module names), then the
    logits; ``mc_drop=True`` keeps the network's dropout layers active (Monte Carlo dropout).
    Its state_dict is the network's own (no prefix), so a user's checkpoint loads as it is.
    Observed maps are copies (an in-place activation after a layer cannot change them), and
    ``fold_batchnorm`` leaves observed layers alone (they have forward hooks).
    """

    def __init__(self, net: nn.Module, layers: Sequence[str], spec: str):
        super().__init__()
        self.net, self.spec = net, spec
        self.layers = tuple(dict.fromkeys(layers))
        names = {name for name, _ in net.named_modules() if name}
        unknown = [name for name in self.layers if name not in names]
        if unknown:
            examples = ", ".join(name for name, _ in net.named_children())
            raise ValueError(f"--observe_layers {','.join(unknown)}: not a layer of --model {spec} "
                             f"(module names, e.g. {examples})")
        self.has_dropout = any(isinstance(m, nn.modules.dropout._DropoutNd) for m in net.modules())
        self._maps, self._hooked = {}, {}
        self.register_state_dict_post_hook(_drop_net_prefix)
        self.register_load_state_dict_pre_hook(_add_net_prefix)

    def _attach(self) -> None:
        """Hook each observed layer; again when a layer was replaced (fold_batchnorm)."""
        for name in self.layers:
            module = self.net.get_submodule(name)
            hooked = self._hooked.get(name)
            if hooked is None or hooked[0] is not module:
                if hooked is not None:
                    hooked[1].remove()
                handle = module.register_forward_hook(
                    lambda _m, _i, out, name=name: self._maps.__setitem__(name, _kept(out)))
                self._hooked[name] = (module, handle)

    def forward(self, x, mc_drop: bool = False, return_feat: bool = False):
        self._attach()
        self._maps.clear()
        with active_dropout(self.net, mc_drop):
            logits = resize(logits_of(self.net(x)), x.shape[-2:])
        maps, self._maps = self._maps, {}
        if not return_feat:
            return logits
        unused = [name for name in self.layers if name not in maps]
        if unused:
            raise ValueError(f"--observe_layers {','.join(unused)}: --model {self.spec} never "
                             f"runs that layer in its forward pass")
        return [maps[name] for name in self.layers] + [logits]

    def detach(self) -> None:
        """Remove the hooks from the network (the tap then returns no maps)."""
        for _, handle in self._hooked.values():
            handle.remove()
        self._hooked = {}


def _kept(out):
    """A copy of an observed tensor, which a later in-place operation (ReLU(inplace=True),
    Hardswish ...) would otherwise overwrite; other outputs as they are."""
    return out.clone() if torch.is_tensor(out) else out


def _drop_net_prefix(module, state_dict, prefix, local_metadata) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + "net.")]:
        state_dict[prefix + key[len(prefix) + 4:]] = state_dict.pop(key)


def _add_net_prefix(module, state_dict, prefix, *args) -> None:
    # A FeatureTap's state_dict never has the prefix (see _drop_net_prefix): always add it
    # (a network may well have a layer of its own named "net").
    for key in [k for k in state_dict if k.startswith(prefix)]:
        state_dict[prefix + "net." + key[len(prefix):]] = state_dict.pop(key)


def probe_maps(tap: FeatureTap, side: int = PROBE_SIDE) -> list[torch.Tensor]:
    """The observed maps and the logits for one random image (eval mode, no gradients);
    ValueError naming the layer for an output that is not a B×C×H×W map."""
    training = tap.training
    tap.eval()
    device = next((p.device for p in tap.parameters()), torch.device("cpu"))
    try:
        with torch.no_grad():
            maps = tap(torch.rand(1, 3, side, side, device=device), return_feat=True)
    finally:
        tap.train(training)
    for name, out in zip(tap.layers + ("(the output)",), maps):
        if not (torch.is_tensor(out) and out.dim() == 4):
            kind = f"a {out.dim()}-D tensor" if torch.is_tensor(out) else f"a {type(out).__name__}"
            raise ValueError(f"--observe_layers {name}: --model {tap.spec} gives {kind} there, "
                             f"not a B×C×H×W map; name a layer inside it")
    return maps


def auto_layers(net: nn.Module, spec: str) -> tuple[str, ...]:
    """For a network of no known family: its top-level layers whose output is a B×C×H×W map,
    but the last one (which gives the logits); ValueError when there is none."""
    children = [name for name, _ in net.named_children()][:-1]
    tap = FeatureTap(net, children, spec)
    training = net.training
    net.eval()
    try:
        with torch.no_grad():
            maps = tap(torch.rand(1, 3, PROBE_SIDE, PROBE_SIDE), return_feat=True)[:-1]
    finally:
        tap.detach()
        net.train(training)
    layers = tuple(name for name, out in zip(children, maps) if torch.is_tensor(out) and out.dim() == 4)
    if not layers:
        raise ValueError(f"--model {spec}: no top-level layer gives a B×C×H×W map to observe; "
                         f"name the layers with --observe_layers")
    return layers


class LayerObserver(nn.Module):
    """The observer of any segmenter: an image stem down to 1/4 resolution, plus a 1×1
    projection of every observed map (the logits included), resized to the stem's grid and
    added; two 3×3 blocks (dropout between them); one logit per pixel, upsampled to the image.

    Nothing clips the score before the last convolution, so no pixels tie at one value (the
    original head's flaw, see ``obsnet.models.obsnet.HEADS``).
    """

    DROPOUT = 0.1

    def __init__(self, channels: Sequence[int], width_mult: float = 1.0):
        super().__init__()
        width = scaled(64, width_mult)
        self.stem = nn.Sequential(conv_bn_relu(3, max(1, width // 2), 3, stride=2),
                                  conv_bn_relu(max(1, width // 2), width, 3, stride=2))
        self.projections = nn.ModuleList(conv_bn_relu(c, width) for c in channels)
        self.fuse = nn.ModuleList(conv_bn_relu(width, width, 3) for _ in range(2))
        self.classifier = nn.Conv2d(width, 1, kernel_size=1)

    def forward(self, x, feat, mc_drop: bool = False, no_residual: bool = False,
                no_img: bool = False):
        """``feat``: the segmenter's observed maps, logits last (``FeatureTap``);
        ``no_residual`` ignores them, ``no_img`` the image (ablations)."""
        y = self.stem(torch.zeros_like(x) if no_img else x)
        if not no_residual:
            for project, fmap in zip(self.projections, feat):
                y = y + resize(project(fmap), y.shape[-2:])
        y = shared_dropout(self.fuse[0](y), self.DROPOUT, self.training, mc_drop)
        return resize(self.classifier(self.fuse[1](y)), x.shape[-2:])


def build_generic(model: str, nclass: int, width_mult: float, layers=None,
                  backbone_weights=None) -> tuple[FeatureTap, LayerObserver]:
    """(segmenter wrapped in a FeatureTap, its LayerObserver) for a generic spec.

    ``layers``: module names to observe (None: see ``tap_and_observer``). One probe pass
    finds their channels, and checks that the network gives ``nclass`` logits.
    """
    net = build_network(model, nclass, backbone_weights)
    tap, observer, maps = tap_and_observer(net, model, layers, width_mult)
    if maps[-1].shape[1] != nclass:
        raise ValueError(f"--model {model}: gives {maps[-1].shape[1]} class maps, not the "
                         f"{nclass} of the dataset (--nclass)")
    return tap, observer


def tap_and_observer(net: nn.Module, spec: str, layers=None, width_mult: float = 1.0):
    """(FeatureTap of ``net`` observing ``layers``, its LayerObserver, the probe's maps);
    ``layers`` None: the family's (``family_layers``), else the top-level ones (``auto_layers``)."""
    tap = FeatureTap(net, layers or family_layers(net) or auto_layers(net, spec), spec)
    maps = probe_maps(tap)
    return tap, LayerObserver([m.shape[1] for m in maps], width_mult), maps
