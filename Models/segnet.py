"""SegNet: the frozen segmentation network whose failures the observer learns to predict."""
import torch.nn as nn

from Models.blocks import EncoderDecoder

SEGNET_DROPOUT = (0.5, 0.5, 0.5, 0.5, 0.4, 0.3)


class SegNet(EncoderDecoder):
    """VGG16-style encoder-decoder with max-pool indices (Badrinarayanan et al.).

    Args:
        input_channels: image channels (3).
        output_channels: number of classes.
        width_mult: scales every hidden channel count (1.0 = the original network).
    """

    def __init__(self, input_channels: int = 3, output_channels: int = 12, init_vgg: bool = False,
                 width_mult: float = 1.0):
        super().__init__(input_channels, output_channels, SEGNET_DROPOUT, width_mult)
        if init_vgg:
            raise ValueError("init_vgg: VGG16 initialisation is not available yet (--vgg_weights)")
        self.in_channels, self.n_classes = input_channels, output_channels

    def forward(self, x, mc_drop: bool = False, return_feat: bool = False):
        """Class logits B×C×H×W, or the list of the 10 block outputs (logits last)."""
        feats = self.run(x, mc_drop=mc_drop)
        return feats if return_feat else feats[-1]


def freeze(model: nn.Module) -> nn.Module:
    """Put a model in eval mode with no parameter requiring gradients."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
