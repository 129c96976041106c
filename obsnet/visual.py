"""Pictures for TensorBoard: class maps in the dataset's colours, scores in viridis."""
import matplotlib
import torch

_VIRIDIS = torch.tensor(matplotlib.colormaps["viridis"](range(256))[:, :3], dtype=torch.float32)


def colorize_labels(labels: torch.Tensor, colors) -> torch.Tensor:
    """B×H×W class ids -> B×3×H×W floats in [0, 1]; ids without a colour are black."""
    palette = torch.zeros(256, 3)
    palette[: len(colors)] = torch.tensor(colors, dtype=torch.float32) / 255
    return palette[labels.detach().cpu().long().clamp(0, 255)].permute(0, 3, 1, 2)


def viridis(maps: torch.Tensor, lo: float | None = None, hi: float | None = None) -> torch.Tensor:
    """B×H×W scores -> B×3×H×W viridis images; each map scaled to its own range by default.
    NaN (shown as the low end) and infinite scores never make an invalid colour index."""
    maps = torch.nan_to_num(maps.detach().float().cpu(), nan=0.0)
    maps = maps.clamp(torch.finfo(torch.float32).min / 4, torch.finfo(torch.float32).max / 4)
    flat = maps.flatten(1)
    lo_t = flat.min(1).values if lo is None else torch.full((len(maps),), lo)
    hi_t = flat.max(1).values if hi is None else torch.full((len(maps),), hi)
    scaled = (maps - lo_t.view(-1, 1, 1)) / (hi_t - lo_t).clamp_min(1e-12).view(-1, 1, 1)
    index = (scaled.clamp(0, 1) * 255).round().long()
    return _VIRIDIS[index].permute(0, 3, 1, 2)
