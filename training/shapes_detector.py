"""A detector for the coloured-shapes world (training/shapes_data.py): colour segmentation, connected components
and shape by geometry; and GenEval's rules scoring a detected scene against its prompt.

Colour: each pixel is explained as a blend `a C + (1 - a) white` of one palette colour C (the one whose segment
from white passes nearest the pixel), so anti-aliased or blurred edges keep their object's colour; pixels with
coverage a >= 0.5 are foreground. Objects: 8-connected foreground regions; a colour covering under MIN_SHARE of
its region (a blurred fringe) joins the region's main colour, and each remaining colour's connected parts of at
least MIN_AREA pixels are objects (touching objects of different colours stay apart).
Shape: a star is the only non-convex shape (area / convex-hull area); among the convex ones a square fills its
bounding box, a circle pi / 4 of it and a triangle half."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from .shapes_data import BACKGROUND, COLOURS, Item, Spec, holds

MIN_AREA = 20  # pixels: smaller blobs are noise (the smallest drawn object covers about 70)
MIN_SHARE = 0.35  # of a connected foreground region: a colour with less is a fringe of the region's main colour
STAR_SOLIDITY = 0.78  # a drawn star: about 0.6; convex shapes about 1
SQUARE_FILL = 0.89  # a square: about 1; a circle: about 0.8
CIRCLE_FILL = 0.65  # a triangle: about 0.55


@dataclass(frozen=True)
class Detection:
    colour: str
    shape: str
    x: float
    y: float
    area: int


def segment(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(colour index per pixel, coverage per pixel) of a (H, W, 3) uint8 or [0, 1] float image."""
    pixels = image.astype(np.float32) * (255.0 if image.dtype != np.uint8 else 1.0)
    white = np.array(BACKGROUND, np.float32)
    offsets = np.array(list(COLOURS.values()), np.float32) - white  # (K, 3)
    d = pixels[..., None, :] - white  # (H, W, 1, 3)
    a = np.clip((d * offsets).sum(-1) / (offsets**2).sum(-1), 0, 1)  # (H, W, K): the coverage along each segment
    residual = ((d - a[..., None] * offsets) ** 2).sum(-1)
    best = residual.argmin(-1)
    return best, np.take_along_axis(a, best[..., None], -1)[..., 0]


def classify(mask: np.ndarray) -> str:
    """The shape of one object's pixel mask."""
    ys, xs = np.nonzero(mask)
    area = len(xs)
    fill = area / ((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1))
    try:
        hull = ConvexHull(np.stack([xs, ys], 1).astype(np.float64))
        solidity = area / (hull.volume + hull.area / 2 + 1)  # Pick: a convex pixel set's count is about this
    except QhullError:  # collinear pixels: a line, not a star
        solidity = 1.0
    if solidity < STAR_SOLIDITY:
        return "star"
    return "square" if fill >= SQUARE_FILL else "circle" if fill >= CIRCLE_FILL else "triangle"


def detect(image: np.ndarray) -> list[Detection]:
    """Every object in an image: colour, shape, bounding-box centre (x, y) and area in pixels."""
    best, coverage = segment(image)
    names = list(COLOURS)
    eight = np.ones((3, 3))
    regions, count = ndimage.label(coverage >= 0.5, structure=eight)
    found = []
    for index in range(1, count + 1):
        region = regions == index
        colours = np.bincount(best[region], minlength=len(names))
        kept = np.flatnonzero(colours >= MIN_SHARE * colours.sum())
        majority = colours.argmax()
        assigned = np.where(np.isin(best, kept), best, majority)  # minor colours (blurred fringes) join the majority
        for k in kept:
            labels, parts = ndimage.label(region & (assigned == k), structure=eight)
            for part in range(1, parts + 1):
                mask = labels == part
                area = int(mask.sum())
                if area >= MIN_AREA:
                    ys, xs = np.nonzero(mask)
                    x, y = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
                    found.append(Detection(names[k], classify(mask), float(x), float(y), area))
    return found


def layout_matches(found: list[Detection], items: list[Item]) -> bool:
    """Whether the detections are the drawn layout: the same (colour, shape) objects, each within a few pixels of
    where it was drawn."""
    if len(found) != len(items):
        return False
    remaining = list(found)
    for item in items:
        match = next((d for d in remaining if (d.colour, d.shape) == (item.colour, item.shape)
                      and abs(d.x - item.x) <= 3 and abs(d.y - item.y) <= 3), None)
        if match is None:
            return False
        remaining.remove(match)
    return True


def _of(found: list[Detection], colour: str | None, shape: str) -> list[Detection]:
    return [d for d in found if d.shape == shape and (colour is None or d.colour == colour)]


def correct(spec: Spec, found: list[Detection]) -> bool:
    """GenEval's rule for the prompt's kind: single object / colours: an object of the shape (in the colour);
    counting: exactly `count` of them; two objects / colour attribution: each named object present; position:
    both present and some pair of them in the relation. Objects the prompt does not name are ignored."""
    if len(spec.objects) == 1:
        (colour, shape), = spec.objects
        hits = len(_of(found, colour, shape))
        return hits == spec.count if spec.category == "counting" else hits >= 1
    (c1, s1), (c2, s2) = spec.objects
    first, second = _of(found, c1, s1), _of(found, c2, s2)
    if (c1, s1) == (c2, s2):
        return len(first) >= 2 and spec.relation is None
    if spec.relation is None:
        return bool(first) and bool(second)
    return any(holds(spec.relation, (a.x, a.y), (b.x, b.y)) for a in first for b in second)
