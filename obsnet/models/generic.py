"""Observe any segmentation network: torchvision's, or one the user's own factory builds.

``--model torchvision:<name>`` builds one of ``torchvision.models.segmentation``'s networks;
``--model package.module:factory`` calls ``factory(num_classes=...)`` (or ``factory()`` when it
takes no ``num_classes``), which returns an ``nn.Module`` whose output is B×C×H×W logits or
torchvision's ``{"out": logits}``. ``FeatureTap`` wraps the network so that it answers like this
project's SegNet (``return_feat=True`` gives the observed maps, logits last; ``mc_drop=True``
keeps its dropout layers active), and ``LayerObserver`` is the observer that reads those maps.

One probe pass (a random image at the run's size) finds the observed maps' channels and checks
the network first: what cannot be observed (TorchScript, weights other than float32, an output
that is not B×C×H×W logits, NaN or infinite values, a forward pass that fails) is one
``SegmenterError`` line, naming what the user gave as ``Naming`` says (the command line's flags,
or the Python API's arguments).
"""
import importlib
import inspect
import os
import sys
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain

import torch
import torch.nn as nn
from torchvision import models as tv_models

from obsnet.models.blocks import conv_bn_relu, resize, scaled, shared_dropout
from obsnet.models.checkpoint import CheckpointError, torchvision_state
from obsnet.models.output_maps import OutputHead

TORCHVISION = "torchvision:"
# The observed layers of torchvision's segmentation models, by backbone family: the backbone's
# stages from 1/4 resolution down (module names, as named_modules() and, for module outputs,
# torchvision.models.feature_extraction.get_graph_node_names list them).
FAMILY_LAYERS = {
    "resnet": ("backbone.layer1", "backbone.layer2", "backbone.layer3", "backbone.layer4"),
    "mobilenet_v3": ("backbone.3", "backbone.6", "backbone.12", "backbone.16"),
}
PROBE_SIZE = (64, 64)  # the probe pass's image size when the run's is not known (H, W)
HALF_DTYPES = (torch.float16, torch.bfloat16)


class SegmenterError(ValueError):
    """A network that cannot be observed as it is: one line naming what the user gave (the
    command line's flag or the API's argument, see ``Naming``)."""


@dataclass(frozen=True)
class Naming:
    """How messages name what the user gave: the command line's flags (``Naming.flags``) or
    the Python API's arguments."""

    model: str  # the network, e.g. "--model pkg.mod:build" or "segmenter (MyNet)"
    layers: str = "--observe_layers"  # the option naming the observed layers
    size: str = "--size"  # the option giving the image size of the probe pass
    amp: str = "--amp"  # what gives mixed precision

    @classmethod
    def flags(cls, spec: str) -> "Naming":
        """The command line's names for ``--model spec``."""
        return cls(f"--model {spec}")

    def size_value(self, size) -> str:
        """How the user would write the image size ``size`` (H, W)."""
        h, w = size
        return f"{self.size} {h} {w}" if self.size.startswith("--") else f"{self.size}=({h}, {w})"


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


def logits_of(output, naming: Naming | None = None) -> torch.Tensor:
    """The class logits of a network's output: a tensor, a list of maps (logits last, this
    project's ``return_feat=True``) or a dict with ``"out"`` (torchvision's). SegmenterError
    (naming the network as ``naming`` says) for a dict without ``"out"`` and for anything
    that is not B×C×H×W, a classifier's B×C scores included."""
    who = naming.model if naming is not None else "the segmenter"
    if isinstance(output, Mapping):
        if "out" not in output:
            keys = ", ".join(map(str, output)) or "none"
            raise SegmenterError(f"{who}: its output is a dict without \"out\" (keys: {keys}); "
                                 f"return the logits, or {{\"out\": logits}} as torchvision's "
                                 f"models do")
        output = output["out"]
    elif isinstance(output, (list, tuple)) and output:
        output = output[-1]
    if not (torch.is_tensor(output) and output.dim() == 4):
        raise SegmenterError(f"{who}: {_not_logits(output)}")
    return output


def _not_logits(output) -> str:
    """What is wrong with a network output that is not B×C×H×W logits."""
    if not torch.is_tensor(output):
        return f"its output is a {type(output).__name__}, not B×C×H×W class logits"
    shape = "×".join(map(str, output.shape))
    if output.dim() == 2:
        return (f"not a segmentation network: its output is {shape} (B×C, a classifier's), and "
                f"B×C×H×W class logits are needed")
    return f"its output is a {output.dim()}-D tensor ({shape}), not B×C×H×W class logits"


def refuse_torchscript(net: nn.Module, naming: Naming) -> None:
    """SegmenterError for a TorchScript network: forward hooks never run inside one, so none
    of its layers can be observed."""
    if isinstance(net, torch.jit.ScriptModule):
        raise SegmenterError(f"{naming.model}: a TorchScript module (torch.jit.script or "
                             f"torch.jit.trace), whose layers cannot be observed (forward hooks "
                             f"do not run inside TorchScript); give the nn.Module it was made "
                             f"from")


def refuse_other_precision(net: nn.Module, naming: Naming) -> None:
    """SegmenterError for a network with floating-point weights other than float32, or half
    buffers (a ``.half()`` one): images, the attack and the observer are float32. (A float64
    buffer may be meant: the probe pass tells whether the network runs.)"""
    params = ((name, t) for name, t in net.named_parameters() if t.dtype != torch.float32)
    buffers = ((name, t) for name, t in net.named_buffers() if t.dtype in HALF_DTYPES)
    other = next(((name, t.dtype) for name, t in chain(params, buffers)
                  if t.is_floating_point()), None)
    if other is not None:
        name, dtype = other
        raise SegmenterError(f"{naming.model}: its weights are {str(dtype).removeprefix('torch.')} "
                             f"(first: {name}), and segmenters run in float32 here; convert it "
                             f"with .float() ({naming.amp} gives mixed precision)")


class FeatureTap(nn.Module):
    """A segmentation network that answers like this project's SegNet.

    ``tap(x)`` returns the logits (resized to the image when the network returns them
    smaller); ``tap(x, return_feat=True)`` the outputs of ``layers`` (module names), then the
    logits; ``mc_drop=True`` keeps the network's dropout layers active (Monte Carlo dropout).
    Its state_dict is the network's own (no prefix), so a user's checkpoint loads as it is.
    Observed maps are copies (an in-place activation after a layer cannot change them), the
    network is given a copy of the image (one that changes its input in place cannot change
    the caller's: the attack's leaf, the observer's input), and ``fold_batchnorm`` leaves
    observed layers alone (they have forward hooks).

    ``naming``: how messages name the network and its options (default: ``--model spec``'s
    flags); ``given``: whether the user named ``layers`` (else messages say they are the
    default ones).
    """

    def __init__(self, net: nn.Module, layers: Sequence[str], spec: str,
                 naming: Naming | None = None, given: bool = True):
        super().__init__()
        self.net, self.spec = net, spec
        self.naming, self.given = naming or Naming.flags(spec), given
        self.layers = tuple(dict.fromkeys(layers))
        refuse_torchscript(net, self.naming)
        names = {name for name, _ in net.named_modules() if name}
        unknown = [name for name in self.layers if name not in names]
        if unknown:
            examples = ", ".join(name for name, _ in net.named_children())
            raise SegmenterError(f"{self.naming.layers} {','.join(unknown)}: not a layer of "
                                 f"{self.naming.model} (module names, e.g. {examples})")
        for name in self.layers:
            scripted = _scripted_part(net, name)
            if scripted is not None:
                raise self.layer_error([name], f"runs that layer as TorchScript (inside "
                                       f"{scripted}), where forward hooks do not run",
                                       "observe layers outside it, or give the nn.Module it "
                                       "was made from")
        self.has_dropout = any(isinstance(m, nn.modules.dropout._DropoutNd) for m in net.modules())
        self.channels: tuple[int, ...] | None = None  # of the observed maps, logits last (probed)
        self._maps, self._hooked = {}, {}
        self.register_state_dict_post_hook(_drop_net_prefix)
        self.register_load_state_dict_pre_hook(_add_net_prefix)

    def layer_error(self, names, problem: str, advice: str | None = None) -> SegmenterError:
        """The error for the observed layers ``names``, whose ``problem`` is said of "that
        layer": named by the option that gave them or, for default layers, by the network."""
        joined = ",".join(names)
        if self.given:
            tail = f"; {advice}" if advice else ""
            return SegmenterError(f"{self.naming.layers} {joined}: {self.naming.model} "
                                  f"{problem}{tail}")
        return SegmenterError(f"{self.naming.model}: {problem} (layer {joined}, observed by "
                              f"default); name the layers to observe ({self.naming.layers})")

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

    def observed(self, x, mc_drop: bool = False) -> tuple[dict, torch.Tensor]:
        """(the outputs of the observed layers the forward pass ran, by name; the logits)."""
        self._attach()
        self._maps.clear()
        with active_dropout(self.net, mc_drop):
            logits = resize(logits_of(self.net(x.clone()), self.naming), x.shape[-2:])
        maps, self._maps = self._maps, {}
        return maps, logits

    def forward(self, x, mc_drop: bool = False, return_feat: bool = False):
        maps, logits = self.observed(x, mc_drop)
        if not return_feat:
            return logits
        unused = [name for name in self.layers if name not in maps]
        if unused:
            raise self.layer_error(unused, "never runs that layer in its forward pass")
        return [maps[name] for name in self.layers] + [logits]

    def detach(self) -> None:
        """Remove the hooks from the network (the tap then returns no maps)."""
        for _, handle in self._hooked.values():
            handle.remove()
        self._hooked = {}


def _scripted_part(net: nn.Module, name: str) -> str | None:
    """The first module on the path to layer ``name`` (itself included) that is TorchScript,
    or None."""
    parts = name.split(".")
    for end in range(1, len(parts) + 1):
        prefix = ".".join(parts[:end])
        if isinstance(net.get_submodule(prefix), torch.jit.ScriptModule):
            return prefix
    return None


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


def probe_pass(tap: FeatureTap, size=None) -> tuple[dict, torch.Tensor]:
    """``tap.observed`` for one random 1×3×H×W image (``size`` (H, W); None: PROBE_SIZE), in
    eval mode without gradients, every module's mode restored after. A failure of the user's
    network is a SegmenterError saying it was this probe pass and at which size.

    The image comes from a generator of its own: the run's random stream (weights, data order)
    is the same whatever the probe's size."""
    size = tuple(size or PROBE_SIZE)
    device = next((p.device for p in tap.parameters()), torch.device("cpu"))
    image = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(0)).to(device)
    modes = [(m, m.training) for m in tap.modules()]
    tap.eval()
    try:
        with torch.no_grad():
            return tap.observed(image)
    except SegmenterError:
        raise
    except Exception as exc:  # the user's network may fail in any way
        raise SegmenterError(f"{tap.naming.model}: the probe pass at {tap.naming.size_value(size)} "
                             f"failed ({_first_line(exc)}): one random image through the network, "
                             f"before the run, to find the maps to observe; give "
                             f"{tap.naming.size} a size the network takes") from None
    finally:
        for m, mode in modes:
            m.training = mode


def _first_line(exc: Exception) -> str:
    """``Type: message`` of an exception, its message cut at the first line."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def probe_maps(tap: FeatureTap, size=None) -> list[torch.Tensor]:
    """The observed maps and the logits of one probe pass (``probe_pass``); SegmenterError naming
    the layer for one the network never runs or whose output is not a B×C×H×W map, and for
    NaN or infinite values anywhere (a network broken before anything was trained)."""
    size = tuple(size or PROBE_SIZE)
    found, logits = probe_pass(tap, size)
    unused = [name for name in tap.layers if name not in found]
    if unused:
        raise tap.layer_error(unused, "never runs that layer in its forward pass")
    for name in tap.layers:
        out = found[name]
        if not (torch.is_tensor(out) and out.dim() == 4):
            kind = f"a {out.dim()}-D tensor" if torch.is_tensor(out) else f"a {type(out).__name__}"
            raise tap.layer_error([name], f"gives {kind} there, not a B×C×H×W map",
                                  "name a layer inside it")
    maps = [found[name] for name in tap.layers] + [logits]
    finite = torch.stack([torch.isfinite(m).all() for m in maps]).cpu()
    if not finite.all():
        names = (*(f"layer {name}" for name in tap.layers), "the logits")
        where = names[int((~finite).nonzero()[0])]
        raise SegmenterError(f"{tap.naming.model}: gives NaN or infinite values for a random image "
                             f"at {tap.naming.size_value(size)} (first: {where}) before anything "
                             f"was trained; check how it is built (its weights)")
    return maps


def auto_layers(net: nn.Module, spec: str, naming: Naming | None = None,
                size=None) -> tuple[str, ...]:
    """For a network of no known family: its top-level layers whose output is a B×C×H×W map
    in one probe pass (``probe_pass``, at ``size``), but the last one (which gives the logits) and
    TorchScript ones (which cannot be hooked); SegmenterError when there is none."""
    naming = naming or Naming.flags(spec)
    children = [(name, m) for name, m in net.named_children()][:-1]
    children = [name for name, m in children if not isinstance(m, torch.jit.ScriptModule)]
    tap = FeatureTap(net, children, spec, naming, given=False)
    try:
        maps, _ = probe_pass(tap, size)
    finally:
        tap.detach()
    layers = tuple(name for name in children
                   if torch.is_tensor(maps.get(name)) and maps[name].dim() == 4)
    if not layers:
        raise SegmenterError(f"{naming.model}: no top-level layer gives a B×C×H×W map to "
                             f"observe; name the layers to observe ({naming.layers})")
    return layers


class LayerObserver(nn.Module):
    """The observer of any segmenter: an image stem down to 1/4 resolution, plus a 1×1
    projection of every observed map (the logits included), resized to the stem's grid and
    added; two 3×3 blocks (dropout between them); one logit per pixel, upsampled to the image.

    Nothing clips the score before the last convolution, so no pixels tie at one value (the
    original head's flaw, see ``obsnet.models.obsnet.HEADS``).
    """

    DROPOUT = 0.1

    def __init__(self, channels: Sequence[int], width_mult: float = 1.0,
                 inputs: str = "features", nclass: int = 0, no_residual: bool = False,
                 no_img: bool = False):
        """``channels``: of each observed map, logits last; ``inputs``: what the final layer
        also reads of the logits (``obsnet.models.output_maps.INPUTS``; ``features``: none, and
        no extra layer, so earlier checkpoints load). Ablations (plain attributes, not in the
        state_dict): ``no_residual`` ignores the maps, ``no_img`` the image."""
        super().__init__()
        self.no_residual, self.no_img = no_residual, no_img
        width = scaled(64, width_mult)
        self.stem = nn.Sequential(conv_bn_relu(3, max(1, width // 2), 3, stride=2),
                                  conv_bn_relu(max(1, width // 2), width, 3, stride=2))
        self.projections = nn.ModuleList(conv_bn_relu(c, width) for c in channels)
        self.fuse = nn.ModuleList(conv_bn_relu(width, width, 3) for _ in range(2))
        self.classifier = nn.Conv2d(width, 1, kernel_size=1)
        self.fc = None if inputs == "features" else OutputHead(1, inputs, nclass)

    def forward(self, x, feat, mc_drop: bool = False):
        """``feat``: the segmenter's observed maps, logits last (``FeatureTap``)."""
        y = self.stem(torch.zeros_like(x) if self.no_img else x)
        if not self.no_residual:
            for project, fmap in zip(self.projections, feat):
                y = y + resize(project(fmap), y.shape[-2:])
        y = shared_dropout(self.fuse[0](y), self.DROPOUT, self.training, mc_drop)
        y = resize(self.classifier(self.fuse[1](y)), x.shape[-2:])
        return y if self.fc is None else self.fc(y, feat[-1])


def build_tap(model: str, nclass: int, layers=None, backbone_weights=None,
              probe_size=None) -> FeatureTap:
    """The segmenter of a generic spec, wrapped in a FeatureTap (its ``channels`` set).

    ``layers``: module names to observe (None: see ``tap_network``). One probe pass, at
    ``probe_size`` (the run's --size; None: PROBE_SIZE), finds their channels and checks that
    the network gives ``nclass`` logits.
    """
    tap = tap_network(build_network(model, nclass, backbone_weights), model, layers,
                      probe_size=probe_size)
    if tap.channels[-1] != nclass:
        raise ValueError(f"--model {model}: gives {tap.channels[-1]} class maps, not the "
                         f"{nclass} of the dataset (--nclass)")
    return tap


def tap_network(net: nn.Module, spec: str, layers=None, naming: Naming | None = None,
                probe_size=None) -> FeatureTap:
    """FeatureTap of ``net`` observing ``layers``, its ``channels`` (of each observed map,
    logits last) found by one probe pass; ``layers`` None: the family's (``family_layers``),
    else the top-level ones (``auto_layers``).

    Refused in one line (SegmenterError, naming the network as ``naming`` says; default: the
    flags of ``--model spec``): a TorchScript network, weights other than float32, and what
    the probe pass at ``probe_size`` finds (``probe_maps``)."""
    naming = naming or Naming.flags(spec)
    refuse_torchscript(net, naming)
    refuse_other_precision(net, naming)
    chosen = layers or family_layers(net) or auto_layers(net, spec, naming, probe_size)
    tap = FeatureTap(net, chosen, spec, naming, given=bool(layers))
    tap.channels = tuple(m.shape[1] for m in probe_maps(tap, probe_size))
    return tap


def layer_observer(tap: FeatureTap, width_mult: float = 1.0, inputs: str = "features",
                   no_residual: bool = False, no_img: bool = False) -> LayerObserver:
    """The LayerObserver of a FeatureTap (``tap_network``'s: it knows its maps' channels);
    ``inputs`` and the ablations: see ``LayerObserver``."""
    return LayerObserver(tap.channels, width_mult, inputs, tap.channels[-1],
                         no_residual=no_residual, no_img=no_img)
