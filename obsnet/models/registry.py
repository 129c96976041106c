"""Model registry (name -> builder) and loading whole networks from their checkpoints."""
from pathlib import Path

import torch.nn as nn

from obsnet.models.checkpoint import (CheckpointError, check_same_segmenter, load_checkpoint,
                                     load_weights, recorded_fingerprint, weights_fingerprint)
from obsnet.models.deeplabv3plus import DeepLabV3Plus, Obsnet_DeepLab
from obsnet.models.generic import build_generic, is_generic
from obsnet.models.obsnet import HEADS, Obsnet_Seg, Obsnet_Small, SegNetLayerObserver
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
# Observers: builder(width_mult, head, inputs, nclass); "<model>_small" is the --obs_mlp variant
# of "<model>", "<model>_layer" its --obs_kind layer. ``head`` (obsnet.models.obsnet.HEADS) is
# the SegNet mirror's last block; ``inputs`` (obsnet.models.output_maps.INPUTS) what the last
# layer reads of the logits. DeepLab's observer has neither: it reads two maps of the logits
# (max softmax, entropy) already, and has no tie.
OBSERVERS = {
    "segnet": lambda width_mult, head, inputs, nclass: Obsnet_Seg(
        3, 1, width_mult=width_mult, head=head, inputs=inputs, nclass=nclass),
    "segnet_small": lambda width_mult, head, inputs, nclass: Obsnet_Small(
        512, 1, width_mult=width_mult, head=head, inputs=inputs, nclass=nclass),
    "segnet_layer": lambda width_mult, head, inputs, nclass: SegNetLayerObserver(
        width_mult, inputs, nclass),
    "deeplabv3plus": lambda width_mult, head, inputs, nclass: Obsnet_DeepLab(
        3, 1, width_mult=width_mult),
}
KINDS = ("mirror", "layer")  # --obs_kind: the segmenter's mirror, or the generic LayerObserver


def build_models(model: str, nclass: int, width_mult: float, obs_mlp: bool,
                 backbone_weights=None, head: str = "linear", layers=None, probe_size=None,
                 inputs: str = "features", kind: str = "mirror"):
    """Return (segnet, obsnet) for a registry name or a generic spec (``torchvision:<name>``,
    ``package.module:factory``: see ``obsnet.models.generic``).

    ``backbone_weights``: None (random init), "imagenet" (torchvision download) or a
    torchvision state_dict file for the segmentation network's encoder (see SEGMENTERS).
    ``head``: the observer's last block (``obsnet.models.obsnet.HEADS``); ``layers``: the
    layers a generic spec's observer reads (None: its default); ``probe_size``: the image size
    (H, W, the run's --size) of the one forward pass that checks a generic spec's network.
    ``inputs`` (``--obs_inputs``) and ``kind`` (``--obs_kind``): see OBSERVERS and KINDS.
    """
    if model not in SEGMENTERS and not is_generic(model):
        raise ValueError(f"--model {model}: unknown (available: {', '.join(sorted(SEGMENTERS))}, "
                         f"torchvision:<name>, package.module:factory)")
    observer = observer_name(model, obs_mlp, inputs, kind)  # checked before building anything
    if is_generic(model):
        return build_generic(model, nclass, width_mult, layers, backbone_weights, probe_size,
                             inputs)
    segnet = SEGMENTERS[model](nclass, width_mult, backbone_weights)
    obsnet = OBSERVERS[observer](width_mult, head, inputs, nclass)
    return segnet, obsnet


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


OBSERVER_FLAGS = ("obs_mlp", "no_residual", "no_img")  # what changes how an observer is run
DEFAULT_HEAD = "linear"  # of new observers; checkpoints that record no head have the original's
# Of new observers; checkpoints that record none read no logits and mirror the segmenter.
DEFAULT_INPUTS, DEFAULT_KIND = "features", "mirror"
RECORDED_CHOICES = {"inputs": INPUTS, "kind": KINDS}  # each: the flag --obs_<name>


def observer_path(obsnet_file) -> Path:
    """An observer checkpoint: the file itself, or a folder's ``best.pth``."""
    path = Path(obsnet_file)
    return path / "best.pth" if path.is_dir() else path


def observer_record(args) -> dict:
    """What an observer checkpoint records of how to build and run it: ``OBSERVER_FLAGS``, the
    ``head`` (``args.obs_head``, None meaning the default), the ``model`` spec, the ``layers``
    a generic model's observer reads (``args.observe_layers``, else None), and what it reads of
    the logits and which kind it is (``args.obs_inputs``, ``args.obs_kind``; None: defaults)."""
    record = {flag: bool(getattr(args, flag)) for flag in OBSERVER_FLAGS}
    layers = getattr(args, "observe_layers", None)
    return record | {"head": getattr(args, "obs_head", None) or DEFAULT_HEAD,
                     "model": args.model, "layers": list(layers) if layers else None,
                     "inputs": getattr(args, "obs_inputs", None) or DEFAULT_INPUTS,
                     "kind": getattr(args, "obs_kind", None) or DEFAULT_KIND}


def observer_flags(obsnet_file) -> dict | None:
    """The flags and head recorded in an observer checkpoint (see ``observer_record``), or
    None for a checkpoint that records none (the original's plain state_dicts). Each recorded
    value is checked as data (a CheckpointError names the file and the entry): the model spec
    is only compared with the command line's, the layers are looked up among the module names
    of the network the command line builds."""
    path = observer_path(obsnet_file)
    checkpoint = load_checkpoint(path)
    recorded = checkpoint.get("observer") if isinstance(checkpoint, dict) else None
    if not isinstance(recorded, dict):
        return None
    head, model, layers = recorded.get("head", "original"), recorded.get("model"), recorded.get("layers")
    if head not in HEADS:
        raise CheckpointError(f"{path}: its recorded observer head is not one of {', '.join(HEADS)}")
    if model is not None and not isinstance(model, str):
        raise CheckpointError(f"{path}: its recorded observer model is not a model spec")
    if layers is not None and not (isinstance(layers, (list, tuple)) and layers
                                   and all(isinstance(name, str) and name for name in layers)):
        raise CheckpointError(f"{path}: its recorded observer layers are not module names")
    chosen = {"inputs": recorded.get("inputs", DEFAULT_INPUTS), "kind": recorded.get("kind", DEFAULT_KIND)}
    for name, value in chosen.items():
        if value not in RECORDED_CHOICES[name]:
            raise CheckpointError(f"{path}: its recorded observer {name} is not one of "
                                  f"{', '.join(RECORDED_CHOICES[name])}")
    return {k: bool(recorded.get(k, False)) for k in OBSERVER_FLAGS} | chosen | \
        {"head": head, "model": model, "layers": tuple(layers) if layers else None}


def merge_observer_flags(given: dict, obsnet_file) -> dict:
    """The observer flags and head to run a checkpoint with: those it records, else ``given``
    (the command line's; a plain state_dict has the original head unless ``given["head"]``
    says otherwise). A flag given on the command line that the checkpoint was trained
    without, or another head, is a CheckpointError (exit 1): it would score with another
    network."""
    recorded = observer_flags(obsnet_file)
    path = observer_path(obsnet_file)
    if recorded is None:
        return dict(given) | {"head": given.get("head") or "original",
                              "inputs": given.get("inputs") or DEFAULT_INPUTS,
                              "kind": given.get("kind") or DEFAULT_KIND}
    for flag in OBSERVER_FLAGS:
        if given.get(flag) and not recorded[flag]:
            raise CheckpointError(f"{path}: this observer was trained without --{flag}; drop "
                                  f"--{flag} (its checkpoint records how it was trained)")
    if given.get("head") not in (None, recorded["head"]):
        raise CheckpointError(f"{path}: this observer has the {recorded['head']} head, not "
                              f"--obs_head {given['head']}; drop --obs_head (its checkpoint "
                              f"records its head)")
    for name in RECORDED_CHOICES:
        if given.get(name) not in (None, recorded[name]):
            raise CheckpointError(f"{path}: this observer has --obs_{name} {recorded[name]}, not "
                                  f"--obs_{name} {given[name]}; drop --obs_{name} (its checkpoint "
                                  f"records it)")
    if given.get("model") not in (None, recorded["model"]) and recorded["model"] is not None:
        raise CheckpointError(f"{path}: this observer was trained with --model "
                              f"{recorded['model']}, not --model {given['model']}")
    if given.get("layers") and tuple(given["layers"]) != recorded["layers"]:
        recorded_layers = ",".join(recorded["layers"] or ()) or "its model's default"
        raise CheckpointError(f"{path}: this observer reads --observe_layers {recorded_layers}; "
                              f"drop --observe_layers (its checkpoint records its layers)")
    return recorded


def load_networks(model: str, nclass: int, width_mult: float, obs_mlp: bool, segnet_file,
                  obsnet_file=None, device="cpu", head: str = DEFAULT_HEAD,
                  segnet_label: str = "--segnet_file", layers=None, probe_size=None,
                  inputs: str = DEFAULT_INPUTS, kind: str = DEFAULT_KIND):
    """(frozen SegNet loaded from ``segnet_file``, ObsNet with ``head``) on ``device``.

    ``obsnet_file``: a checkpoint file, or a folder whose ``best.pth`` is loaded; None leaves
    the observer freshly initialised (for training). ``segnet_label``: how messages name the
    SegNet file (the flag that gave it, e.g. "--ensemble member"). ``layers``: what a generic
    model's observer reads (None: its default); ``probe_size``, ``inputs``, ``kind``: see
    ``build_models``.
    """
    segnet, obsnet = build_models(model, nclass, width_mult, obs_mlp, head=head, layers=layers,
                                  probe_size=probe_size, inputs=inputs, kind=kind)
    if not Path(segnet_file).is_file():
        hint = " (train one with --train_segnet)" if segnet_label == "--segnet_file" else ""
        raise CheckpointError(f"{segnet_label} {segnet_file}: file not found{hint}")
    load_weights(segnet, segnet_file, segnet_label)
    if obsnet_file is not None:
        checkpoint = load_weights(obsnet, observer_path(obsnet_file), "--obsnet_file")
        check_observer_segmenter(checkpoint, obsnet_file, segnet, f"{segnet_label} {segnet_file}")
    return freeze(segnet.to(device)), obsnet.to(device)


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
