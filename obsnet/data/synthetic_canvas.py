"""The pixels of the synthetic road scenes (``obsnet.data.synthetic_scenes``): CamVid's label
ids, colour palettes, the ``Canvas`` every painter draws on (textured fills through shared
noise fields), shape masks, and the global camera effects applied once the scene is painted."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from obsnet.data.specs import SPECS

SPEC = SPECS["Synthetic"]
(SKY, BUILDING, POLE, ROAD, SIDEWALK, TREE, SIGN, FENCE, CAR, PEDESTRIAN, BICYCLIST,
 VOID) = range(12)
OOD_ID = SPEC.anomaly_ids[0]


def _rgb(*colours) -> np.ndarray:
    return np.array(colours, np.float32) / 255.0


# Base colours per material; several overlap across classes on purpose (greys everywhere).
PALETTES = {
    "sky": _rgb((115, 155, 210), (170, 195, 228), (196, 200, 206), (212, 202, 182),
                (150, 160, 175)),
    "building": _rgb((140, 140, 140), (190, 175, 145), (150, 90, 70), (212, 210, 200),
                     (92, 92, 98), (198, 182, 120), (115, 132, 158), (168, 120, 92)),
    "glass": _rgb((50, 58, 72), (88, 102, 118), (32, 32, 36), (132, 142, 152)),
    "road": _rgb((100, 100, 104), (124, 122, 122), (82, 82, 86), (138, 134, 126)),
    "marking": _rgb((222, 222, 215), (215, 195, 90)),
    "sidewalk": _rgb((155, 155, 155), (178, 166, 148), (150, 115, 100), (122, 122, 128),
                     (165, 160, 138)),
    "foliage": _rgb((60, 100, 40), (90, 115, 50), (115, 125, 65), (50, 75, 40),
                    (140, 115, 50)),
    "trunk": _rgb((90, 65, 45), (76, 76, 70), (110, 90, 70)),
    "pole": _rgb((130, 130, 130), (75, 75, 75), (165, 165, 155), (88, 104, 88),
                 (148, 148, 160)),
    "sign": _rgb((205, 40, 40), (40, 75, 190), (230, 205, 50), (230, 230, 230),
                 (30, 130, 75)),
    "fence": _rgb((125, 95, 65), (140, 140, 140), (65, 65, 65), (212, 212, 212),
                  (80, 115, 80)),
    "car": _rgb((180, 35, 35), (40, 60, 150), (225, 225, 225), (30, 30, 30), (160, 160, 165),
                (40, 85, 55), (220, 190, 40), (110, 110, 120)),
    "tyre": _rgb((25, 25, 25), (45, 45, 45)),
    "cloth": _rgb((35, 35, 40), (55, 70, 120), (170, 40, 45), (220, 220, 215),
                  (180, 160, 120), (90, 90, 90), (60, 90, 60)),
    "skin": _rgb((225, 185, 150), (170, 120, 90), (110, 75, 55), (60, 45, 35)),
}
# In-distribution palettes the unseen objects take their colours from.
OOD_PALETTES = ("building", "sidewalk", "trunk", "fence", "car", "cloth", "skin", "pole")


# ----------------------------------------------------------------------------- drawing

def smooth_noise(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """Unit-variance noise field, bilinear interpolation of a random grid of ``cell`` px."""
    g = rng.standard_normal((h // cell + 2, w // cell + 2)).astype(np.float32)
    ys, xs = np.arange(h) / cell, np.arange(w) / cell
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None].astype(np.float32), (xs - x0)[None, :].astype(np.float32)
    top = g[y0][:, x0] * (1 - fx) + g[y0][:, x0 + 1] * fx
    bottom = g[y0 + 1][:, x0] * (1 - fx) + g[y0 + 1][:, x0 + 1] * fx
    out = top * (1 - fy) + bottom * fy
    return out / (out.std() + 1e-6)


class Canvas:
    """An image and its label map under construction, with shared coordinate grids and
    noise fields; every painter draws through :meth:`fill`."""

    def __init__(self, h: int, w: int, rng: np.random.Generator):
        self.h, self.w = h, w
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        self.yy, self.xx = yy + 0.5, xx + 0.5  # pixel centres
        self.img = np.zeros((h, w, 3), np.float32)
        self.lab = np.full((h, w), VOID, np.uint8)
        self.fine = rng.standard_normal((h, w)).astype(np.float32)
        self.medium = smooth_noise(rng, h, w, 3)
        self.coarse = smooth_noise(rng, h, w, 10)

    def rolled(self, rng: np.random.Generator, name: str) -> np.ndarray:
        """One of the noise fields ("fine", "medium", "coarse") at a random offset."""
        shift = (int(rng.integers(self.h)), int(rng.integers(self.w)))
        return np.roll(getattr(self, name), shift, (0, 1))

    def fill(self, rng, mask, colour, cls, grain=0.03, blotch=0.04):
        """Paint ``colour`` (RGB, or an H×W×3 array) plus texture where ``mask``; label it."""
        if not mask.any():
            return
        col = colour[mask] if colour.ndim == 3 else colour[None, :]
        tex = grain * self.rolled(rng, "fine")[mask] + blotch * self.rolled(rng, "coarse")[mask]
        self.img[mask] = np.clip(col + tex[:, None], 0.0, 1.0)
        self.lab[mask] = cls


def box(cv: Canvas, x0, y0, x1, y1) -> np.ndarray:
    """Axis-aligned rectangle, at least one pixel wide and high."""
    if x1 - x0 < 1:
        x0, x1 = (x0 + x1) / 2 - 0.5, (x0 + x1) / 2 + 0.5
    if y1 - y0 < 1:
        y0, y1 = (y0 + y1) / 2 - 0.5, (y0 + y1) / 2 + 0.5
    return (cv.xx >= x0) & (cv.xx < x1) & (cv.yy >= y0) & (cv.yy < y1)


def ellipse(cv: Canvas, cx, cy, rx, ry) -> np.ndarray:
    """Filled ellipse (radii of at least 0.6 px)."""
    rx, ry = max(rx, 0.6), max(ry, 0.6)
    return ((cv.xx - cx) / rx) ** 2 + ((cv.yy - cy) / ry) ** 2 <= 1.0


def segment(cv: Canvas, x0, y0, x1, y1, r) -> np.ndarray:
    """Thick line segment of half-width ``r`` (at least 0.55 px)."""
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((cv.xx - x0) * dx + (cv.yy - y0) * dy) / (dx * dx + dy * dy + 1e-6), 0, 1)
    return (cv.xx - x0 - t * dx) ** 2 + (cv.yy - y0 - t * dy) ** 2 <= max(r, 0.55) ** 2


def polygon(cv: Canvas, points) -> np.ndarray:
    """Filled polygon through ``points`` [(x, y), ...] (canvas coordinates)."""
    im = Image.new("L", (cv.w, cv.h), 0)
    ImageDraw.Draw(im).polygon([(float(x) - 0.5, float(y) - 0.5) for x, y in points], fill=1)
    return np.asarray(im, dtype=bool)


def pick(rng: np.random.Generator, palette: str, jitter: float = 0.08) -> np.ndarray:
    """A colour of ``palette`` with per-object brightness and per-channel jitter."""
    base = PALETTES[palette][rng.integers(len(PALETTES[palette]))]
    col = base * (1 + rng.normal(0, jitter)) + rng.normal(0, jitter / 2, 3)
    return np.clip(col, 0, 1).astype(np.float32)


# ----------------------------------------------------------------------------- photometry

def sample_photometric(rng, h: int, w: int) -> dict:
    """Global camera effects of one scene (shared by its test and test_ood versions)."""
    return {"blur": int(rng.choice(3, p=[0.65, 0.25, 0.1])),
            "contrast": rng.uniform(0.7, 1.2), "brightness": rng.uniform(-0.12, 0.12),
            "cast": rng.normal(0, 0.05, 3).astype(np.float32),
            "sigma": rng.uniform(0.01, 0.045),
            "noise": rng.standard_normal((h, w, 3)).astype(np.float32)}


def blur(img: np.ndarray, passes: int) -> np.ndarray:
    """``passes`` separable [1, 2, 1] / 4 smoothings (radius ``passes`` px)."""
    for _ in range(passes):
        p = np.pad(img, ((1, 1), (0, 0), (0, 0)), mode="edge")
        img = (p[:-2] + 2 * p[1:-1] + p[2:]) / 4
        p = np.pad(img, ((0, 0), (1, 1), (0, 0)), mode="edge")
        img = (p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]) / 4
    return img


def apply_photometric(img: np.ndarray, p: dict) -> np.ndarray:
    """Blur, contrast, brightness, colour cast and Gaussian noise; returns uint8 RGB."""
    img = blur(img, p["blur"])
    img = ((img - 0.5) * p["contrast"] + 0.5 + p["brightness"]) * (1 + p["cast"])
    img = img + p["sigma"] * p["noise"]
    return np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)
