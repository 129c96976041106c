"""Observer networks: predict, per pixel, whether the SegNet is wrong."""
import torch
import torch.nn as nn

from obsnet.models.blocks import DecoderBlock, EncoderDecoder, scaled
from obsnet.models.generic import LayerObserver
from obsnet.models.output_maps import OutputHead

OBSNET_DROPOUT = (0.1,) * 6
# The observer's last block: "original" ends in a ReLU'd single channel before the 1x1 output
# conv, so every pixel whose pre-activation is <= 0 gets one and the same score (a tie that
# held over 10% of the pixels on real CamVid and capped FPR95 at 100%); "linear" drops that
# ReLU (same weights, so checkpoints of either load into both: the checkpoint records which).
HEADS = ("linear", "original")


def _last_relu(head: str) -> bool:
    if head not in HEADS:
        raise ValueError(f"--obs_head {head}: unknown (available: {', '.join(HEADS)})")
    return head == "original"


class Obsnet_Seg(EncoderDecoder):  # noqa: N801  (the original's class name)
    """The SegNet's mirror: every block's input also receives the SegNet's matching map.

    Returns one logit per pixel (B×1×H×W); higher = the SegNet is more likely wrong.
    ``inputs`` (``obsnet.models.output_maps.INPUTS``): what its last layer also reads of the
    SegNet's logits (``nclass`` outputs). Ablations: ``no_residual`` drops the SegNet's maps,
    ``no_img`` the image (plain attributes, not in the state_dict).
    """

    def __init__(self, input_channels: int = 3, output_channels: int = 1, width_mult: float = 1.0,
                 head: str = "linear", inputs: str = "features", nclass: int = 0,
                 no_residual: bool = False, no_img: bool = False):
        super().__init__(input_channels, output_channels, OBSNET_DROPOUT, width_mult,
                         last_relu=_last_relu(head))
        self.fc = OutputHead(output_channels, inputs, nclass)
        self.no_residual, self.no_img = no_residual, no_img

    def forward(self, x, feat, mc_drop: bool = False):
        """``feat``: the SegNet's 10 block outputs; the first 9 are added along the path."""
        extra = None if self.no_residual else feat[:9]
        if self.no_img:
            x = torch.zeros_like(x)
        return self.fc(self.run(x, extra=extra, mc_drop=mc_drop)[-1], feat[-1])


class Obsnet_Small(nn.Module):  # noqa: N801
    """A light observer that decodes only the SegNet's up4 map (``--obs_mlp``)."""

    FEATURE_INDEX = 6  # up4 in the SegNet's feature list: 256 channels at 1/8 resolution

    def __init__(self, input_channels: int = 512, output_channels: int = 1, width_mult: float = 1.0,
                 head: str = "linear", inputs: str = "features", nclass: int = 0):
        super().__init__()
        c64, c128, c256 = (scaled(c, width_mult) for c in (64, 128, 256))
        self.up3 = DecoderBlock(c256, c128, 3)
        self.dropout_p = 0.3
        self.up2 = DecoderBlock(c128, c64, 2)
        self.up1 = DecoderBlock(c64, output_channels, 2, last_relu=_last_relu(head))
        self.fc = OutputHead(output_channels, inputs, nclass)

    def forward(self, x, feat, mc_drop: bool = False):
        """Upsample the SegNet's up4 map x8 to one logit per pixel (``x`` is unused)."""
        up3 = self.up3(feat[self.FEATURE_INDEX])
        up3 = nn.functional.dropout(up3, self.dropout_p, training=self.training or mc_drop)
        y = self.up1(self.up2(up3))
        if y.shape[-2:] != x.shape[-2:]:  # sizes not divisible by 8
            y = nn.functional.interpolate(y, size=x.shape[-2:], mode="bilinear")
        return self.fc(y, feat[-1])


class SegNetLayerObserver(LayerObserver):
    """The generic ``LayerObserver`` on the SegNet (``--obs_kind layer``): a light observer
    that reads four of the SegNet's maps (down3, down5, up3 and the logits) instead of
    mirroring its whole encoder-decoder."""

    FEATURES = (2, 4, 7, 9)  # indices in the SegNet's 10 block outputs

    def __init__(self, width_mult: float = 1.0, inputs: str = "features", nclass: int = 1,
                 no_residual: bool = False, no_img: bool = False):
        c128, c256, c512 = (scaled(c, width_mult) for c in (128, 256, 512))
        super().__init__([c256, c512, c128, nclass], width_mult, inputs, nclass,
                         no_residual=no_residual, no_img=no_img)

    def forward(self, x, feat, mc_drop: bool = False):
        """``feat``: the SegNet's 10 block outputs, of which ``FEATURES`` are read."""
        return super().forward(x, [feat[i] for i in self.FEATURES], mc_drop)
