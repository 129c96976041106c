"""SML's two post-processing steps (Jung et al., ICCV 2021, Sec. 3.2-3.3), for ``sml_post``.

1. Boundary suppression. The class boundaries of the prediction are the pixels where the
   dilation of the class map (cross-shaped 3x3 element) differs from its erosion (square 3x3
   element), pixels outside the image ignored. Over ``iterations`` steps the boundary band
   is widened by ``width - 1, width - 2, ...`` pixels (L1 distance) and then by 0 at the last
   step; at each step every pixel of the band takes the mean of the scores of the non-band
   pixels of its 3x3 neighbourhood (border pixels replicated), and keeps its score when it has
   none. Scores thus flow from the inside of each region towards its boundary.
2. Dilated smoothing. A normalised 7x7 Gaussian (sigma 1) with dilation 6, borders replicated.

Both steps are linear in the score, so they apply to the negated SML (our ``sml``) as they do
to the SML itself. The defaults (width 4 in 4 steps, dilation 6) are the paper's.
"""
import torch
import torch.nn.functional as F


def _dilate_cross(mask: torch.Tensor) -> torch.Tensor:
    """Max over each pixel and its 4 neighbours (outside pixels ignored); N×1×H×W float."""
    vertical = F.max_pool2d(mask, (3, 1), stride=1, padding=(1, 0))
    horizontal = F.max_pool2d(mask, (1, 3), stride=1, padding=(0, 1))
    return torch.maximum(vertical, horizontal)


def class_boundaries(pred: torch.Tensor) -> torch.Tensor:
    """B×H×W bool: the pixels whose cross-dilation and square-erosion of ``pred`` differ."""
    x = pred[:, None].float()
    eroded = -F.max_pool2d(-x, 3, stride=1, padding=1)
    return (_dilate_cross(x) != eroded)[:, 0]


def widen(band: torch.Tensor, radius: int) -> torch.Tensor:
    """B×H×W bool ``band`` widened by ``radius`` pixels in L1 distance."""
    x = band[:, None].float()
    for _ in range(radius):
        x = _dilate_cross(x)
    return x[:, 0] > 0


def suppress_boundaries(score: torch.Tensor, pred: torch.Tensor, width: int = 4,
                        iterations: int = 4) -> torch.Tensor:
    """B×H×W ``score`` with its values on the class boundaries of ``pred`` replaced, band by
    shrinking band, by the mean of their non-band 3x3 neighbours (module docstring)."""
    if width % iterations:
        raise ValueError(f"boundary width {width} is not a multiple of {iterations} iterations")
    boundaries, step = class_boundaries(pred), width // iterations
    ones = torch.ones(1, 1, 3, 3, dtype=score.dtype, device=score.device)
    out = score
    for i in range(iterations):
        radius = 0 if i == iterations - 1 else width - step * i - 1
        inside = (~widen(boundaries, radius))[:, None].to(score.dtype)
        total = F.conv2d(F.pad(out[:, None] * inside, (1, 1, 1, 1), mode="replicate"), ones)
        count = F.conv2d(F.pad(inside, (1, 1, 1, 1), mode="replicate"), ones)
        mean = torch.where(count > 0, total / count.clamp(min=1), out[:, None])[:, 0]
        out = torch.where(inside[:, 0] > 0, out, mean)
    return out


def gaussian_kernel(size: int = 7, sigma: float = 1.0) -> torch.Tensor:
    """size×size Gaussian weights summing to 1."""
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def dilated_smoothing(score: torch.Tensor, dilation: int = 6, size: int = 7,
                      sigma: float = 1.0) -> torch.Tensor:
    """B×H×W ``score`` convolved with a dilated Gaussian, borders replicated."""
    pad = dilation * (size - 1) // 2
    kernel = gaussian_kernel(size, sigma).to(score.device, score.dtype)[None, None]
    padded = F.pad(score[:, None], (pad, pad, pad, pad), mode="replicate")
    return F.conv2d(padded, kernel, dilation=dilation)[:, 0]

