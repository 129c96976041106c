"""What an observer may read of the segmenter's output besides its block maps (``--obs_inputs``).

``features`` (the original): the image and the segmenter's block maps only. The mirror observer
adds the SegNet's first 9 block outputs along its path, never the logits, so it cannot even
reproduce the max-softmax baseline. ``maps``: three class-agnostic maps of the logits (1 - max
softmax, entropy / log C, free energy), and ``logits``: the log-softmax itself (C maps), each
batch-normalised and given with the observer's own last map to its final 1×1 convolution: the
observer's score is then at least a learnt linear mix of what the one-pass baselines see.
"""
import math

import torch
import torch.nn as nn

INPUTS = ("features", "logits", "maps")
DERIVED_MAPS = 3  # 1 - max softmax, normalised entropy, free energy


def derived_maps(logits: torch.Tensor) -> torch.Tensor:
    """B×3×H×W: 1 - max softmax, entropy / log C, and -logsumexp of B×C×H×W logits (float32)."""
    z = logits.float()
    log_p = torch.log_softmax(z, dim=1)
    p = log_p.exp()
    entropy = -(p * log_p).sum(dim=1) / math.log(max(z.shape[1], 2))
    return torch.stack([1 - p.amax(dim=1), entropy, -torch.logsumexp(z, dim=1)], dim=1)


def input_channels(inputs: str, nclass: int) -> int:
    """How many maps of the segmenter's output ``inputs`` adds to the observer's last layer."""
    if inputs not in INPUTS:
        raise ValueError(f"--obs_inputs {inputs}: unknown (available: {', '.join(INPUTS)})")
    return {"features": 0, "logits": nclass, "maps": DERIVED_MAPS}[inputs]


class OutputHead(nn.Conv2d):
    """The observer's final 1×1 convolution (its ``fc``), over its own last map and, for
    ``inputs`` other than ``features``, the batch-normalised maps of the segmenter's logits.

    A ``Conv2d`` itself, so that with ``features`` its keys are the original's ``fc.weight``
    and ``fc.bias`` and earlier checkpoints load unchanged; the maps' batch norm is ``fc.norm``.
    """

    def __init__(self, channels: int, inputs: str = "features", nclass: int = 0):
        extra = input_channels(inputs, nclass)
        super().__init__(channels + extra, 1, kernel_size=1)
        self.inputs = inputs
        self.norm = nn.BatchNorm2d(extra) if extra else None

    def forward(self, y: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        """One logit per pixel from the observer's map ``y`` (B×channels×H×W) and the
        segmenter's ``logits`` (B×C×h×w, resized to y's grid when they differ)."""
        if self.norm is None:
            return super().forward(y)
        z = derived_maps(logits) if self.inputs == "maps" else torch.log_softmax(logits.float(), 1)
        if z.shape[-2:] != y.shape[-2:]:
            z = nn.functional.interpolate(z, size=y.shape[-2:], mode="bilinear", align_corners=False)
        return super().forward(torch.cat([y, self.norm(z).to(y.dtype)], dim=1))
