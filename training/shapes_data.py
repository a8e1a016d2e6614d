"""The coloured-shapes world of the `shapes` demo models: scenes of one to four flat-coloured shapes on white,
drawn by code (Pillow, seeded), described by prompts from templates, and split into training and held-out
prompt combinations. `training/shapes_detector.py` reads such images back.

A scene is a list of objects (colour, shape, centre, size) and its prompt; the prompt's kind is one of GenEval's
six categories (single object, two objects, counting, colours, position, colour attribution)."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SUPERSAMPLE = 4  # drawn at 4x and box-filtered down: anti-aliased edges
BACKGROUND = (255, 255, 255)
COLOURS = {  # far apart in RGB (closest pair: orange-yellow, about 100 apart)
    "red": (225, 25, 30),
    "orange": (255, 135, 0),
    "yellow": (240, 225, 0),
    "green": (20, 160, 40),
    "blue": (25, 60, 230),
    "purple": (135, 30, 190),
    "pink": (255, 105, 200),
    "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle", "star")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars"}
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}
RELATIONS = ("to the left of", "to the right of", "above", "below")
CATEGORIES = ("single object", "two objects", "counting", "colours", "position", "colour attribution")
SUFFIX = " on a white background"
GAP = 3  # pixels at least between two objects' bounding boxes
HELD_OUT_PERCENT = 15  # of the combinations in the kinds that have many (counting, two objects, position, attribution)


@dataclass(frozen=True)
class Item:
    """One object of a scene: colour and shape names, centre (x, y) and bounding-box side in pixels."""

    colour: str
    shape: str
    x: float
    y: float
    size: float


@dataclass(frozen=True)
class Spec:
    """What a prompt asks for: `count` objects of (colour or None, shape), or two such objects with an optional
    relation of the first to the second."""

    category: str
    objects: tuple[tuple[str | None, str], ...]  # one entry per named object group
    count: int = 1
    relation: str | None = None

    def key(self) -> str:
        """The prompt combination, without phrasing: what the held-out split is drawn on."""
        return f"{self.category}|{self.objects}|{self.count}|{self.relation}"


def phrase(colour: str | None, shape: str, count: int = 1) -> str:
    noun = shape if count == 1 else PLURALS[shape]
    words = ([colour] if colour else []) + [noun]
    article = NUMBERS[count] if count > 1 else "an" if words[0][0] in "aeiou" else "a"
    return " ".join([article] + words)


def prompt(spec: Spec, suffix: bool = False) -> str:
    """The prompt of a spec ("three red circles", "a blue square to the left of a star", ...)."""
    if len(spec.objects) == 1:
        text = phrase(*spec.objects[0], spec.count)
    else:
        joint = f" {spec.relation} " if spec.relation else " and "
        text = phrase(*spec.objects[0]) + joint + phrase(*spec.objects[1])
    return text + (SUFFIX if suffix else "")


def all_specs() -> list[Spec]:
    """Every prompt combination of the world."""
    colours = list(COLOURS)
    specs = [Spec("single object", ((None, s),)) for s in SHAPES]
    specs += [Spec("colours", ((c, s),)) for c in colours for s in SHAPES]
    specs += [Spec("counting", ((c, s),), n) for n in (2, 3, 4) for c in [None] + colours for s in SHAPES]
    pairs = [(a, b) for a in SHAPES for b in SHAPES if a != b]
    specs += [Spec("two objects", ((None, a), (None, b))) for a, b in pairs]
    specs += [Spec("position", ((None, a), (None, b)), relation=r) for a, b in pairs for r in RELATIONS]
    objects = [(c, s) for c in colours for s in SHAPES]
    specs += [Spec("colour attribution", (a, b)) for a in objects for b in objects if a[0] != b[0]]
    specs += [Spec("position", (a, b), relation=r) for a in objects for b in objects if a[0] != b[0]
              for r in RELATIONS]
    return specs


def held_out(spec: Spec) -> bool:
    """Whether a combination is kept out of training: a fixed hash of its key, HELD_OUT_PERCENT of the kinds
    with many combinations. Single-object and colour prompts (4 and 32 combinations) are all trained on; the
    benchmark scores them at unseen seeds and layouts."""
    if spec.category in ("single object", "colours"):
        return False
    return zlib.crc32(spec.key().encode()) % 100 < HELD_OUT_PERCENT


def split() -> tuple[list[Spec], list[Spec]]:
    """(training combinations, held-out combinations)."""
    specs = all_specs()
    return [s for s in specs if not held_out(s)], [s for s in specs if held_out(s)]


def _sizes(total: int, rng: np.random.Generator) -> np.ndarray:
    low, high = {1: (18, 30), 2: (16, 26), 3: (14, 22), 4: (14, 20)}[total]
    return rng.uniform(low, high, total)


def _place(sizes: np.ndarray, rng: np.random.Generator, relation: str | None) -> list[tuple[float, float]] | None:
    """Centres for boxes of `sizes`, inside the image and GAP apart, with `relation` between the first two
    clear (the centres' offset along its axis at least twice the other); None if the draws failed."""
    for _ in range(200):
        centres = [(rng.uniform(s / 2 + 1, IMAGE_SIZE - s / 2 - 1), rng.uniform(s / 2 + 1, IMAGE_SIZE - s / 2 - 1))
                   for s in sizes]
        apart = all(max(abs(a[0] - b[0]), abs(a[1] - b[1])) >= (sa + sb) / 2 + GAP
                    for i, (a, sa) in enumerate(zip(centres, sizes)) for b, sb in zip(centres[i + 1:], sizes[i + 1:]))
        if apart and (relation is None or holds(relation, centres[0], centres[1], margin=2.0)):
            return centres
    return None


def holds(relation: str, a: tuple[float, float], b: tuple[float, float], margin: float = 1.0) -> bool:
    """Whether centre `a` is `relation` centre `b` (image y grows downwards): its offset along the relation's
    axis has the right sign and at least `margin` times the offset along the other axis."""
    dx, dy = a[0] - b[0], a[1] - b[1]
    along, across = {"to the left of": (-dx, dy), "to the right of": (dx, dy), "above": (-dy, dx),
                     "below": (dy, dx)}[relation]
    return along > 0 and along >= margin * abs(across)


def scene(spec: Spec, rng: np.random.Generator) -> list[Item]:
    """A random layout that fits the spec; objects without a named colour get random colours."""
    names = list(COLOURS)
    groups = [(c, s) for c, s in spec.objects for _ in range(spec.count)]
    while True:
        sizes = _sizes(len(groups), rng)
        centres = _place(sizes, rng, spec.relation)
        if centres is not None:
            return [Item(c or names[rng.integers(len(names))], s, x, y, float(size))
                    for (c, s), (x, y), size in zip(groups, centres, sizes)]


def _outline(item: Item) -> list[tuple[float, float]] | None:
    """The polygon of a square, triangle or star (upright), in supersampled pixels; None for a circle."""
    k = SUPERSAMPLE
    cx, cy, h = item.x * k, item.y * k, item.size * k / 2
    if item.shape == "square":
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if item.shape == "triangle":
        return [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if item.shape == "star":  # five points, inner radius 0.45 of the outer; centred in its bounding box
        radius = 2 * h / (2 * np.sin(2 * np.pi / 5))  # its width, the larger side, is the box's
        centre_y = cy - radius * (1 + np.cos(np.pi / 5)) / 2 + radius
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, radius, 0.45 * radius)
        return [(cx + r * np.cos(a), centre_y + r * np.sin(a)) for r, a in zip(radii, angles)]
    return None


def draw(items: list[Item]) -> np.ndarray:
    """The scene as a (64, 64, 3) uint8 image."""
    big = IMAGE_SIZE * SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), BACKGROUND)
    pen = ImageDraw.Draw(canvas)
    for item in items:
        outline = _outline(item)
        if outline is None:
            h = item.size * SUPERSAMPLE / 2
            pen.ellipse((item.x * SUPERSAMPLE - h, item.y * SUPERSAMPLE - h, item.x * SUPERSAMPLE + h,
                         item.y * SUPERSAMPLE + h), fill=COLOURS[item.colour])
        else:
            pen.polygon(outline, fill=COLOURS[item.colour])
    return np.asarray(canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX))


def dataset(specs: list[Spec], count: int, seed: int) -> tuple[np.ndarray, list[str], list[list[Item]]]:
    """`count` (uint8 images (count, 64, 64, 3), prompts, layouts) for combinations drawn uniformly by kind
    (each of the six kinds equally often), then uniformly within it; a quarter of the prompts end in SUFFIX."""
    rng = np.random.default_rng(seed)
    kinds = {c: [s for s in specs if s.category == c] for c in CATEGORIES}
    kinds = {c: v for c, v in kinds.items() if v}
    images, texts, layouts = [], [], []
    for i in range(count):
        group = kinds[list(kinds)[i % len(kinds)]]
        spec = group[rng.integers(len(group))]
        items = scene(spec, rng)
        images.append(draw(items))
        texts.append(prompt(spec, suffix=bool(rng.random() < 0.25)))
        layouts.append(items)
    return np.stack(images), texts, layouts


def to_model(images: np.ndarray) -> np.ndarray:
    """uint8 images -> float32 in [-1, 1], as the VAE takes them."""
    return (images.astype(np.float32) / 127.5 - 1).astype(np.float32)


def grid(images: np.ndarray, cols: int) -> Image.Image:
    """(N, H, W, 3) images (uint8, or float in [0, 1]) as one grid image, `cols` per row."""
    if images.dtype != np.uint8:
        images = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
    n, h, w, c = images.shape
    rows = -(-n // cols)
    canvas = np.full((rows * cols, h, w, c), 255, np.uint8)
    canvas[:n] = images
    return Image.fromarray(canvas.reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c))
