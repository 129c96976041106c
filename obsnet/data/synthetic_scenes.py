"""Synthetic road scenes with CamVid labels, and their OOD versions: the drawing half of
``obsnet.data.synthetic`` (which writes them to disk in the CamVid layout).

The generator draws small perspective street scenes (sky, skyline, building facades with
windows, a road with lane markings, sidewalks, trees, poles with signs, fences, cars,
pedestrians, bicyclists, unlabeled clutter) straight into numpy arrays, with pixel-exact
CamVid labels (0 Sky .. 10 Bicyclist, 11 Void). ``test_ood`` holds the same scenes as
``test`` with 1-3 unseen objects (four-legged animals, irregular striped debris) inserted
on the road or sidewalk; they carry the anomaly id (12) in ``testannot_ood``.

Fairness of the OOD objects (they must not be detectable by a trick that the
in-distribution data never shows):

- their colours are drawn from the in-distribution class palettes (buildings, cars,
  clothes, tree trunks, fences, ...) with the same per-object colour jitter;
- they are textured by the same fill routine as every other object (the same fine grain,
  the same low-frequency blotches, stripes and spots built from the same noise fields);
- they are painted in depth order *before* the global photometric pipeline (blur,
  contrast, brightness, colour cast, Gaussian pixel noise), which is drawn once per scene
  and applied identically to the ``test`` and ``test_ood`` versions; hence both images
  are equal away from the anomaly (up to the blur radius) and the anomaly gets exactly
  the noise level and colour cast of its surroundings;
- nearer scene objects occlude them as they occlude each other.

Every random choice goes through ``numpy.random.Generator`` streams derived from
``SeedSequence([seed, split, index])``: the same seed gives byte-identical files, and an
image does not depend on how many others are generated.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from obsnet.data.specs import SPECS

SPEC = SPECS["Synthetic"]
VERSION = 1  # bump when the drawing changes: cached datasets are then regenerated
(SKY, BUILDING, POLE, ROAD, SIDEWALK, TREE, SIGN, FENCE, CAR, PEDESTRIAN, BICYCLIST,
 VOID) = range(12)
OOD_ID = SPEC.anomaly_ids[0]
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
MIN_OOD_SHARE, MAX_OOD_TRIES = 0.004, 8  # visible anomaly per test_ood image
CAM_H = 2.0  # camera height in metres: pixels per metre at row y is (y - horizon) / CAM_H


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


# ----------------------------------------------------------------------------- layout

@dataclass(frozen=True)
class Layout:
    """Perspective frame of a scene: horizon row, vanishing point and, for the road edges
    and the outer sidewalk edges, where their lines cross the bottom row."""

    h: int
    w: int
    hz: float
    vx: float
    road: tuple[float, float]
    outer: tuple[float, float]

    def at(self, bottom_x: float, y):
        """x of the line from the vanishing point to (bottom_x, h) at row(s) y."""
        return self.vx + (bottom_x - self.vx) * (y - self.hz) / (self.h - self.hz)

    def ppm(self, y: float) -> float:
        """Pixels per metre of an upright object standing at row y."""
        return max(y - self.hz, 0.0) / CAM_H


def sample_layout(rng: np.random.Generator, h: int, w: int) -> Layout:
    """Horizon, vanishing point, road and sidewalk widths of one scene."""
    hz, vx = h * rng.uniform(0.3, 0.5), w * rng.uniform(0.3, 0.7)
    road = (w * rng.uniform(-0.35, 0.2), w * rng.uniform(0.8, 1.35))
    outer = (road[0] - w * rng.uniform(0.15, 0.7), road[1] + w * rng.uniform(0.15, 0.7))
    return Layout(h, w, float(hz), float(vx), road, outer)


def ground_rows(cv: Canvas, lay: Layout) -> np.ndarray:
    """Per pixel: the row where the outer sidewalk edge of its side of the image lies."""
    out = np.where(cv.xx < lay.vx, lay.outer[0], lay.outer[1])
    return lay.hz + (cv.xx - lay.vx) * (lay.h - lay.hz) / (out - lay.vx)


# ----------------------------------------------------------------------------- static layers

def paint_sky(cv: Canvas, lay: Layout, rng) -> None:
    """Sky above the horizon: vertical gradient plus clouds."""
    top, low = pick(rng, "sky") * 0.85, pick(rng, "sky")
    t = np.clip(cv.yy / lay.hz, 0, 1)[..., None]
    cv.fill(rng, cv.yy < lay.hz, top + (low - top) * t, SKY, grain=0.015,
            blotch=rng.uniform(0.02, 0.08))


def paint_skyline(cv: Canvas, lay: Layout, rng) -> None:
    """Distant buildings and tree tops standing on the horizon, hazy."""
    haze = cv.img[max(int(lay.hz) - 1, 0), int(np.clip(lay.vx, 0, cv.w - 1))]
    for _ in range(rng.integers(3, 12)):
        x, bw = rng.uniform(0, cv.w), cv.w * rng.uniform(0.03, 0.18)
        top = lay.hz - lay.hz * rng.uniform(0.03, 0.35)
        col = 0.65 * pick(rng, "building") + 0.35 * haze
        cv.fill(rng, box(cv, x - bw / 2, top, x + bw / 2, lay.hz + 1), col, BUILDING)
    for _ in range(rng.integers(0, 4)):
        r = lay.hz * rng.uniform(0.04, 0.15)
        mask = ellipse(cv, rng.uniform(0, cv.w), lay.hz - r * 0.5, r * 1.4, r)
        mask &= cv.yy < lay.hz + 1
        cv.fill(rng, mask, 0.7 * pick(rng, "foliage") + 0.3 * haze, TREE, grain=0.05)


def paint_ground(cv: Canvas, lay: Layout, rng) -> None:
    """Road with lane markings and kerbs, sidewalks with paving joints."""
    below, d = cv.yy >= lay.hz, np.maximum(cv.yy - lay.hz, 0.5)
    left, right = lay.at(lay.road[0], cv.yy), lay.at(lay.road[1], cv.yy)
    road = below & (cv.xx >= left) & (cv.xx < right)
    walk_col = pick(rng, "sidewalk")
    cv.fill(rng, below & ~road, walk_col, SIDEWALK, grain=0.035)
    joints = below & ~road & (np.mod(60.0 / d, 1.0) < 0.12)
    cv.fill(rng, joints, walk_col * 0.85, SIDEWALK)
    kerb = below & ~road & ((np.abs(cv.xx - left) < d * 0.08) | (np.abs(cv.xx - right) < d * 0.08))
    cv.fill(rng, kerb, walk_col * 1.12, SIDEWALK)
    cv.fill(rng, road, pick(rng, "road"), ROAD, grain=0.04, blotch=0.03)
    paint = pick(rng, "marking")
    width = np.maximum(d * rng.uniform(0.04, 0.08), 0.45)
    mid = lay.at((lay.road[0] + lay.road[1]) / 2, cv.yy)
    dashes = np.mod(rng.uniform(20, 60) / d + rng.uniform(), 1.0) < rng.uniform(0.3, 0.7)
    cv.fill(rng, road & (np.abs(cv.xx - mid) < width) & dashes, paint, ROAD)
    if rng.random() < 0.5:
        edge = np.abs(cv.xx - left - 3 * width) < width
        edge |= np.abs(cv.xx - right + 3 * width) < width
        cv.fill(rng, road & edge, paint, ROAD)


def paint_facade(cv: Canvas, lay: Layout, rng, mask, yg, depth) -> None:
    """One building: a facade between the ground line ``yg`` and its roof, with windows."""
    height_m = rng.uniform(4, 18)
    facade = mask & (cv.yy >= yg - height_m * (yg - lay.hz) / CAM_H)
    cv.fill(rng, facade, pick(rng, "building"), BUILDING, grain=0.03, blotch=0.05)
    v = (yg - cv.yy) / np.maximum(yg - lay.hz, 1e-3) * CAM_H  # metres above the ground
    floor, pitch = rng.uniform(2.6, 3.6), rng.uniform(2.0, 4.5)
    lo, hi = sorted(rng.uniform(0.15, 0.85, 2))
    windows = (np.mod(v / floor, 1) > 0.3) & (np.mod(v / floor, 1) < 0.8)
    windows &= (np.mod(depth / pitch, 1) > lo) & (np.mod(depth / pitch, 1) < max(hi, lo + 0.25))
    glass = pick(rng, "glass")
    cv.fill(rng, facade & windows & (v > floor * 0.9), glass, BUILDING, grain=0.03)
    if rng.random() < 0.4:  # shop front
        cv.fill(rng, facade & (v > 0.3) & (v < 2.4), glass * 1.1, BUILDING, grain=0.03)


def paint_verge(cv: Canvas, lay: Layout, rng, mask) -> None:
    """Beyond the sidewalk without a building: grass and bushes (Tree) or more pavement."""
    below = mask & (cv.yy >= lay.hz)
    if rng.random() < 0.65:
        cv.fill(rng, below, pick(rng, "foliage") * 0.9, TREE, grain=0.06, blotch=0.06)
    else:
        cv.fill(rng, below, pick(rng, "sidewalk"), SIDEWALK, grain=0.035)


def paint_fence(cv: Canvas, lay: Layout, rng, mask, yg, depth) -> None:
    """A fence along the ground line: posts and rails over darker slats."""
    height_m = rng.uniform(0.8, 1.8)
    strip = mask & (cv.yy < yg) & (cv.yy >= yg - height_m * (yg - lay.hz) / CAM_H)
    col = pick(rng, "fence")
    cv.fill(rng, strip, col * rng.uniform(0.55, 0.8), FENCE, grain=0.04)
    v = (yg - cv.yy) / np.maximum(yg - lay.hz, 1e-3) * CAM_H
    posts = np.mod(depth / rng.uniform(0.4, 2.0), 1) < 0.35
    rails = np.mod(v / (height_m / rng.integers(2, 4)), 1) < 0.25
    cv.fill(rng, strip & (posts | rails), col, FENCE, grain=0.04)


def paint_sides(cv: Canvas, lay: Layout, rng) -> None:
    """Both sides beyond the sidewalks, split in depth into buildings, verges and fences."""
    yg = ground_rows(cv, lay)
    depth = 0.9 * cv.w * CAM_H / np.maximum(yg - lay.hz, 1e-3)  # metres along the street
    for side in (cv.xx < lay.vx, cv.xx >= lay.vx):
        cuts = np.sort(rng.uniform(2, 40, rng.integers(0, 4)))
        for near, far in zip(np.r_[0.0, cuts], np.r_[cuts, np.inf]):
            part = side & (depth >= near) & (depth < far) & (cv.yy < yg)
            if rng.random() < 0.75:
                paint_facade(cv, lay, rng, part, yg, depth)
            else:
                paint_verge(cv, lay, rng, part)
            if rng.random() < 0.3:
                paint_fence(cv, lay, rng, part, yg, depth)


def paint_hood(cv: Canvas, lay: Layout, rng) -> None:
    """Sometimes the ego car's bonnet at the bottom of the frame (Void, as in CamVid)."""
    if rng.random() < 0.3:
        bulge = 1 - ((cv.xx - cv.w / 2) / (cv.w / 2)) ** 2
        top = cv.h - cv.h * rng.uniform(0.02, 0.06) * (0.4 + bulge)
        cv.fill(rng, cv.yy >= top, pick(rng, "car") * 0.6, VOID, grain=0.02)


STATIC_LAYERS = (paint_sky, paint_skyline, paint_ground, paint_sides)
OVERLAYS = (paint_hood,)  # painted after every object


# ----------------------------------------------------------------------------- objects

def paint_tree(cv: Canvas, rng, x, yb, ppm) -> None:
    """Trunk and a crown of a few overlapping textured blobs."""
    trunk_h, trunk_w = rng.uniform(1.5, 3.0) * ppm, rng.uniform(0.2, 0.45) * ppm
    cv.fill(rng, box(cv, x - trunk_w / 2, yb - trunk_h - ppm, x + trunk_w / 2, yb),
            pick(rng, "trunk"), TREE)
    r, cy = rng.uniform(1.2, 2.8) * ppm, yb - trunk_h
    crown = np.zeros_like(cv.lab, dtype=bool)
    for _ in range(rng.integers(2, 5)):
        crown |= ellipse(cv, x + rng.normal(0, 0.45) * r, cy - r * rng.uniform(0.3, 1.0),
                         r * rng.uniform(0.6, 1.0), r * rng.uniform(0.5, 0.9))
    col = pick(rng, "foliage")
    cv.fill(rng, crown, col, TREE, grain=0.07, blotch=0.07)
    cv.fill(rng, crown & (cv.rolled(rng, "medium") > 0.5), col * 0.72, TREE, grain=0.07)


def paint_sign(cv: Canvas, rng, x, y, ppm) -> None:
    """A sign plate of a random shape, optionally with a border."""
    r = rng.uniform(0.3, 0.5) * ppm
    shape = SIGN_SHAPES[list(SIGN_SHAPES)[rng.integers(len(SIGN_SHAPES))]]
    cv.fill(rng, shape(cv, x, y, r), pick(rng, "sign"), SIGN, grain=0.02)
    if rng.random() < 0.5:
        cv.fill(rng, shape(cv, x, y, r * 0.65), pick(rng, "sign"), SIGN, grain=0.02)


SIGN_SHAPES = {
    "circle": lambda cv, x, y, r: ellipse(cv, x, y, r, r),
    "rect": lambda cv, x, y, r: box(cv, x - r * 1.2, y - r * 0.8, x + r * 1.2, y + r * 0.8),
    "diamond": lambda cv, x, y, r: np.abs(cv.xx - x) + np.abs(cv.yy - y) <= max(r * 1.3, 0.8),
    "triangle": lambda cv, x, y, r: (cv.yy <= y + r * 0.8)
    & (np.abs(cv.xx - x) <= (cv.yy - y + r) * 0.6 + 0.3),
}


def paint_pole(cv: Canvas, rng, x, yb, ppm) -> None:
    """Thin vertical pole, sometimes a lamp arm, often a sign."""
    h, w = rng.uniform(3.5, 7.0) * ppm, rng.uniform(0.1, 0.2) * ppm
    col = pick(rng, "pole")
    mask = box(cv, x - w / 2, yb - h, x + w / 2, yb)
    if rng.random() < 0.35:
        arm = rng.choice([-1, 1]) * rng.uniform(0.8, 1.6) * ppm
        mask |= segment(cv, x, yb - h, x + arm, yb - h + 0.2 * ppm, w / 2)
    cv.fill(rng, mask, col, POLE, grain=0.02)
    if rng.random() < 0.7:
        paint_sign(cv, rng, x, yb - rng.uniform(2.0, min(h / ppm - 0.3, 3.3)) * ppm, ppm)


def paint_car(cv: Canvas, rng, x, yb, ppm) -> None:
    """Car seen from behind (narrow) or from the side (long): body, cabin, windows, wheels."""
    length, h = rng.uniform(1.7, 4.4) * ppm, rng.uniform(1.35, 1.7) * ppm
    side, body = length > 2.6 * ppm, pick(rng, "car")
    x0, x1 = x - length / 2, x + length / 2
    inset = (0.2 if side else 0.07) * length
    cv.fill(rng, box(cv, x0, yb - 0.6 * h, x1, yb - 0.12 * h), body, CAR, grain=0.025)
    cv.fill(rng, box(cv, x0 + inset, yb - h, x1 - inset, yb - 0.58 * h), body, CAR, grain=0.025)
    glass = box(cv, x0 + inset + 0.05 * length, yb - 0.93 * h, x1 - inset - 0.05 * length,
                yb - 0.63 * h)
    if side:
        glass &= np.abs(cv.xx - x) > 0.03 * length
    cv.fill(rng, glass, pick(rng, "glass"), CAR, grain=0.03)
    tyre, wr = pick(rng, "tyre"), 0.33 * ppm
    if side:
        wheels = ellipse(cv, x0 + 0.2 * length, yb - wr, wr, wr)
        wheels |= ellipse(cv, x1 - 0.2 * length, yb - wr, wr, wr)
    else:
        wheels = box(cv, x0 + 0.04 * length, yb - 0.2 * h, x0 + 0.2 * length, yb)
        wheels |= box(cv, x1 - 0.2 * length, yb - 0.2 * h, x1 - 0.04 * length, yb)
        lights = box(cv, x0, yb - 0.5 * h, x0 + 0.12 * length, yb - 0.4 * h)
        lights |= box(cv, x1 - 0.12 * length, yb - 0.5 * h, x1, yb - 0.4 * h)
        cv.fill(rng, lights, PALETTES["sign"][0], CAR, grain=0.03)
    cv.fill(rng, wheels, tyre, CAR, grain=0.02)


def paint_person(cv: Canvas, rng, x, yb, h, cls) -> None:
    """Legs, torso, arms and head of a standing person of height ``h`` px."""
    w, stride = h * rng.uniform(0.22, 0.3), h * rng.uniform(0.0, 0.12)
    legs = segment(cv, x - w * 0.18, yb - 0.48 * h, x - w * 0.18 - stride, yb - 0.02 * h, w * 0.14)
    legs |= segment(cv, x + w * 0.18, yb - 0.48 * h, x + w * 0.18 + stride, yb - 0.02 * h, w * 0.14)
    cv.fill(rng, legs, pick(rng, "cloth"), cls, grain=0.03)
    torso = box(cv, x - w / 2, yb - 0.82 * h, x + w / 2, yb - 0.45 * h)
    torso |= segment(cv, x - w / 2, yb - 0.8 * h, x - w * 0.6, yb - 0.5 * h, w * 0.12)
    torso |= segment(cv, x + w / 2, yb - 0.8 * h, x + w * 0.6, yb - 0.5 * h, w * 0.12)
    cv.fill(rng, torso, pick(rng, "cloth"), cls, grain=0.03)
    head = ellipse(cv, x, yb - 0.9 * h, 0.07 * h, 0.085 * h)
    cv.fill(rng, head, pick(rng, "skin"), cls, grain=0.02)
    if rng.random() < 0.7:
        cv.fill(rng, head & (cv.yy < yb - 0.92 * h), pick(rng, "cloth") * 0.6, cls)


def paint_pedestrian(cv: Canvas, rng, x, yb, ppm) -> None:
    """A standing or walking person (Pedestrian)."""
    paint_person(cv, rng, x, yb, rng.uniform(1.45, 1.9) * ppm, PEDESTRIAN)


def paint_bicyclist(cv: Canvas, rng, x, yb, ppm) -> None:
    """A rider on a bicycle, seen from the side (two wheels) or from behind (one)."""
    r, frame = 0.34 * ppm, pick(rng, "pole" if rng.random() < 0.5 else "car")
    thick = max(0.06 * ppm, 0.5)
    if rng.random() < 0.6:
        d = rng.choice([-1, 1]) * 0.55 * ppm
        bike = np.zeros_like(cv.lab, dtype=bool)
        for cx in (x - d, x + d):
            inner = r - 2 * thick
            bike |= ellipse(cv, cx, yb - r, r, r) & ~ellipse(cv, cx, yb - r, inner, inner)
        bike |= segment(cv, x - d, yb - r, x, yb - 2.4 * r, thick)
        bike |= segment(cv, x + d, yb - r, x + 0.8 * d, yb - 3 * r, thick)
        bike |= segment(cv, x - d * 0.2, yb - 2.4 * r, x + 0.8 * d, yb - 2.6 * r, thick)
    else:
        bike = box(cv, x - thick, yb - 2 * r, x + thick, yb)
        bike |= box(cv, x - 0.3 * ppm, yb - 2.9 * r, x + 0.3 * ppm, yb - 2.7 * r)
    cv.fill(rng, bike, frame, BICYCLIST, grain=0.02)
    paint_person(cv, rng, x, yb - 0.55 * ppm, rng.uniform(1.2, 1.4) * ppm, BICYCLIST)


def paint_clutter(cv: Canvas, rng, x, yb, ppm) -> None:
    """Unlabeled street clutter (bins, boxes, bags, bollards): Void."""
    w, h = rng.uniform(0.4, 1.5) * ppm, rng.uniform(0.4, 1.5) * ppm
    jag = rng.uniform(-0.15, 0.15, (4, 2)) * np.array([w, h])
    corners = np.array([[-w / 2, -h], [w / 2, -h], [w / 2, 0], [-w / 2, 0]]) + jag
    mask = polygon(cv, corners + np.array([x, yb]))
    cv.fill(rng, mask, pick(rng, list(PALETTES)[rng.integers(len(PALETTES))]), VOID,
            grain=rng.uniform(0.02, 0.06))


# ----------------------------------------------------------------------------- OOD objects

def paint_animal(cv: Canvas, rng, x, yb, ppm, size_m) -> None:
    """A four-legged animal: body, legs, neck, head, ears, tail; sometimes spotted."""
    length, d = size_m * ppm, rng.choice([-1, 1])
    leg, bh, lw = length * rng.uniform(0.3, 0.75), length * rng.uniform(0.3, 0.5), length * 0.09
    cy = yb - leg - bh * 0.35
    mask = ellipse(cv, x, cy, length / 2, bh / 2)
    for fx in (-0.38, -0.24, 0.24, 0.38):
        foot = x + fx * length + rng.normal(0, 0.05) * length
        mask |= segment(cv, x + fx * length, cy, foot, yb - lw / 2, lw / 2)
    hx, hy = x + d * length * rng.uniform(0.5, 0.7), cy - bh * rng.uniform(0.2, 1.4)
    mask |= segment(cv, x + d * length * 0.35, cy, hx, hy, bh * 0.22)
    mask |= ellipse(cv, hx + d * length * 0.1, hy, length * 0.14, length * 0.09)
    mask |= ellipse(cv, hx - d * length * 0.02, hy - length * 0.08, length * 0.03, length * 0.06)
    tail = (x - d * length * 0.75, cy + bh * rng.uniform(-0.8, 0.9))
    mask |= segment(cv, x - d * length * 0.48, cy - bh * 0.2, *tail, max(length * 0.025, 0.5))
    cv.fill(rng, mask, pick(rng, OOD_PALETTES[rng.integers(len(OOD_PALETTES))]), OOD_ID)
    if rng.random() < 0.5:
        spots = mask & (cv.rolled(rng, "medium") > rng.uniform(0.3, 1.0))
        cv.fill(rng, spots, pick(rng, OOD_PALETTES[rng.integers(len(OOD_PALETTES))]), OOD_ID)


def paint_debris(cv: Canvas, rng, x, yb, ppm, size_m) -> None:
    """Lost cargo / rubble: an irregular polygon with straps or stripes."""
    w = size_m * ppm
    h = w * rng.uniform(0.45, 0.9)
    angles = np.sort(rng.uniform(0, 2 * np.pi, rng.integers(6, 11)))
    radii = rng.uniform(0.6, 1.0, angles.size)
    pts = np.c_[x + np.cos(angles) * radii * w / 2, yb - h / 2 + np.sin(angles) * radii * h / 2]
    mask = polygon(cv, pts)
    cv.fill(rng, mask, pick(rng, OOD_PALETTES[rng.integers(len(OOD_PALETTES))]), OOD_ID)
    theta, period = rng.uniform(0, np.pi), rng.uniform(0.15, 0.5) * w
    across = (cv.xx * np.cos(theta) + cv.yy * np.sin(theta)) / period
    stripes = np.mod(across, 1) < rng.uniform(0.2, 0.5)
    cv.fill(rng, mask & stripes, pick(rng, OOD_PALETTES[rng.integers(len(OOD_PALETTES))]), OOD_ID)


# kind -> (painter, count range, where it stands); regions are defined in `lateral`.
OBJECTS = {
    "tree": (paint_tree, (0, 4), ("outer", "sidewalk")),
    "pole": (paint_pole, (0, 4), ("kerb",)),
    "car": (paint_car, (0, 4), ("road", "road", "road_edge")),
    "pedestrian": (paint_pedestrian, (0, 4), ("sidewalk", "sidewalk", "sidewalk", "road")),
    "bicyclist": (paint_bicyclist, (0, 2), ("road_edge",)),
    "clutter": (paint_clutter, (1, 4), ("sidewalk", "outer")),
}
# kind -> (painter, silhouette area / size_px**2, size range in metres)
OOD_OBJECTS = {
    "animal": (paint_animal, 0.55, (0.6, 2.2)),
    "debris": (paint_debris, 0.45, (0.4, 1.6)),
}
PAINTERS = {k: v[0] for k, v in {**OBJECTS, **OOD_OBJECTS}.items()}


@dataclass(frozen=True)
class Item:
    """One object of a scene: painted in order of ``yb`` (far first), with its own stream."""

    yb: float
    order: int
    kind: str
    x: float
    seed: int
    extra: dict = field(default_factory=dict)


def lateral(rng, lay: Layout, y: float, where: str) -> float:
    """x of an object standing at row y in a region of the street."""
    side = int(rng.integers(2))
    edge, out = lay.at(lay.road[side], y), lay.at(lay.outer[side], y)
    mid = lay.at(sum(lay.road) / 2, y)
    spans = {"sidewalk": (edge, out, 0.15, 0.95), "kerb": (edge, out, 0.05, 0.3),
             "outer": (edge, out, 0.7, 1.05), "road_edge": (edge, mid, 0.05, 0.4),
             "road": (lay.at(lay.road[0], y), lay.at(lay.road[1], y), 0.1, 0.9)}
    a, b, lo, hi = spans[where]
    return float(a + (b - a) * rng.uniform(lo, hi))


def plan_objects(rng, lay: Layout) -> list[Item]:
    """Sample the in-distribution objects of a scene (kind, position, own seed)."""
    items = []
    for kind, (_, (lo, hi), regions) in OBJECTS.items():
        for _ in range(rng.integers(lo, hi + 1)):
            yb = lay.hz + 1.5 + (lay.h * 1.1 - lay.hz - 1.5) * rng.uniform() ** 1.6
            x = lateral(rng, lay, yb, regions[rng.integers(len(regions))])
            seed = int(rng.integers(2 ** 63))
            if -0.1 * lay.w < x < 1.1 * lay.w:
                items.append(Item(float(yb), len(items), kind, x, seed))
    return items


def plan_ood(rng, lay: Layout, start: int) -> list[Item]:
    """1-3 unseen objects on the road or sidewalk, each covering ~1-8 % of the image."""
    items = []
    for i in range(rng.integers(1, 4)):
        kind = list(OOD_OBJECTS)[rng.integers(len(OOD_OBJECTS))]
        _, fill_ratio, (lo, hi) = OOD_OBJECTS[kind]
        share = np.exp(rng.uniform(np.log(0.01), np.log(0.08)))  # of the image, log-uniform
        size_px = np.sqrt(share * lay.h * lay.w / fill_ratio)
        size_m = rng.uniform(lo, hi)
        yb = lay.hz + size_px / size_m * CAM_H
        if yb > lay.h:  # too near for that size: make it bigger in the world instead
            yb = lay.h - rng.uniform(0, 0.1) * (lay.h - lay.hz)
            size_m = size_px * CAM_H / (yb - lay.hz)
        left, right = lay.at(lay.outer[0], yb), lay.at(lay.outer[1], yb)
        x = left + (right - left) * rng.uniform(0.15, 0.85)  # on the road or a sidewalk
        x = float(np.clip(x, size_px / 2, lay.w - size_px / 2))
        items.append(Item(float(yb), start + i, kind, x, int(rng.integers(2 ** 63)),
                          {"size_m": float(size_m)}))
    return items


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


# ----------------------------------------------------------------------------- scenes

def _render(lay: Layout, static_seed, items: list[Item], photo: dict):
    """Static layers, then the items far to near, then overlays; then the camera effects."""
    rng = np.random.default_rng(static_seed)
    cv = Canvas(lay.h, lay.w, rng)
    for layer in STATIC_LAYERS:
        layer(cv, lay, rng)
    for it in sorted(items, key=lambda i: (i.yb, i.order)):
        rng_item = np.random.default_rng(it.seed)
        PAINTERS[it.kind](cv, rng_item, it.x, it.yb, lay.ppm(it.yb), **it.extra)
    for layer in OVERLAYS:
        layer(cv, lay, rng)
    return apply_photometric(cv.img, photo), cv.lab


def render_scene(seed: int, split: str, index: int, size=SPEC.size, ood: bool = False):
    """One scene as (image uint8 H×W×3, label uint8 H×W); with ``ood`` also the version
    with unseen objects inserted: ((img, lab), (ood_img, ood_lab)), else ((img, lab), None)."""
    ss = np.random.SeedSequence([seed, SPLIT_IDS[split], index])
    s_layout, s_static, s_objects, s_photo, s_ood = ss.spawn(5)
    lay = sample_layout(np.random.default_rng(s_layout), *size)
    items = plan_objects(np.random.default_rng(s_objects), lay)
    photo = sample_photometric(np.random.default_rng(s_photo), *size)
    clean = _render(lay, s_static, items, photo)
    if not ood:
        return clean, None
    rng = np.random.default_rng(s_ood)
    for _ in range(MAX_OOD_TRIES):  # re-draw when nearer objects hide (nearly) everything
        extra = plan_ood(rng, lay, start=len(items))
        dirty = _render(lay, s_static, items + extra, photo)
        if (dirty[1] == OOD_ID).mean() >= MIN_OOD_SHARE:
            break
    return clean, dirty
