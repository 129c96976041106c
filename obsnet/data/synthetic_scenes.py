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

from obsnet.data.synthetic_canvas import (BUILDING, FENCE, OOD_ID, ROAD, SIDEWALK, SKY, SPEC, TREE, VOID,
                                          Canvas, apply_photometric, box, ellipse, pick,
                                          sample_photometric)
from obsnet.data.synthetic_objects import (paint_animal, paint_bicyclist, paint_car, paint_clutter,
                                           paint_debris, paint_pedestrian, paint_pole, paint_tree)

VERSION = 1  # bump when the drawing changes: cached datasets are then regenerated
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
MIN_OOD_SHARE, MAX_OOD_TRIES = 0.004, 8  # visible anomaly per test_ood image
CAM_H = 2.0  # camera height in metres: pixels per metre at row y is (y - horizon) / CAM_H


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
