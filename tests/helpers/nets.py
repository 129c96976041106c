"""Tiny SegNets and observers (width_mult 0.0625 or 0.125, 12 classes), in memory or saved."""
import torch
import torch.nn as nn

from obsnet.data.specs import SPECS
from obsnet.models.checkpoint import save_checkpoint
from obsnet.models.obsnet import Obsnet_Seg
from obsnet.models.registry import build_segmenter
from obsnet.models.segnet import SegNet, freeze


def tiny_nets(width_mult: float, observer_first: bool = False, observer_eval: bool = True,
              members: int = 0) -> tuple:
    """Seed 0, then a frozen SegNet and an observer (built first with ``observer_first``: the
    draws, hence the weights, differ), the observer in eval mode unless ``observer_eval`` is
    False; with ``members``, a third item: that many more frozen SegNets (an ensemble)."""
    torch.manual_seed(0)
    if observer_first:
        observer = Obsnet_Seg(3, 1, width_mult=width_mult)
        segnet = freeze(SegNet(3, 12, width_mult=width_mult))
    else:
        segnet = freeze(SegNet(3, 12, width_mult=width_mult))
        observer = Obsnet_Seg(3, 1, width_mult=width_mult)
    if observer_eval:
        observer.eval()
    if not members:
        return segnet, observer
    return segnet, observer, tuple(freeze(SegNet(3, 12, width_mult=width_mult)) for _ in range(members))


def segnet_file(path, width_mult=0.0625):
    """A freshly initialised SegNet checkpoint (no training needed to train an observer)."""
    torch.manual_seed(0)
    net = build_segmenter("segnet", SPECS["Synthetic"].nclass, width_mult)
    save_checkpoint(path, {"model": net.state_dict()})
    return path


def save_tiny_networks(root):
    """A freshly initialised tiny SegNet (``root/segnet.pth``) and observer
    (``root/obsnet/best.pth``), plain state_dicts; returns ``root``."""
    torch.manual_seed(0)
    save_checkpoint(root / "segnet.pth", {"model": SegNet(3, 12, width_mult=0.0625).state_dict()})
    save_checkpoint(root / "obsnet" / "best.pth",
                    {"model": Obsnet_Seg(3, 1, width_mult=0.0625).state_dict()})
    return root


def calibrate(forward, modules, size=(64, 96)) -> None:
    """Give every batch norm of ``modules`` the statistics of one random batch through
    ``forward`` (as training would), then put the modules in eval mode."""
    for module in modules:
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None
        module.train()
    with torch.no_grad():
        forward(torch.rand(4, 3, *size, generator=torch.Generator().manual_seed(1)))
    for module in modules:
        module.eval()
