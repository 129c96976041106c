"""SegNet: the frozen segmentation network whose failures the observer learns to predict."""
import logging
import re

import torch
import torch.nn as nn

from obsnet.models.blocks import EncoderDecoder
from obsnet.models.checkpoint import CheckpointError, torchvision_state

LOG = logging.getLogger(__name__)
SEGNET_DROPOUT = (0.5, 0.5, 0.5, 0.5, 0.4, 0.3)


class SegNet(EncoderDecoder):
    """VGG16-style encoder-decoder with max-pool indices (Badrinarayanan et al.).

    Args:
        input_channels: image channels (3).
        output_channels: number of classes.
        width_mult: scales every hidden channel count (1.0 = the original network).
        init_vgg: start the encoder from VGG16 (the original's flag); needs ``vgg_weights``.
        vgg_weights: "imagenet" or a torchvision VGG16 state_dict file copied into the 13
            encoder convolutions (see ``init_encoder_from_vgg16``); implies ``init_vgg``.
    """

    def __init__(self, input_channels: int = 3, output_channels: int = 12, init_vgg: bool = False,
                 width_mult: float = 1.0, vgg_weights=None):
        super().__init__(input_channels, output_channels, SEGNET_DROPOUT, width_mult)
        if init_vgg and vgg_weights is None:
            raise ValueError("init_vgg=True needs VGG16 weights: pass --vgg_weights PATH (a "
                             "torchvision vgg16 state_dict file) or --vgg_weights imagenet")
        self.in_channels, self.n_classes = input_channels, output_channels
        if vgg_weights is not None:
            copied = init_encoder_from_vgg16(self, vgg_weights)
            LOG.info(f"SegNet encoder: {copied} convolutions initialised from VGG16 ({vgg_weights})")

    def forward(self, x, mc_drop: bool = False, return_feat: bool = False):
        """Class logits B×C×H×W, or the list of the 10 block outputs (logits last)."""
        feats = self.run(x, mc_drop=mc_drop)
        return feats if return_feat else feats[-1]


VGG16_CONVS = tuple(f"down{b}.conv{c}" for b, n in zip(range(1, 6), (2, 2, 3, 3, 3))
                    for c in range(1, n + 1))  # the 13 encoder convolutions, VGG16's order


def init_encoder_from_vgg16(segnet: SegNet, path) -> int:
    """Copy torchvision VGG16's 13 convolutions into the SegNet encoder; return 13.

    ``path``: a torchvision ``vgg16`` state_dict file (``features.N.weight/bias``, N in
    increasing order; ``classifier.*`` is ignored), or "imagenet" for torchvision's
    IMAGENET1K_V1 download. Strict on shapes, so only a width_mult=1.0, 3-channel SegNet
    fits; nothing is copied unless every layer fits (a ``CheckpointError`` names the file).
    """
    from torchvision.models import VGG16_Weights

    state, source = torchvision_state(path, VGG16_Weights.IMAGENET1K_V1, "VGG16")
    indices = sorted(int(m.group(1)) for k, v in state.items()
                     if (m := re.fullmatch(r"features\.(\d+)\.weight", k))
                     and isinstance(v, torch.Tensor) and v.dim() == 4)
    if len(indices) != len(VGG16_CONVS):
        raise CheckpointError(f"{source}: not a torchvision VGG16 state_dict ({len(indices)} "
                              f"convolutions under features.*, VGG16 has {len(VGG16_CONVS)})")
    pairs = []
    for n, name in zip(indices, VGG16_CONVS):
        conv = segnet.get_submodule(name).cbr_unit[0]
        weight, bias = state[f"features.{n}.weight"], state.get(f"features.{n}.bias")
        if weight.shape != conv.weight.shape or bias is None or bias.shape != conv.bias.shape:
            raise CheckpointError(
                f"{source}: features.{n}.weight {tuple(weight.shape)} does not fit the SegNet's "
                f"{name} {tuple(conv.weight.shape)}; VGG16 initialisation needs --width_mult 1.0 "
                f"and 3 input channels")
        pairs += [(conv.weight, weight), (conv.bias, bias)]
    with torch.no_grad():
        for param, value in pairs:
            param.copy_(value)
    return len(indices)


def freeze(model: nn.Module) -> nn.Module:
    """Put a model in eval mode with no parameter requiring gradients."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
