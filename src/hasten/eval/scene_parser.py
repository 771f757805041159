"""An analytic scene parser for ``shapes`` images, and the GenEval-style prompt-adherence check.

The parser reads objects back from a 64x64 RGB image:

1. every pixel within ``COLOUR_TOLERANCE`` (Euclidean RGB) of a palette colour is labelled with it
   (the dark background, channels <= 80, is >= 118 away from every palette colour);
2. 4-connected components per colour, at least ``MIN_AREA`` px, are the objects;
3. the shape is read from the silhouette: an upright triangle has most of its area in the bottom
   half, a square fills the corners of its bounding box and a circle does not; the size is
   ``large`` when the longer box side >= 15 px.

It is analytic (no training) so that its behaviour is inspectable; its accuracy on held-out
rendered scenes is measured by ``parser_accuracy`` and stated in the README.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..data.shapes import CATEGORIES, COLOURS, RELATION_MARGIN, Facts, _relation_holds

COLOUR_TOLERANCE = 60.0
MIN_AREA = 12
LARGE_SIDE = 15
_PALETTE = np.asarray(list(COLOURS.values()), np.float32)
_NAMES = list(COLOURS)


@dataclass(frozen=True)
class Detection:
    colour: str
    shape: str
    size: str
    cx: float
    cy: float
    area: int


def parse(image: np.ndarray) -> list[Detection]:
    """Objects in one (64, 64, 3) uint8 image."""
    img = np.asarray(image, np.float32)
    dist = np.linalg.norm(img[:, :, None, :] - _PALETTE[None, None], axis=-1)  # (H, W, K)
    nearest = dist.argmin(-1)
    close = dist.min(-1) <= COLOUR_TOLERANCE
    found: list[Detection] = []
    for k, name in enumerate(_NAMES):
        labels, n = ndimage.label(close & (nearest == k))
        if n == 0:
            continue
        for sl, idx in zip(ndimage.find_objects(labels), range(1, n + 1)):
            comp = labels[sl] == idx
            area = int(comp.sum())
            if area < MIN_AREA:
                continue
            h, w = comp.shape
            shape = _shape(comp)
            found.append(Detection(name, shape, "large" if max(h, w) >= LARGE_SIDE else "small",
                                   float(sl[1].start + (w - 1) / 2), float(sl[0].start + (h - 1) / 2), area))
    return found


def _shape(comp: np.ndarray) -> str:
    """Triangle if the top half of the box holds much less area than the bottom half (an upright
    triangle: 1/4 against 3/4); otherwise a square if at least 3 of the 4 bounding-box corners (2x2
    pixels each) are at least half filled, else a circle."""
    h = comp.shape[0]
    rows = comp.sum(1).astype(np.float32)
    top, bottom = rows[: h // 2].sum(), rows[(h + 1) // 2:].sum()
    if top < 0.6 * bottom:
        return "triangle"
    c = comp.astype(np.float32)
    corners = sum(float(p.mean()) >= 0.5 for p in (c[:2, :2], c[:2, -2:], c[-2:, :2], c[-2:, -2:]))
    return "square" if corners >= 3 else "circle"


def check_facts(facts: Facts, detections: list[Detection]) -> dict[str, bool]:
    """Each fact of a caption, satisfied or not, on the parsed objects of one image."""
    out: dict[str, bool] = {}
    for colour, shape, count in facts.objects:
        n = sum(1 for d in detections if d.colour == colour and d.shape == shape)
        key = f"{count} {colour} {shape}"
        out[key] = n == count if facts.exact_count else n >= 1
    if facts.relation is not None:
        i, rel, j = facts.relation
        a, b = facts.objects[i], facts.objects[j]
        cand_a = [(d.cx, d.cy) for d in detections if (d.colour, d.shape) == a[:2]]
        cand_b = [(d.cx, d.cy) for d in detections if (d.colour, d.shape) == b[:2]]
        out[f"{a[0]} {a[1]} {rel} {b[0]} {b[1]}"] = any(
            _relation_holds(pa, pb, rel, RELATION_MARGIN) for pa in cand_a for pb in cand_b)
    return out


def adherence(facts: list[Facts], categories: list[str], images: np.ndarray) -> dict:
    """GenEval-style scores: the share of images with every fact satisfied, overall and per category."""
    ok = np.array([all(check_facts(f, parse(img)).values()) for f, img in zip(facts, images)])
    per_cat = {}
    for cat in CATEGORIES:
        sel = np.array([c == cat for c in categories])
        if sel.any():
            per_cat[cat] = float(ok[sel].mean())
    return {"adherence": float(ok.mean()) if len(ok) else float("nan"), "per_category": per_cat,
            "n": int(len(ok)), "satisfied": ok.tolist()}


def parser_accuracy(scenes: list, images: np.ndarray) -> dict:
    """Share of rendered scenes whose parse equals the truth: same (colour, shape, size) multiset and
    every centre within 1.5 px; and the share whose caption facts all hold (should be 1.0)."""
    exact, facts_ok = 0, 0
    for sc, img in zip(scenes, images):
        det = parse(img)
        truth = sorted((o.colour, o.shape, o.size) for o in sc.objects)
        got = sorted((d.colour, d.shape, d.size) for d in det)
        match = truth == got and all(
            any(abs(d.cx - (o.cx - 0.5)) <= 1.5 and abs(d.cy - (o.cy - 0.5)) <= 1.5 for d in det)
            for o in sc.objects)
        exact += match
        facts_ok += all(check_facts(sc.facts, det).values())
    n = max(len(scenes), 1)
    return {"scene_accuracy": exact / n, "facts_accuracy": facts_ok / n, "n": len(scenes)}
