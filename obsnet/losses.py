"""Losses of the observer: weighted binary cross-entropy or focal loss, on logits."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class BinaryFocalLoss(nn.Module):
    """Focal loss (Lin et al., 2017) on logits; ``pos_weight`` weighs the positive pixels."""

    def __init__(self, gamma: float = 2.0, pos_weight: float = 1.0):
        super().__init__()
        self.gamma = gamma
        self.register_buffer("pos_weight", torch.tensor(float(pos_weight)))

    def forward(self, logits, target):
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        p_true = torch.exp(-bce)  # probability given to the true label
        weight = torch.where(target > 0.5, self.pos_weight, torch.ones_like(target))
        return (weight * (1 - p_true) ** self.gamma * bce).mean()


CRITERIA = {
    "bce": lambda pos_weight: nn.BCEWithLogitsLoss(pos_weight=torch.tensor([float(pos_weight)])),
    "focal": lambda pos_weight: BinaryFocalLoss(pos_weight=pos_weight),
}
