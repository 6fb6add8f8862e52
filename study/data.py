"""Grounded synthetic VQA for the study model: images of simple coloured shapes with known pixel boxes.

Every question is decided by the pixels of objects whose boxes are recorded (``Item.evidence``: the queried object, the
two compared objects, or the distractors of a "no" existence question), so the visual patches a pruning method keeps
can be scored against the patches that hold the answer ("evidence recall").

Geometry follows LLaVA-1.5 with ``image_aspect_ratio="pad"``: an image of size (w, h) is pasted into a square of side
S = max(w, h) at offset floor((S - w) / 2), floor((S - h) / 2) (``expand2square``), then resized to 336 px and cut into
a 24 x 24 grid of 14-px patches read in raster order. ``evidence_patches`` and ``row_band`` map boxes through exactly that.

Images: one of ``ASPECTS`` with long side in [336, 768] px, a plain, gradient, noisy or photographic background, and 2..6
non-overlapping objects (a shape of ``SHAPES`` filled with a colour of ``COLORS``, colour/shape pairs unique per image;
three quarters of the circles, squares and diamonds carry a letter of ``GLYPHS``). Objects span 28..56 px per side
once the padded square is resized to 336 px, i.e. 2..4 patches (glyph carriers 34..56).

Determinism: everything is drawn from a ``numpy.random.Generator``; a split's image i uses the seed sequence
(split tag, seed, i) and a training stream uses (stream tag, seed, worker), so streams and splits never share images.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont

from study import assets

GENERATOR_VERSION = 1

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 180),
    "orange": (245, 130, 20),
    "pink": (250, 120, 200),
    "cyan": (20, 200, 210),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star")
# Letters only (so "What letter is on ..." is always literally true), chosen to be distinct at ~15 px.
GLYPHS = tuple("AEHKMRSTXZ")
ASPECTS = {"square": (1, 1), "4:3": (4, 3), "3:4": (3, 4), "16:9": (16, 9), "9:16": (9, 16), "2:1": (2, 1),
           "1:2": (1, 2), "4:1": (4, 1), "1:4": (1, 4)}
ASPECT_WEIGHTS = {"square": 0.25, "4:3": 0.15, "3:4": 0.15, "16:9": 0.10, "9:16": 0.10, "2:1": 0.075,
                  "1:2": 0.075, "4:1": 0.05, "1:4": 0.05}
FAMILIES = ("color", "glyph", "exists", "relpos")
FAMILY_WEIGHTS = {"color": 0.30, "glyph": 0.25, "exists": 0.25, "relpos": 0.20}
SPLIT_SEEDS = {"train": 0, "calib": 1, "eval": 2}
LLAVA_ANSWER_SUFFIX = "\nAnswer the question using a single word or phrase."

LONG_SIDE_RANGE = (336, 768)          # pixels, inclusive
OBJECT_UNITS_RANGE = (28.0, 56.0)     # object side in pixels of the 336-px padded square
GLYPH_OBJECT_MIN_UNITS = 34.0         # objects carrying a glyph are at least this big, so the glyph stays readable
OBJECTS_PER_IMAGE = (2, 6)            # inclusive
GLYPH_PROBABILITY = 0.75              # per object of a GLYPH_SHAPES shape; ~0.45 of all objects carry a glyph
PHOTO_PROBABILITY = 0.3               # share of photo backgrounds when photos are available
REFERENCE_RESOLUTION = 336
STREAM_QUESTIONS_PER_IMAGE = 2
STREAM_SHUFFLE_BUFFER = 32
# Glyphs go only on shapes with room for a readable one: inside a star or a triangle a glyph would be ~10 px tall in
# the 336-px square, too small to read through 14-px patches. Font size as a share of the object side, per shape.
GLYPH_SHAPES = ("circle", "square", "diamond")
_GLYPH_SCALE = {"circle": 0.6, "square": 0.58, "diamond": 0.48}
_SPLIT_TAG = 1
_STREAM_TAG = 2
_CONVERSATION_TAG = 3
_MAX_RENDER_TRIES = 30
_MAX_PLACE_TRIES = 40

Box = tuple[int, int, int, int]


class SplitError(ValueError):
    """An output folder holds something other than the requested split; the message names the folder and the fix."""


@dataclass(frozen=True)
class Item:
    """One question about one image.

    ``evidence`` holds the boxes (x0, y0, x1, y1; pixels of the original image, x1/y1 exclusive) of the objects whose
    pixels decide the answer; for a "no" existence question, the distractors sharing the queried colour or shape.
    """
    question_id: str
    image: str
    question: str
    answer: str
    family: str
    aspect: str
    image_size: tuple[int, int]
    evidence: tuple[tuple[int, int, int, int], ...]


# ---------------------------------------------------------------------------------------------------------------------
# LLaVA-1.5 "pad" geometry


def pad_offset(image_size: tuple[int, int]) -> tuple[int, int]:
    """Where LLaVA-1.5's ``expand2square`` pastes an image of (width, height) inside its S x S square: (dx, dy)."""
    width, height = image_size
    side = max(width, height)
    return (side - width) // 2, (side - height) // 2


def _check_grid(image_size, grid: int, resolution: int) -> None:
    width, height = image_size
    if width <= 0 or height <= 0:
        raise ValueError(f"error: image_size={image_size} must be positive (width, height)")
    if grid <= 0 or resolution % grid:
        raise ValueError(f"error: resolution={resolution} must be a positive multiple of grid={grid}")


def evidence_patches(boxes: Sequence[Sequence[int]], image_size: tuple[int, int], *, grid: int = 24,
                     resolution: int = 336) -> list[int]:
    """Sorted raster indices (row * grid + col) of the patches covered >= 25 % by any one box.

    Boxes are in original-image pixels; they are clipped to the image, shifted by ``pad_offset`` into the padded
    S x S square and scaled to ``resolution``. Patch c spans [c * S / grid, (c + 1) * S / grid) in padded pixels, so the
    test runs on integers in units of 1 / grid padded pixels (exact; ``resolution`` cancels, it only fixes the patch
    size resolution / grid). A box inside the padding (outside the image) yields nothing.
    """
    _check_grid(image_size, grid, resolution)
    width, height = image_size
    side = max(width, height)
    dx, dy = pad_offset(image_size)
    selected: set[int] = set()
    for x0, y0, x1, y1 in boxes:
        x0, x1 = max(0, x0), min(width, x1)
        y0, y1 = max(0, y0), min(height, y1)
        if x1 <= x0 or y1 <= y0:
            continue
        left, right = (x0 + dx) * grid, (x1 + dx) * grid
        top, bottom = (y0 + dy) * grid, (y1 + dy) * grid
        for row in range(top // side, (bottom - 1) // side + 1):
            overlap_y = min(bottom, (row + 1) * side) - max(top, row * side)
            for col in range(left // side, (right - 1) // side + 1):
                overlap_x = min(right, (col + 1) * side) - max(left, col * side)
                if 4 * overlap_x * overlap_y >= side * side:
                    selected.add(row * grid + col)
    return sorted(selected)


def row_band(boxes: Sequence[Sequence[int]], image_size: tuple[int, int], *, grid: int = 24,
             resolution: int = 336) -> str:
    """"top", "middle" or "bottom": the third of the padded square's patch rows holding the boxes' mean centre.

    Raises ValueError for no boxes (a "no" existence question without distractors has no location).
    """
    _check_grid(image_size, grid, resolution)
    if not boxes:
        raise ValueError("error: row_band needs at least one evidence box; skip items with empty evidence")
    side = max(image_size)
    _, dy = pad_offset(image_size)
    count = len(boxes)
    twice_centre_sum = sum(y0 + y1 for _, y0, _, y1 in boxes) + 2 * count * dy   # 2 * n * mean padded centre y
    row = min(grid - 1, max(0, (twice_centre_sum * grid) // (2 * count * side)))
    return ("top", "middle", "bottom")[min(2, row * 3 // grid)]


# ---------------------------------------------------------------------------------------------------------------------
# Rendering


@dataclass(frozen=True)
class _Scene:
    image: Image.Image
    objects: list[dict]
    aspect: str


@functools.lru_cache(maxsize=64)
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


@functools.lru_cache(maxsize=4)
def _photos(assets_env: str | None) -> tuple[Image.Image, ...]:
    del assets_env  # the cache key: a changed STUDY_ASSETS reloads
    return tuple(assets.background_photos())


@functools.lru_cache(maxsize=4)
def _photos_fingerprint(assets_env: str | None) -> str:
    del assets_env  # the cache key, as for _photos
    return assets.photos_fingerprint()


def _sample_size(rng: np.random.Generator) -> tuple[str, tuple[int, int]]:
    names = list(ASPECT_WEIGHTS)
    aspect = names[rng.choice(len(names), p=list(ASPECT_WEIGHTS.values()))]
    long_side = int(rng.integers(LONG_SIDE_RANGE[0], LONG_SIDE_RANGE[1] + 1))
    a, b = ASPECTS[aspect]
    short_side = max(1, round(long_side * min(a, b) / max(a, b)))
    return aspect, ((long_side, short_side) if a >= b else (short_side, long_side))


def _tone(rng: np.random.Generator) -> np.ndarray:
    """A background colour far from every object colour: light grey, dark grey or a pale pastel."""
    kind = rng.integers(3)
    if kind == 0:
        return np.full(3, rng.integers(185, 236), dtype=np.float32)
    if kind == 1:
        return np.full(3, rng.integers(30, 81), dtype=np.float32)
    hue = rng.integers(0, 256, 3).astype(np.float32)
    return 0.25 * hue + 0.75 * 225.0


def _background(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    width, height = size
    photos = _photos(os.environ.get(assets.ASSETS_ENV))
    photo_share = PHOTO_PROBABILITY if photos else 0.0
    rest = (1.0 - photo_share) / 3
    kind = rng.choice(4, p=[rest, rest, rest, photo_share])
    if kind == 0:  # plain
        return Image.new("RGB", size, tuple(int(v) for v in _tone(rng)))
    if kind == 1:  # smooth linear gradient between two tones, drawn small and upsampled
        start, end = _tone(rng), _tone(rng)
        angle = rng.uniform(0, 2 * math.pi)
        ys, xs = np.mgrid[0:32, 0:32].astype(np.float32) / 31
        t = xs * math.cos(angle) + ys * math.sin(angle)
        t = (t - t.min()) / max(1e-6, float(t.max() - t.min()))
        small = start + (end - start) * t[..., None]
        return Image.fromarray(small.astype(np.uint8)).resize(size, Image.Resampling.BILINEAR)
    if kind == 2:  # mild cloudy noise around a tone plus a little fine grain
        base = _tone(rng)
        cells = (max(2, height // 48), max(2, width // 48))
        clouds = base + rng.normal(0, 12, (*cells, 1)) + rng.normal(0, 5, (*cells, 3))   # mostly brightness
        image = np.asarray(Image.fromarray(np.clip(clouds, 0, 255).astype(np.uint8)).resize(
            size, Image.Resampling.BICUBIC), dtype=np.int16)
        grain = rng.integers(-6, 7, (height, width, 1), dtype=np.int16)
        return Image.fromarray(np.clip(image + grain, 0, 255).astype(np.uint8))
    # a crop of a real photograph with the image's aspect, desaturated, flattened and blurred so objects stand out
    photo = photos[int(rng.integers(len(photos)))]
    photo_w, photo_h = photo.size
    scale = min(photo_w / width, photo_h / height) * rng.uniform(0.55, 1.0)
    crop_w, crop_h = max(1, int(width * scale)), max(1, int(height * scale))
    left = int(rng.integers(0, photo_w - crop_w + 1))
    top = int(rng.integers(0, photo_h - crop_h + 1))
    image = photo.resize(size, Image.Resampling.BILINEAR, box=(left, top, left + crop_w, top + crop_h))
    image = ImageEnhance.Color(image).enhance(rng.uniform(0.25, 0.6))
    image = ImageEnhance.Contrast(image).enhance(rng.uniform(0.55, 0.85))
    return image.filter(ImageFilter.GaussianBlur(rng.uniform(0.8, 2.0) * max(size) / REFERENCE_RESOLUTION))


def _shape_mask(shape: str, side: int) -> Image.Image:
    """A side x side mask (255 inside) of one shape, centred in its square."""
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    last = side - 1
    if shape == "circle":
        draw.ellipse((0, 0, last, last), fill=255)
    elif shape == "square":
        inset = round(0.08 * side)  # a full square would look larger than the other shapes of the same side
        draw.rectangle((inset, inset, last - inset, last - inset), fill=255)
    elif shape == "triangle":
        draw.polygon([(last / 2, 0), (last, last), (0, last)], fill=255)
    elif shape == "diamond":
        draw.polygon([(last / 2, 0), (last, last / 2), (last / 2, last), (0, last / 2)], fill=255)
    elif shape == "star":
        draw.polygon(_star_points(side), fill=255)
    else:
        raise ValueError(f"error: unknown shape {shape!r}; expected one of {SHAPES}")
    return mask


def _star_points(side: int) -> list[tuple[float, float]]:
    outer = (side - 1) / 2
    inner = 0.5 * outer
    # The star's vertical extent is outer * (1 + cos 36°); shift it down so it is centred in the square.
    cx, cy = (side - 1) / 2, (side - 1) / 2 + outer * (1 - math.cos(math.pi / 5)) / 2
    points = []
    for k in range(10):
        radius = outer if k % 2 == 0 else inner
        angle = -math.pi / 2 + k * math.pi / 5
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def _glyph_color(color: tuple[int, int, int]) -> tuple[int, int, int]:
    red, green, blue = color
    return (0, 0, 0) if 0.299 * red + 0.587 * green + 0.114 * blue > 140 else (255, 255, 255)


def _draw_object(image: Image.Image, obj: dict, corner: tuple[int, int], side: int) -> Box:
    """Paint one object at ``corner``; returns its exact pixel box (x1/y1 exclusive)."""
    mask = _shape_mask(obj["shape"], side)
    color = COLORS[obj["color"]]
    image.paste(color, (corner[0], corner[1], corner[0] + side, corner[1] + side), mask)
    if obj["glyph"] is not None:
        font = _font(str(assets.font_path()), max(6, round(_GLYPH_SCALE[obj["shape"]] * side)))
        left, top, right, bottom = font.getbbox(obj["glyph"])
        cx = cy = (side - 1) / 2
        origin = (corner[0] + cx - (left + right) / 2, corner[1] + cy - (top + bottom) / 2)
        ImageDraw.Draw(image).text(origin, obj["glyph"], fill=_glyph_color(color), font=font)
    x0, y0, x1, y1 = mask.getbbox()
    return corner[0] + x0, corner[1] + y0, corner[0] + x1, corner[1] + y1


def _place(rng: np.random.Generator, size: tuple[int, int], sides: list[int],
           min_sides: list[int]) -> list[tuple[int, int, int] | None]:
    """Non-overlapping squares (x, y, side), uniform over the image and a margin apart, one per wanted side.

    An object that finds no room at its side is retried at its minimum side, then left out (None); in practice only
    in thin strips (4:1, 1:4) with many objects.
    """
    width, height = size
    margin = max(3, round(8 * max(size) / REFERENCE_RESOLUTION))   # ~ 8 px of the 336-px square
    edge = 2
    placed: list[tuple[int, int, int]] = []
    result: list[tuple[int, int, int] | None] = []
    for wanted, smallest in zip(sides, min_sides):
        spot = None
        for side in (wanted, smallest):
            side = min(side, width - 2 * edge, height - 2 * edge)
            for _ in range(_MAX_PLACE_TRIES):
                x = int(rng.integers(edge, width - side - edge + 1))
                y = int(rng.integers(edge, height - side - edge + 1))
                if all(x + side + margin <= px or px + ps + margin <= x or y + side + margin <= py
                       or py + ps + margin <= y for px, py, ps in placed):
                    spot = (x, y, side)
                    break
            if spot is not None:
                break
        if spot is not None:
            placed.append(spot)
        result.append(spot)
    return result


def _render(rng: np.random.Generator) -> _Scene:
    aspect, size = _sample_size(rng)
    image = _background(rng, size)
    count = int(rng.integers(OBJECTS_PER_IMAGE[0], OBJECTS_PER_IMAGE[1] + 1))
    scale = max(size) / REFERENCE_RESOLUTION
    combos = rng.choice(len(COLORS) * len(SHAPES), size=count, replace=False)   # colour/shape pairs unique per image
    color_names = list(COLORS)
    objects, sides, min_sides = [], [], []
    for combo in combos:
        shape = SHAPES[combo % len(SHAPES)]
        glyph_draw, glyph = rng.random(), GLYPHS[int(rng.integers(len(GLYPHS)))]
        has_glyph = shape in GLYPH_SHAPES and glyph_draw < GLYPH_PROBABILITY
        low = GLYPH_OBJECT_MIN_UNITS if has_glyph else OBJECT_UNITS_RANGE[0]
        sides.append(max(8, round(rng.uniform(low, OBJECT_UNITS_RANGE[1]) * scale)))
        min_sides.append(max(8, round(low * scale)))
        objects.append({"shape": shape, "color": color_names[combo // len(SHAPES)],
                        "glyph": glyph if has_glyph else None})
    spots = _place(rng, size, sides, min_sides)
    while sum(spot is not None for spot in spots) < OBJECTS_PER_IMAGE[0]:   # never seen; keeps the 2-object floor
        spots = _place(rng, size, sides, min_sides)
    kept = [(obj, spot) for obj, spot in zip(objects, spots) if spot is not None]
    for obj, (x, y, side) in kept:
        obj["box"] = _draw_object(image, obj, (x, y), side)
    objects = [obj for obj, _ in kept]
    return _Scene(image=image, objects=objects, aspect=aspect)


def render_image(rng: np.random.Generator) -> tuple[Image.Image, list[dict]]:
    """One RGB image and its objects: dicts with "shape", "color", "glyph" (upper-case letter or None), "box"."""
    scene = _render(rng)
    return scene.image, scene.objects


# ---------------------------------------------------------------------------------------------------------------------
# Questions


def _name(obj: dict) -> str:
    return f"{obj['color']} {obj['shape']}"


def _centre(box: Box) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def _object_size(obj: dict) -> int:
    x0, y0, x1, y1 = obj["box"]
    return max(x1 - x0, y1 - y0)


def _separated_pairs(objects: list[dict], axis: int) -> list[tuple[dict, dict]]:
    """Ordered pairs (a, b) with a's centre before b's on ``axis`` (0: x, 1: y) by at least one object size."""
    pairs = []
    for a in objects:
        for b in objects:
            gap = _centre(b["box"])[axis] - _centre(a["box"])[axis]
            if a is not b and gap >= max(_object_size(a), _object_size(b)):
                pairs.append((a, b))
    return pairs


def _unique_shape_objects(objects: list[dict]) -> list[dict]:
    return [obj for obj in objects if sum(other["shape"] == obj["shape"] for other in objects) == 1]


def _capacity(family: str, objects: list[dict]) -> int:
    """How many distinct questions of ``family`` the scene allows (capped: exists/relpos allow many)."""
    if family == "color":
        return len(_unique_shape_objects(objects))
    if family == "glyph":
        return sum(obj["glyph"] is not None for obj in objects)
    if family == "relpos":
        return 2 * (len(_separated_pairs(objects, 0)) + len(_separated_pairs(objects, 1)))  # yes and no wordings
    if family == "exists":
        return 2 * len(objects)
    raise ValueError(f"error: unknown family {family!r}; expected one of {FAMILIES}")


def _pick(rng: np.random.Generator, options: list):
    return options[int(rng.integers(len(options)))]


def _ask(family: str, rng: np.random.Generator, objects: list[dict], asked: set[str]) -> tuple[str, str, list[Box]]:
    """(question, answer, evidence boxes) of one question of ``family`` about ``objects``.

    color and glyph questions avoid those in ``asked``; the caller redraws a repeated exists/relpos question.
    """
    if family == "color":
        obj = _pick(rng, [o for o in _unique_shape_objects(objects) if f"What color is the {o['shape']}?" not in asked])
        return f"What color is the {obj['shape']}?", obj["color"], [obj["box"]]
    if family == "glyph":
        obj = _pick(rng, [o for o in objects
                          if o["glyph"] is not None and f"What letter is on the {_name(o)}?" not in asked])
        return f"What letter is on the {_name(obj)}?", obj["glyph"].lower(), [obj["box"]]
    if family == "exists":
        return _ask_exists(rng, objects)
    if family == "relpos":
        return _ask_relpos(rng, objects)
    raise ValueError(f"error: unknown family {family!r}; expected one of {FAMILIES}")


def _ask_exists(rng: np.random.Generator, objects: list[dict]) -> tuple[str, str, list[Box]]:
    if rng.random() < 0.5:
        obj = _pick(rng, objects)
        return f"Is there a {_name(obj)} in the image?", "yes", [obj["box"]]
    # POPE-style adversarial "no": the colour is present on another shape and/or the shape in another colour.
    present = {(obj["color"], obj["shape"]) for obj in objects}
    colors = {obj["color"] for obj in objects}
    shapes = {obj["shape"] for obj in objects}
    both = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present and c in colors and s in shapes]
    one = [(c, s) for c in COLORS for s in SHAPES if (c in colors) != (s in shapes)]
    color, shape = _pick(rng, both if both and (not one or rng.random() < 0.5) else one)
    distractors = [obj["box"] for obj in objects if obj["color"] == color or obj["shape"] == shape]
    return f"Is there a {color} {shape} in the image?", "no", distractors


def _ask_relpos(rng: np.random.Generator, objects: list[dict]) -> tuple[str, str, list[Box]]:
    axes = [axis for axis in (0, 1) if _separated_pairs(objects, axis)]
    axis = _pick(rng, axes)
    first, second = _pick(rng, _separated_pairs(objects, axis))     # first is left of / above second
    answer = "yes" if rng.random() < 0.5 else "no"
    if answer == "no":
        first, second = second, first
    relation = "to the left of" if axis == 0 else "above"
    return f"Is the {_name(first)} {relation} the {_name(second)}?", answer, [first["box"], second["box"]]


def make_items(rng: np.random.Generator, image_name: str, n_questions: int) -> tuple[Image.Image, list[Item]]:
    """One image and ``n_questions`` distinct questions about it (see ``_make_items``)."""
    image, items, _ = _make_items(rng, image_name, n_questions)
    return image, items


def _make_items(rng: np.random.Generator, image_name: str, n_questions: int) -> tuple[Image.Image, list[Item], list]:
    """One image and ``n_questions`` distinct questions about it (families drawn with ``FAMILY_WEIGHTS``).

    The families are drawn first and the image is re-rendered until it allows that many distinct questions of each,
    so the family mix does not depend on which scenes happen to allow a question. ``question_id`` is f"{image stem}#{k}" here;
    ``generate_split`` renumbers it.
    """
    if n_questions < 1:
        raise ValueError(f"error: n_questions={n_questions} must be >= 1")
    families = [FAMILIES[i] for i in rng.choice(len(FAMILIES), size=n_questions, p=list(FAMILY_WEIGHTS.values()))]
    wanted = Counter(families)
    for _ in range(_MAX_RENDER_TRIES):
        scene = _render(rng)
        if all(_capacity(family, scene.objects) >= count for family, count in wanted.items()):
            break
    else:  # practically unreachable: keep the last scene and ask what it allows
        families = [family if _capacity(family, scene.objects) >= wanted[family] else "exists" for family in families]
    stem = Path(image_name).stem
    items: list[Item] = []
    asked: set[str] = set()
    for k, family in enumerate(families):
        for _ in range(50):
            question, answer, evidence = _ask(family, rng, scene.objects, asked)
            if question not in asked:
                break
        else:
            raise RuntimeError(f"no new {family} question found for {image_name!r}; the capacity count is wrong")
        asked.add(question)
        items.append(Item(question_id=f"{stem}#{k}", image=image_name, question=question, answer=answer,
                          family=family, aspect=scene.aspect, image_size=scene.image.size,
                          evidence=tuple(tuple(int(v) for v in box) for box in evidence)))
    return scene.image, items, scene.objects


# ---------------------------------------------------------------------------------------------------------------------
# Streams and written splits


def _check_seed(name: str, value: int) -> None:
    if not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"error: {name}={value!r} must be a non-negative integer")


def training_stream(seed: int, worker: int = 0) -> Iterator[tuple]:
    """Endless (image, question, answer) samples (training's validation questions); the question has no LLaVA
    answer-format suffix.

    Each image carries two questions; a small shuffle buffer spreads them apart. Different ``worker`` values (and
    every written split) draw from independent seed sequences, so no two streams share an image.
    """
    _check_seed("seed", seed)
    _check_seed("worker", worker)
    rng = np.random.default_rng(np.random.SeedSequence([_STREAM_TAG, int(seed), int(worker)]))
    buffer: list[tuple] = []
    while True:
        image, items, _ = _make_items(rng, "", STREAM_QUESTIONS_PER_IMAGE)
        buffer.extend((image, item.question, item.answer) for item in items)
        while len(buffer) >= STREAM_SHUFFLE_BUFFER:
            index = int(rng.integers(len(buffer)))
            buffer[index], buffer[-1] = buffer[-1], buffer[index]
            yield buffer.pop()


def training_conversations(seed: int, worker: int = 0, *, turns: int = 3) -> Iterator[tuple]:
    """Endless (image, [(question, answer), ...] of ``turns`` distinct questions, objects): one image per item,
    for multi-turn training sequences as LLaVA-1.5's own instruction data has them (several questions about one
    image in one conversation). Questions carry no answer-format suffix. Seeded apart from ``training_stream``
    and from every written split, so no conversation shares an image with them or with another worker.
    """
    _check_seed("seed", seed)
    _check_seed("worker", worker)
    if not isinstance(turns, (int, np.integer)) or turns < 1:
        raise ValueError(f"error: turns={turns!r} must be an integer >= 1")
    rng = np.random.default_rng(np.random.SeedSequence([_CONVERSATION_TAG, int(seed), int(worker)]))
    while True:
        image, items, objects = _make_items(rng, "", int(turns))
        yield image, [(item.question, item.answer) for item in items], objects


def split_image_rng(seed: int, image_index: int) -> np.random.Generator:
    """The generator that draws image ``image_index`` of a split written with ``seed``."""
    return np.random.default_rng(np.random.SeedSequence([_SPLIT_TAG, int(seed), int(image_index)]))


def _item_record(item: Item) -> dict:
    return dataclasses.asdict(item)


def item_from_record(record: dict) -> Item:
    """The Item of one items.jsonl line."""
    fields = dict(record)
    fields["image_size"] = tuple(fields["image_size"])
    fields["evidence"] = tuple(tuple(box) for box in fields["evidence"])
    return Item(**fields)


def read_items(split_dir: Path) -> list[Item]:
    """All Items of a folder written by ``generate_split``."""
    with open(Path(split_dir) / "items.jsonl", encoding="utf-8") as handle:
        return [item_from_record(json.loads(line)) for line in handle if line.strip()]


from debias_core.calibrate import file_sha256 as _sha256  # noqa: E402  (the project's one streaming sha256)


# What makes two written parts samples of one split (study.merge); a part adds where it starts and its size.
SPLIT_IDENTITY = ("split", "seed", "questions_per_image", "generator_version", "photos_sha256")


def _manifest_key(manifest: dict) -> dict:
    keys = (*SPLIT_IDENTITY, "n_questions", "first_image")
    return {key: manifest.get(key, 0 if key == "first_image" else None) for key in keys}   # older: first part


def _reuse_or_refuse(out_dir: Path, wanted: dict) -> Path:
    manifest_path = out_dir / "manifest.json"
    fix = "delete the folder or choose another output folder"
    if not manifest_path.is_file():
        raise SplitError(f"error: {out_dir} exists but holds no manifest.json of a generated split; {fix}")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise SplitError(f"error: {manifest_path} is unreadable ({error}); {fix}") from None
    if "parts" in manifest:
        raise SplitError(f"error: {out_dir} joins several parts (python -m study merge): it is for reporting; run "
                         f"more questions in a folder of their own (--eval-first-image) and merge again")
    found = _manifest_key(manifest)
    if found != wanted:
        differences = ", ".join(f"{key}={found[key]!r} (requested {wanted[key]!r})" for key in wanted
                                if found[key] != wanted[key])
        raise SplitError(f"error: {out_dir} holds a different split: {differences}; {fix}")
    items_path = out_dir / "items.jsonl"
    complete = (items_path.is_file() and _sha256(items_path) == manifest.get("items_sha256")
                and all((out_dir / name).is_file() for name in ("questions.jsonl", "answers.jsonl"))
                and len(list((out_dir / "images").glob("*.png"))) == manifest.get("n_images"))
    if not complete:
        raise SplitError(f"error: {out_dir} has the requested manifest but its files are incomplete or changed; {fix}")
    return out_dir


def generate_split(split: str, out_dir: Path, *, n_questions: int, seed: int | None = None,
                   questions_per_image: int = 3, first_image: int = 0, progress: bool = True) -> Path:
    """Write a split in LLaVA's evaluation layout; returns ``out_dir``.

    ``first_image`` > 0 writes a later part of the same seeded split: images ``first_image, first_image + 1, ...``
    (each image is drawn from its own index, so they are the images a larger split would hold there) and question
    ids numbered from ``first_image * questions_per_image``. Two parts whose images do not overlap are disjoint
    samples of one distribution; ``python -m study merge`` joins studies run on them.

    Files: images/<split>_<image index:06d>.png; questions.jsonl ({"question_id", "image", "text", "category"}, text
    ending in LLaVA's single-word suffix, category = family); answers.jsonl ({"question_id", "answer"}); items.jsonl
    (every Item field); manifest.json (split, seed, sizes, generator version, sha256 of the background photos'
    pixels, sha256 of items.jsonl). Question ids are
    f"{split}_{question index:06d}". The folder appears only when complete (written under a temporary name and
    renamed); an existing folder with the same parameters is reused, any other is refused with ``SplitError``.
    """
    if seed is None:
        if split not in SPLIT_SEEDS:
            raise SplitError(f"error: split {split!r} has no default seed; pass seed= or use one of {list(SPLIT_SEEDS)}")
        seed = SPLIT_SEEDS[split]
    _check_seed("seed", seed)
    if n_questions < 1 or questions_per_image < 1:
        raise ValueError(f"error: n_questions={n_questions} and questions_per_image={questions_per_image} must be >= 1")
    if first_image < 0:
        raise ValueError(f"error: first_image={first_image} must be >= 0")
    out_dir = Path(out_dir)
    wanted = {"split": split, "seed": int(seed), "n_questions": int(n_questions),
              "questions_per_image": int(questions_per_image), "first_image": int(first_image),
              "generator_version": GENERATOR_VERSION,
              "photos_sha256": _photos_fingerprint(os.environ.get(assets.ASSETS_ENV))}
    if out_dir.exists():
        if out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        else:
            _reuse_or_refuse(out_dir, wanted)
            if progress:
                print(f"{split}: reusing the identical split in {out_dir}", file=sys.stderr, flush=True)
            return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    if partial.exists():
        shutil.rmtree(partial)
    try:
        _write_split(partial, split, int(seed), n_questions, questions_per_image, int(first_image), progress)
        manifest = dict(wanted, n_images=math.ceil(n_questions / questions_per_image),
                        items_sha256=_sha256(partial / "items.jsonl"))
        (partial / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        os.rename(partial, out_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out_dir


def _write_split(folder: Path, split: str, seed: int, n_questions: int, questions_per_image: int,
                 first_image: int, progress: bool) -> None:
    (folder / "images").mkdir(parents=True)
    n_images = math.ceil(n_questions / questions_per_image)
    with open(folder / "questions.jsonl", "w", encoding="utf-8") as questions, \
            open(folder / "answers.jsonl", "w", encoding="utf-8") as answers, \
            open(folder / "items.jsonl", "w", encoding="utf-8") as records:
        written = 0
        for image_index in range(first_image, first_image + n_images):
            name = f"{split}_{image_index:06d}.png"
            count = min(questions_per_image, n_questions - written)
            image, items = make_items(split_image_rng(seed, image_index), name, count)
            image.save(folder / "images" / name, compress_level=3)
            for k, item in enumerate(items):
                item = dataclasses.replace(item, question_id=f"{split}_{image_index * questions_per_image + k:06d}")
                questions.write(json.dumps({"question_id": item.question_id, "image": item.image,
                                            "text": item.question + LLAVA_ANSWER_SUFFIX,
                                            "category": item.family}) + "\n")
                answers.write(json.dumps({"question_id": item.question_id, "answer": item.answer}) + "\n")
                records.write(json.dumps(_item_record(item)) + "\n")
                written += 1
            done = image_index + 1 - first_image
            if progress and (done == n_images or done % 50 == 0):
                print(f"{split}: {done}/{n_images} images, {written}/{n_questions} questions",
                      file=sys.stderr, flush=True)
