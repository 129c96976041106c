"""Building blocks shared by the SegNet and the observer networks.

Attribute names (``convN.cbr_unit``) follow the original project so that its checkpoints
load strictly.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def scaled(channels: int, width_mult: float) -> int:
    """Channel count of a layer at a given width multiplier (at least 1)."""
    return max(1, int(round(channels * width_mult)))


class ConvBNReLU(nn.Module):
    """3x3 convolution, batch norm, ReLU (``relu=False``: without the ReLU, same weights)."""

    def __init__(self, in_channels: int, out_channels: int, relu: bool = True):
        super().__init__()
        layers = [nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
                  nn.BatchNorm2d(out_channels)]
        self.cbr_unit = nn.Sequential(*layers, *([nn.ReLU(inplace=True)] if relu else []))

    def forward(self, x):
        return self.cbr_unit(x)


def _add_convs(module: nn.Module, channels: list[int], last_relu: bool = True) -> None:
    """Register conv1..convN as ConvBNReLU layers chaining ``channels`` (the last one without
    its ReLU unless ``last_relu``)."""
    pairs = list(zip(channels[:-1], channels[1:]))
    for i, (cin, cout) in enumerate(pairs, start=1):
        module.add_module(f"conv{i}", ConvBNReLU(cin, cout, relu=last_relu or i < len(pairs)))


class EncoderBlock(nn.Module):
    """``n_convs`` conv layers then a 2x2 max-pool that also returns its indices."""

    def __init__(self, in_channels: int, out_channels: int, n_convs: int):
        super().__init__()
        _add_convs(self, [in_channels] + [out_channels] * n_convs)
        self.n_convs = n_convs

    def forward(self, x):
        """Return (pooled map, pooling indices, shape before pooling)."""
        for i in range(1, self.n_convs + 1):
            x = getattr(self, f"conv{i}")(x)
        pooled, indices = F.max_pool2d(x, 2, 2, return_indices=True)
        return pooled, indices, x.shape


class DecoderBlock(nn.Module):
    """Upsampling (max-unpool with indices, or nearest x2 without) then ``n_convs`` conv layers.

    All layers keep ``in_channels`` except the last, which maps to ``out_channels``, with a
    ReLU unless ``last_relu`` is False.
    """

    def __init__(self, in_channels: int, out_channels: int, n_convs: int, last_relu: bool = True):
        super().__init__()
        _add_convs(self, [in_channels] * n_convs + [out_channels], last_relu)
        self.n_convs = n_convs

    def forward(self, x, indices=None, output_shape=None):
        if indices is None:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        else:
            x = F.max_unpool2d(x, indices, 2, 2, output_size=output_shape[-2:])
        for i in range(1, self.n_convs + 1):
            x = getattr(self, f"conv{i}")(x)
        return x


class EncoderDecoder(nn.Module):
    """The SegNet topology: five encoder blocks, five decoder blocks joined by pool indices.

    ``dropout`` gives the dropout rate applied after down3, down4, down5, up5, up4 and up3
    (the original's placement). ``forward`` optionally adds external feature maps (one per
    block, the SegNet's) to the input of every block after the first: the observer's path.
    """

    DROPOUT_AFTER = ("down3", "down4", "down5", "up5", "up4", "up3")

    def __init__(self, in_channels: int, out_channels: int, dropout: tuple, width_mult: float,
                 last_relu: bool = True):
        super().__init__()
        c64, c128, c256, c512 = (scaled(c, width_mult) for c in (64, 128, 256, 512))
        self.down1 = EncoderBlock(in_channels, c64, 2)
        self.down2 = EncoderBlock(c64, c128, 2)
        self.down3 = EncoderBlock(c128, c256, 3)
        self.down4 = EncoderBlock(c256, c512, 3)
        self.down5 = EncoderBlock(c512, c512, 3)
        self.up5 = DecoderBlock(c512, c512, 3)
        self.up4 = DecoderBlock(c512, c256, 3)
        self.up3 = DecoderBlock(c256, c128, 3)
        self.up2 = DecoderBlock(c128, c64, 2)
        self.up1 = DecoderBlock(c64, out_channels, 2, last_relu)
        self.dropout = dict(zip(self.DROPOUT_AFTER, dropout))

    def _drop(self, name, x, mc_drop):
        p = self.dropout.get(name, 0.0)
        if p == 0 or not (self.training or mc_drop):
            return x
        if self.training:
            return F.dropout(x, p, training=True)
        # Monte Carlo dropout: one mask per pass shared by the whole batch, so an image's
        # scores do not depend on the batch it comes in (same seed, same scores).
        keep = torch.rand((1, *x.shape[1:]), device=x.device) >= p
        return x * keep / (1 - p)

    def run(self, x, extra=None, mc_drop=False):
        """Forward pass; returns the 10 block outputs, down1 .. down5, up5 .. up1.

        ``extra``: 9 maps added to the inputs of down2 .. down5, up5 .. up1.
        ``mc_drop``: keep dropout active even in eval mode (Monte Carlo dropout).
        """
        names_down = ("down1", "down2", "down3", "down4", "down5")
        outputs, pools = [], []
        for i, name in enumerate(names_down):
            if i > 0 and extra is not None:
                x = x + extra[i - 1]
            x, indices, shape = getattr(self, name)(x)
            outputs.append(x)
            pools.append((indices, shape))
            x = self._drop(name, x, mc_drop)
        for i, name in enumerate(("up5", "up4", "up3", "up2", "up1")):
            if extra is not None:
                x = x + extra[4 + i]
            indices, shape = pools[4 - i]
            x = getattr(self, name)(x, indices, shape)
            outputs.append(x)
            x = self._drop(name, x, mc_drop)
        return outputs


def shared_dropout(x: torch.Tensor, p: float, training: bool, mc_drop: bool) -> torch.Tensor:
    """Dropout with the SegNet's rule (``EncoderDecoder._drop``): ordinary dropout in training;
    with ``mc_drop`` in eval mode, one mask per pass shared by the whole batch."""
    if p == 0 or not (training or mc_drop):
        return x
    if training:
        return F.dropout(x, p, training=True)
    keep = torch.rand((1, *x.shape[1:]), device=x.device) >= p
    return x * keep / (1 - p)


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 1,
                 dilation: int = 1, stride: int = 1) -> nn.Sequential:
    """Convolution (no bias, 'same' padding), batch norm, ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                  padding=dilation * (kernel_size // 2), dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def resize(x: torch.Tensor, size) -> torch.Tensor:
    """Bilinear resize to ``size`` (H, W); a no-op when the size already matches."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every eval-mode BatchNorm2d that directly follows a Conv2d in an nn.Sequential into
    that convolution (the BatchNorm becomes an Identity); returns ``model``, changed in place.
    A pair with a forward hook on either module (an observed layer) is left as it is.

    For a frozen network only: its outputs stay the same up to float rounding, while the
    forward and the attack's backward skip one pass over every feature map. The state_dict
    keys change, so fold after loading and copying weights, and never save the folded model.
    """
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            conv, bn = seq[i], seq[i + 1]
            observed = conv._forward_hooks or bn._forward_hooks  # e.g. a FeatureTap's layer
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and not bn.training \
                    and not observed:
                seq[i] = torch.nn.utils.fusion.fuse_conv_bn_eval(conv, bn)
                seq[i + 1] = nn.Identity()
    return model
