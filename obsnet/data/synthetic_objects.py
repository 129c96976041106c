"""The objects of the synthetic road scenes (``obsnet.data.synthetic_scenes``): trees, poles
with signs, cars, pedestrians, bicyclists and clutter, and the unseen (OOD) animals and debris.
Each painter draws one object standing at ``(x, yb)`` with ``ppm`` pixels per metre."""
from __future__ import annotations

import numpy as np

from obsnet.data.synthetic_canvas import (BICYCLIST, CAR, OOD_ID, OOD_PALETTES, PALETTES, PEDESTRIAN, POLE,
                                          SIGN, TREE, VOID, Canvas, box, ellipse, pick, polygon, segment)


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
