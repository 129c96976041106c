"""Uncertainty methods: each maps a batch to a B×H×W score, higher = more likely wrong/OOD.

Every method has the same signature ``fn(batch, cfg)`` and reuses the SegNet forward pass
stored in ``batch`` when it needs one.
"""
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm import tqdm


@dataclass
class EvalBatch:
    """What every method may read: inputs, networks and the shared SegNet forward."""

    images: torch.Tensor
    segnet: torch.nn.Module
    obsnet: torch.nn.Module | None
    feats: list  # the SegNet's 10 block outputs, logits last


@dataclass(frozen=True)
class MethodConfig:
    """Hyper-parameters of the methods (``--T``)."""

    mc_passes: int = 50
    progress: bool = False  # a progress bar over the MC dropout passes


@dataclass(frozen=True)
class Method:
    """A registered method; ``to_prob`` maps its score to a probability of error (ACE)."""

    fn: Callable
    to_prob: Callable
    uses_shared_forward: bool = True
    needs_obsnet: bool = False


def max_softmax_uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """1 - max softmax probability over the class dimension (B×C×H×W -> B×H×W)."""
    return 1 - torch.softmax(logits.float(), dim=1).amax(dim=1)


def obsnet_score(batch: EvalBatch, cfg: MethodConfig) -> torch.Tensor:
    """The observer's logit that the SegNet is wrong."""
    return batch.obsnet(batch.images, batch.feats).squeeze(1).float()


def mcp_score(batch: EvalBatch, cfg: MethodConfig) -> torch.Tensor:
    """Maximum class probability (Hendrycks & Gimpel), as an uncertainty."""
    return max_softmax_uncertainty(batch.feats[-1])


def mc_dropout_score(batch: EvalBatch, cfg: MethodConfig) -> torch.Tensor:
    """1 - max of the softmax averaged over ``mc_passes`` dropout passes (Gal & Ghahramani)."""
    mean = torch.zeros_like(batch.feats[-1], dtype=torch.float32)
    for _ in tqdm(range(cfg.mc_passes), desc="MC dropout passes", leave=False,
                  disable=not cfg.progress):
        mean += torch.softmax(batch.segnet(batch.images, mc_drop=True).float(), dim=1)
    return 1 - (mean / cfg.mc_passes).amax(dim=1)


def _identity(x):
    return x


METHODS: dict[str, Method] = {
    "obsnet": Method(obsnet_score, torch.sigmoid, needs_obsnet=True),
    "mcp": Method(mcp_score, _identity),
    "mc_dropout": Method(mc_dropout_score, _identity, uses_shared_forward=False),
}
ALIASES = {"mc_drop": "mc_dropout"}


def parse_methods(spec: str) -> list[str]:
    """Split ``--test_multi`` into registry names (aliases resolved, order kept, no repeats)."""
    names = []
    for raw in (s.strip() for s in spec.split(",")):
        name = ALIASES.get(raw, raw)
        if name not in METHODS:
            raise ValueError(f"--test_multi: unknown method '{raw}' "
                             f"(available: {', '.join(sorted(METHODS) + sorted(ALIASES))})")
        if name not in names:
            names.append(name)
    return names
