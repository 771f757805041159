"""``shapes``: procedural captioned scenes whose captions can be checked (the text-to-image data set).

Each scene is a 64x64 RGB image on a dark background (every channel 15-80, a slight tint and, for
half of the scenes, a gentle linear gradient) with 1 to 4 non-overlapping objects:

- shapes ``circle``, ``square`` (axis-aligned), ``triangle`` (upright, equilateral);
- colours, exact RGB: red (220, 40, 40), green (40, 170, 70), blue (40, 80, 220),
  yellow (235, 205, 40), purple (150, 60, 200), cyan (40, 195, 205);
- sizes ``small`` (bounding box 10-12 px) and ``large`` (19-23 px).

Objects are anti-aliased by 4x4 supersampled coverage, so object interiors carry the exact palette
colour. Bounding boxes keep a gap of at least ``MIN_GAP`` px, so objects of one colour never touch.

Captions come from a grammar with five categories (GenEval's, less "colours" of a single object):

| category | scene | canonical template (``TEMPLATES[cat][0]``) |
|---|---|---|
| ``single_object`` | 1 object | "a large red circle" |
| ``two_object`` | 2 objects, one colour, two shapes | "a red circle and a red square" |
| ``counting`` | 2-4 objects of one colour and shape | "three green circles" |
| ``colour_binding`` | 2 objects differing in shape and colour | "a blue square and a yellow triangle" |
| ``position`` | 2 different objects, a relation | "a red circle to the left of a blue triangle" |

The categories are drawn uniformly. Non-canonical captions vary the wording (synonyms: disc for
circle, tile for square, big/little/tiny for the sizes, "left of", "on the left of", "over",
"under", "beneath", ...), the word order (objects swapped; "B to the right of A" for "A to the left
of B") and an optional prefix ("a picture of ..."). Every caption names every object's colour and
shape; sizes are named in ``single_object`` captions and sometimes elsewhere, but size is not a
checked fact (GenEval checks none either). The checked facts (``Facts``):

- every named (colour, shape) is present (for ``counting``: exactly N of them);
- for ``position``: the first object's centre lies on the stated side of the second's, by at least
  ``RELATION_MARGIN`` px along that axis. Scenes are drawn with at least ``MIN_RELATION_SEP`` px.

Everything is deterministic per seed: ``sample_scene(seed)`` and ``render(scene)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from ..errors import HastenError

IMAGE_SIZE = 64
SUPERSAMPLE = 4
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 70), "blue": (40, 80, 220),
    "yellow": (235, 205, 40), "purple": (150, 60, 200), "cyan": (40, 195, 205),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": (10, 12), "large": (19, 23)}
CATEGORIES = ("single_object", "two_object", "counting", "colour_binding", "position")
RELATIONS = ("left of", "right of", "above", "below")
MIN_GAP = 3  # px between bounding boxes
EDGE = 1  # px between a bounding box and the image border
MIN_RELATION_SEP = 12  # px between centres along the relation's axis, when drawing a scene
RELATION_MARGIN = 3  # px along the axis that a generated image must show
NUMBERS = {2: "two", 3: "three", 4: "four"}

SHAPE_WORDS = {"circle": ("circle", "disc"), "square": ("square", "tile"), "triangle": ("triangle",)}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
RELATION_WORDS = {
    "left of": ("to the left of", "left of", "on the left of"),
    "right of": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
PREFIXES = ("", "", "a picture of ", "an image of ", "a scene with ")

# {a}/{b} are object phrases; the first template of each category is the canonical one.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "single_object": ("{a}",),
    "two_object": ("{a} and {b}", "{b} and {a}", "{a} next to {b}"),
    "counting": ("{n} {colour} {shapes}", "exactly {n} {colour} {shapes}", "{n} {shapes}, all {colour}"),
    "colour_binding": ("{a} and {b}", "{b} and {a}", "{a} together with {b}"),
    "position": ("{a} {rel} {b}", "{b} {inv} {a}"),
}


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    side: int  # bounding-box side in px (triangles: the base; height is side * sqrt(3) / 2)
    cx: float  # centre of the bounding box, px
    cy: float

    @property
    def box(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) of the bounding box."""
        h = self.side * np.sqrt(3) / 2 if self.shape == "triangle" else self.side
        return (self.cx - self.side / 2, self.cy - h / 2, self.cx + self.side / 2, self.cy + h / 2)


@dataclass(frozen=True)
class Facts:
    """What a generated image must show: required (colour, shape) counts and an optional relation."""

    objects: tuple[tuple[str, str, int], ...]  # (colour, shape, count)
    exact_count: bool = False  # counting: exactly `count`, otherwise at least
    relation: tuple[int, str, int] | None = None  # (index into objects, relation, index)


@dataclass(frozen=True)
class Scene:
    category: str
    objects: tuple[SceneObject, ...]
    caption: str
    facts: Facts
    background: tuple[tuple[int, int, int], tuple[float, float], float] = field(repr=False)
    seed: int = -1


# --------------------------------------------------------------------------- sampling
def _phrase(obj: SceneObject, rng: np.random.Generator, canonical: bool, with_size: bool) -> str:
    shape = SHAPE_WORDS[obj.shape][0 if canonical else rng.integers(len(SHAPE_WORDS[obj.shape]))]
    if with_size:
        size = SIZE_WORDS[obj.size][0 if canonical else rng.integers(len(SIZE_WORDS[obj.size]))]
        return f"a {size} {obj.colour} {shape}"
    return f"a {obj.colour} {shape}"


def _plural(word: str) -> str:
    return word + "s"


def _place(rng: np.random.Generator, specs: list[tuple[str, str, str]], relation: str | None,
           tries: int = 200) -> list[SceneObject] | None:
    """Place objects uniformly at random without overlap (and with the relation, if any)."""
    for _ in range(tries):
        objs: list[SceneObject] = []
        for shape, colour, size in specs:
            lo, hi = SIZES[size]
            side = int(rng.integers(lo, hi + 1))
            h = side * np.sqrt(3) / 2 if shape == "triangle" else side
            cx = rng.uniform(EDGE + side / 2, IMAGE_SIZE - EDGE - side / 2)
            cy = rng.uniform(EDGE + h / 2, IMAGE_SIZE - EDGE - h / 2)
            obj = SceneObject(shape, colour, size, side, float(cx), float(cy))
            if any(_too_close(obj, o) for o in objs):
                break
            objs.append(obj)
        else:
            if relation is None or _relation_holds(objs[0], objs[1], relation, MIN_RELATION_SEP):
                return objs
    return None


def _too_close(a: SceneObject, b: SceneObject) -> bool:
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    return not (ax1 + MIN_GAP <= bx0 or bx1 + MIN_GAP <= ax0 or ay1 + MIN_GAP <= by0 or by1 + MIN_GAP <= ay0)


def _relation_holds(a: SceneObject | tuple[float, float], b: SceneObject | tuple[float, float],
                    relation: str, margin: float) -> bool:
    """Image coordinates: x grows to the right, y grows downwards."""
    ax, ay = (a.cx, a.cy) if isinstance(a, SceneObject) else a
    bx, by = (b.cx, b.cy) if isinstance(b, SceneObject) else b
    return {"left of": bx - ax, "right of": ax - bx, "above": by - ay, "below": ay - by}[relation] >= margin


def sample_scene(seed: int, category: str | None = None) -> Scene:
    """The scene (objects, caption, facts, background) for ``seed``; ``category`` forces one."""
    if category is not None and category not in CATEGORIES:
        raise HastenError(f"unknown category {category!r}; choose one of {', '.join(CATEGORIES)}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise HastenError(f"seed must be a non-negative integer, got {seed!r}")
    rng = np.random.default_rng(int(seed))
    cat = category or CATEGORIES[int(rng.integers(len(CATEGORIES)))]
    colours, shapes, sizes = list(COLOURS), list(SHAPES), list(SIZES)
    canonical = bool(rng.random() < 0.25)
    tpl_idx = 0 if canonical else int(rng.integers(len(TEMPLATES[cat])))
    prefix = "" if canonical else PREFIXES[int(rng.integers(len(PREFIXES)))]
    relation = None
    while True:
        if cat == "single_object":
            specs = [(rng.choice(shapes), rng.choice(colours), rng.choice(sizes))]
        elif cat == "two_object":
            c = rng.choice(colours)
            s1, s2 = rng.choice(shapes, 2, replace=False)
            specs = [(s1, c, rng.choice(sizes)), (s2, c, rng.choice(sizes))]
        elif cat == "counting":
            n = int(rng.integers(2, 5))
            s, c = rng.choice(shapes), rng.choice(colours)
            specs = [(s, c, rng.choice(sizes, p=[0.6, 0.4])) for _ in range(n)]
        elif cat == "colour_binding":
            s1, s2 = rng.choice(shapes, 2, replace=False)
            c1, c2 = rng.choice(colours, 2, replace=False)
            specs = [(s1, c1, rng.choice(sizes)), (s2, c2, rng.choice(sizes))]
        else:  # position
            relation = RELATIONS[int(rng.integers(len(RELATIONS)))]
            while True:
                a = (rng.choice(shapes), rng.choice(colours))
                b = (rng.choice(shapes), rng.choice(colours))
                if a != b:
                    break
            specs = [(*a, rng.choice(sizes)), (*b, rng.choice(sizes))]
        specs = [(str(s), str(c), str(z)) for s, c, z in specs]
        objs = _place(rng, specs, relation)
        if objs is not None:
            break
    with_size = cat == "single_object" or (not canonical and rng.random() < 0.3)
    caption, facts = _caption(cat, objs, relation, rng, canonical, tpl_idx, with_size)
    return Scene(cat, tuple(objs), prefix + caption, facts, _background(rng), int(seed))


def _caption(cat: str, objs: list[SceneObject], relation: str | None, rng: np.random.Generator,
             canonical: bool, tpl_idx: int, with_size: bool) -> tuple[str, Facts]:
    tpl = TEMPLATES[cat][tpl_idx]
    if cat == "counting":
        o = objs[0]
        word = SHAPE_WORDS[o.shape][0 if canonical else rng.integers(len(SHAPE_WORDS[o.shape]))]
        caption = tpl.format(n=NUMBERS[len(objs)], colour=o.colour, shapes=_plural(word))
        return caption, Facts(((o.colour, o.shape, len(objs)),), exact_count=True)
    a = _phrase(objs[0], rng, canonical, with_size)
    b = _phrase(objs[1], rng, canonical, with_size) if len(objs) > 1 else ""
    if cat == "position":
        assert relation is not None
        rel = RELATION_WORDS[relation][0 if canonical else rng.integers(len(RELATION_WORDS[relation]))]
        inv = RELATION_WORDS[INVERSE[relation]][rng.integers(len(RELATION_WORDS[INVERSE[relation]]))]
        caption = tpl.format(a=a, b=b, rel=rel, inv=inv)
    else:
        caption = tpl.format(a=a, b=b)
    named = tuple((o.colour, o.shape, 1) for o in objs)
    return caption, Facts(named, relation=(0, relation, 1) if relation else None)


def _background(rng: np.random.Generator) -> tuple[tuple[int, int, int], tuple[float, float], float]:
    base = int(rng.integers(25, 61))
    tone = tuple(int(np.clip(base + rng.integers(-12, 13), 15, 80)) for _ in range(3))
    angle = float(rng.uniform(0, 2 * np.pi))
    amplitude = float(rng.uniform(0, 12)) if rng.random() < 0.5 else 0.0
    return tone, (np.cos(angle), np.sin(angle)), amplitude  # type: ignore[return-value]


# --------------------------------------------------------------------------- rendering
def _coverage(obj: SceneObject) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of one object: a 4x4 supersampled binary mask, box-filtered."""
    s = SUPERSAMPLE
    mask = Image.new("L", (IMAGE_SIZE * s, IMAGE_SIZE * s), 0)
    draw = ImageDraw.Draw(mask)
    x0, y0, x1, y1 = (v * s for v in obj.box)
    if obj.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=255)
    elif obj.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=255)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=255)
    m = np.asarray(mask, dtype=np.float32) / 255.0
    return m.reshape(IMAGE_SIZE, s, IMAGE_SIZE, s).mean(axis=(1, 3))


def render(scene: Scene) -> np.ndarray:
    """The scene as a (64, 64, 3) uint8 RGB array."""
    tone, (dx, dy), amp = scene.background
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)
    ramp = ((xx - IMAGE_SIZE / 2) * dx + (yy - IMAGE_SIZE / 2) * dy) / (IMAGE_SIZE / 2)  # in [-1.4, 1.4]
    bg = np.clip(np.asarray(tone, np.float32)[None, None] + amp * ramp[..., None] / 1.5, 15, 80)
    img = bg
    for obj in scene.objects:
        a = _coverage(obj)[..., None]
        img = a * np.asarray(COLOURS[obj.colour], np.float32) + (1 - a) * img
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def scenes(seeds: range | list[int], category: str | None = None) -> tuple[list[Scene], np.ndarray]:
    """Scenes and their images (N, 64, 64, 3) uint8 for ``seeds``."""
    sc = [sample_scene(int(s), category) for s in seeds]
    return sc, np.stack([render(s) for s in sc]) if sc else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)


def to_model_space(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) to float32 (N, 3, H, W) in [-1, 1]."""
    return images.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0


# Seed ranges (one scene per seed), disjoint by design:
#   training (hasten train --seed s):   s * 10M + [0, 10M)   (the shipped model: s = 0)
#   Imagine Flash captions:             20M + ...            ARD trajectories: 30M + ...
#   calibration captions:               40M + ...
#   held-out, from HELD_OUT_SEED0 = 50M: evaluation 50M + [0, 500k); FD-shapes reference 50.5M + [0, 100k);
#   real-vs-real FD 50.6M + [0, 100k); hasten tune 50.7M (tuning) and 50.75M (confirmation);
#   scene-encoder held-out 50.8M; VAE reconstruction 50.9M
# A training seed s of 2 to 4 would reach the distillation and calibration ranges: use 0 or 1 beside them.
TRAIN_SEED_RANGE = 10_000_000  # scenes per training seed
HELD_OUT_SEED0 = 50_000_000
