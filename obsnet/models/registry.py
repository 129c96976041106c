"""Model registry (name -> builder): segmenters and observers, built and loaded separately."""
from pathlib import Path

import torch.nn as nn

from obsnet.models.checkpoint import (CheckpointError, check_same_segmenter, load_weights,
                                     recorded_fingerprint, weights_fingerprint)
from obsnet.models.calibration import calibrated
from obsnet.models.deeplabv3plus import DeepLabV3Plus, Obsnet_DeepLab
from obsnet.models.generic import FeatureTap, build_tap, is_generic, layer_observer
from obsnet.models.obsnet import Obsnet_Seg, Obsnet_Small, SegNetLayerObserver
from obsnet.models.observer_spec import (KINDS, ObserverRequest, ObserverSpec, observer_path,
                                         resolve_observer)
from obsnet.models.output_maps import INPUTS
from obsnet.models.segnet import SegNet, freeze

# Segmentation networks: builder(nclass, width_mult, backbone_weights). ``backbone_weights``
# (None, "imagenet" or a torchvision state_dict file) initialises the encoder: VGG16 for the
# SegNet, ResNet-101 for DeepLabv3+.
SEGMENTERS = {
    "segnet": lambda nclass, width_mult, backbone_weights=None: SegNet(
        3, nclass, width_mult=width_mult, vgg_weights=backbone_weights),
    "deeplabv3plus": lambda nclass, width_mult, backbone_weights=None: DeepLabV3Plus(
        3, nclass, backbone_weights=backbone_weights, width_mult=width_mult),
}
# Observers: builder(spec, width_mult, nclass), ``spec`` an ObserverSpec; "<model>_small" is the
# --obs_mlp variant of "<model>", "<model>_layer" its --obs_kind layer. ``spec.head``
# (obsnet.models.obsnet.HEADS) is the SegNet mirror's last block; ``spec.inputs``
# (obsnet.models.output_maps.INPUTS) what the last layer reads of the logits; ``spec.no_residual``
# and ``spec.no_img`` the ablations its forward pass applies. DeepLab's observer has no head
# and no inputs: it reads two maps of the logits (max softmax, entropy) already, and has no tie.
OBSERVERS = {
    "segnet": lambda spec, width_mult, nclass: Obsnet_Seg(
        3, 1, width_mult=width_mult, head=spec.head, inputs=spec.inputs, nclass=nclass,
        no_residual=spec.no_residual, no_img=spec.no_img),
    "segnet_small": lambda spec, width_mult, nclass: Obsnet_Small(
        512, 1, width_mult=width_mult, head=spec.head, inputs=spec.inputs, nclass=nclass),
    "segnet_layer": lambda spec, width_mult, nclass: SegNetLayerObserver(
        width_mult, spec.inputs, nclass, no_residual=spec.no_residual, no_img=spec.no_img),
    "deeplabv3plus": lambda spec, width_mult, nclass: Obsnet_DeepLab(
        3, 1, width_mult=width_mult, no_residual=spec.no_residual, no_img=spec.no_img),
}


def build_segmenter(model: str, nclass: int, width_mult: float, backbone_weights=None,
                    layers=None, probe_size=None) -> nn.Module:
    """The segmenter of a registry name, or of a generic spec (``torchvision:<name>``,
    ``package.module:factory``: a ``FeatureTap``, see ``obsnet.models.generic``).

    ``backbone_weights``: None (random init), "imagenet" (torchvision download) or a
    torchvision state_dict file for the encoder (see SEGMENTERS). A generic spec's tap observes
    ``layers`` (None: its default) and knows their channels (``FeatureTap.channels``) from one
    probe pass at ``probe_size`` (H, W, the run's --size), which also checks the network.
    """
    if model not in SEGMENTERS and not is_generic(model):
        raise ValueError(f"--model {model}: unknown (available: {', '.join(sorted(SEGMENTERS))}, "
                         f"torchvision:<name>, package.module:factory)")
    if is_generic(model):
        return build_tap(model, nclass, layers, backbone_weights, probe_size)
    return SEGMENTERS[model](nclass, width_mult, backbone_weights)


def build_observer(spec: ObserverSpec, segmenter: nn.Module, nclass: int,
                   width_mult: float) -> nn.Module:
    """A new observer as ``spec`` says, for ``segmenter`` (``build_segmenter``'s, of
    ``spec.model``); ValueError naming the flag that cannot be used."""
    if spec.model is None:
        raise ValueError("the observer's --model is not known: give --model")
    name = observer_name(spec.model, spec.obs_mlp, spec.inputs, spec.kind)
    ablation = next((f for f in ("no_residual", "no_img") if getattr(spec, f)), None)
    if spec.obs_mlp and ablation:
        raise ValueError(f"--obs_mlp with --{ablation}: the light observer reads the SegNet's "
                         f"up4 map alone, so --{ablation} cannot apply to it")
    if name is not None:
        return OBSERVERS[name](spec, width_mult, nclass)
    if not isinstance(segmenter, FeatureTap) or segmenter.channels is None:
        raise ValueError(f"--model {spec.model}: its observer needs the segmenter's FeatureTap "
                         f"(build_segmenter's)")
    return layer_observer(segmenter, width_mult, spec.inputs, spec.no_residual, spec.no_img)


def observer_name(model: str, obs_mlp: bool, inputs: str, kind: str) -> str | None:
    """The OBSERVERS key of a registry model's observer (None for a generic spec, whose
    observer is always a LayerObserver); ValueError naming the flag that cannot be used."""
    if inputs not in INPUTS:
        raise ValueError(f"--obs_inputs {inputs}: unknown (available: {', '.join(INPUTS)})")
    if kind not in KINDS:
        raise ValueError(f"--obs_kind {kind}: unknown (available: {', '.join(KINDS)})")
    if obs_mlp and kind != "mirror":
        raise ValueError(f"--obs_mlp with --obs_kind {kind}: pick one observer")
    if is_generic(model):
        return None
    name = f"{model}_small" if obs_mlp else f"{model}_layer" if kind == "layer" else model
    if name not in OBSERVERS:
        flag = "--obs_mlp" if obs_mlp else f"--obs_kind {kind}"
        raise ValueError(f"{flag} is not available with --model {model}; use the default "
                         f"observer (drop {flag.split()[0]})")
    if model == "deeplabv3plus" and inputs != "features":
        raise ValueError(f"--obs_inputs {inputs} is not available with --model deeplabv3plus: "
                         f"its observer reads the logits' max softmax and entropy already")
    return name


def load_segmenter(model: str, nclass: int, width_mult: float, path, device="cpu",
                   label: str = "--segnet_file", layers=None, probe_size=None) -> nn.Module:
    """The frozen segmenter of ``model`` with the weights of ``path``, on ``device``.

    ``label``: how messages name the file (the flag that gave it, e.g. "--ensemble member");
    ``layers``, ``probe_size``: see ``build_segmenter``.
    """
    segnet = build_segmenter(model, nclass, width_mult, layers=layers, probe_size=probe_size)
    if not Path(path).is_file():
        hint = " (train one with --train_segnet)" if label == "--segnet_file" else ""
        raise CheckpointError(f"{label} {path}: file not found{hint}")
    load_weights(segnet, path, label)
    return freeze(segnet.to(device))


def load_observer(path, given: ObserverRequest | ObserverSpec, segmenter: nn.Module, nclass: int,
                  width_mult: float, device="cpu", segnet_where: str = "--segnet_file",
                  calibrate: bool = True) -> tuple[nn.Module, ObserverSpec]:
    """(the observer of checkpoint ``path`` for ``segmenter``, with its weights, on ``device``;
    its spec). A checkpoint calibrated by ``main.py --calibrate`` gives a
    ``CalibratedObserver`` (its logit ``a * logit + b``), unless ``calibrate`` is false.

    ``path``: a checkpoint file or a folder (its ``best.pth``). The spec is the one the
    checkpoint records, else ``given``'s (``resolve_observer``: a contradicting request is a
    one-line CheckpointError); a checkpoint trained against another segmenter than
    ``segmenter`` (``segnet_where``: how messages name it) is refused too.

    A generic segmenter's FeatureTap holds the observed layers, so build it after resolving::

        spec = resolve_observer(path, request)
        segmenter = load_segmenter(model, nclass, width_mult, segnet_file, layers=spec.layers)
        observer, spec = load_observer(path, spec, segmenter, nclass, width_mult)

    (the resolved spec passes the checks again: it is the checkpoint's record).
    """
    spec = resolve_observer(path, given)
    taps = getattr(segmenter, "layers", None) if isinstance(segmenter, FeatureTap) else None
    if spec.layers and taps is not None and tuple(taps) != spec.layers:
        raise CheckpointError(f"--obsnet_file {observer_path(path)}: this observer reads "
                              f"--observe_layers {','.join(spec.layers)}, and the segmenter "
                              f"observes {','.join(taps)}; build it with the observer's layers")
    observer = build_observer(spec, segmenter, nclass, width_mult)
    checkpoint = load_weights(observer, observer_path(path), "--obsnet_file")
    check_observer_segmenter(checkpoint, path, segmenter, segnet_where)
    if calibrate:
        observer = calibrated(observer, checkpoint, f"--obsnet_file {observer_path(path)}")
    return observer.to(device), spec


def load_observed(obsnet_file, given: ObserverRequest, model: str, nclass: int,
                  width_mult: float, segnet_file, device="cpu", probe_size=None,
                  calibrate: bool = True) -> tuple[nn.Module, nn.Module, ObserverSpec]:
    """(frozen segmenter of ``segnet_file``, the observer of ``obsnet_file`` for it, the
    observer's spec): how every command runs an observer checkpoint (``--test_only``,
    inference.py, the ONNX export). The spec is resolved first (the checkpoint's record; a
    request ``given`` that contradicts it is a one-line CheckpointError), so that a generic
    segmenter's tap observes the recorded layers (see ``load_observer``; ``calibrate``: apply
    the checkpoint's calibration, as every command does but --calibrate itself)."""
    spec = resolve_observer(obsnet_file, given)
    segmenter = load_segmenter(model, nclass, width_mult, segnet_file, device, layers=spec.layers,
                               probe_size=probe_size)
    observer, spec = load_observer(obsnet_file, spec, segmenter, nclass, width_mult, device,
                                   f"--segnet_file {segnet_file}", calibrate)
    return segmenter, observer, spec


def check_observer_segmenter(checkpoint, obsnet_file, segnet: nn.Module, segnet_where: str) -> None:
    """CheckpointError (one line naming both files) when the observer checkpoint was trained
    against another segmenter than ``segnet`` (its recorded weights fingerprint); a checkpoint
    that records none (earlier versions, the original's) is accepted."""
    where = f"--obsnet_file {observer_path(obsnet_file)}"
    check_same_segmenter(recorded_fingerprint(checkpoint, where), weights_fingerprint(segnet),
                         where, segnet_where, "give the --segnet_file this observer was "
                         "trained with, or train an observer for this one")


def init_from_segnet(obsnet: nn.Module, segnet: nn.Module) -> int:
    """Copy every SegNet tensor whose key and shape match into ``obsnet``; return the count."""
    target = obsnet.state_dict()
    matched = {k: v for k, v in segnet.state_dict().items()
               if k in target and target[k].shape == v.shape}
    obsnet.load_state_dict(matched, strict=False)
    return len(matched)
