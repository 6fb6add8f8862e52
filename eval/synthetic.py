"""A small synthetic benchmark in LLaVA's POPE format, for the demo and the tests (no downloads).

    python -m eval.synthetic DATA_DIR [--images 4]

writes three benchmarks (registry keys synthetic_wide, synthetic_tall, synthetic_square), one per aspect class,
so that LLaVA's pad preprocessing adds padding below/above (wide), left/right (tall) or none (square):
  DATA_DIR/synthetic/<aspect>/images/img_XX.png         shapes (circle, square, triangle) in colours on a light
                                                        background
  DATA_DIR/synthetic/<aspect>/llava_synthetic.jsonl     {"question_id", "image", "text", "category"} as LLaVA's
                                                        llava_pope_test.jsonl
  DATA_DIR/synthetic/<aspect>/coco/coco_pope_<cat>.json {"question_id", "image", "text", "label": "yes"|"no"}
                                                        per line, in question order, as POPE's label files
                                                        (LLaVA's eval_pope.py reads them)
Two yes/no questions per image: ``shape`` (is a shape of this colour present) and ``color`` (is this shape
present in this colour); each category has yes and no answers.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SIZES = {"wide": [(640, 480), (400, 200), (640, 200), (1000, 300)],
         "tall": [(480, 640), (200, 400), (333, 500), (300, 900)],
         "square": [(500, 500), (336, 336), (800, 800), (224, 224)]}
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30),
          "purple": (140, 60, 180)}
SHAPES = ("circle", "square", "triangle")
SUFFIX = "Answer the question using a single word or phrase."


def _draw(size, objects, rng):
    from PIL import Image, ImageDraw

    w, h = size
    img = Image.new("RGB", size, (235, 232, 225))
    d = ImageDraw.Draw(img)
    for i, (shape, color) in enumerate(objects):
        r = int(min(w, h) * rng.uniform(0.14, 0.22))
        cx = int(w * (i + 0.5) / len(objects) + rng.uniform(-0.05, 0.05) * w)
        cy = int(h * rng.uniform(0.35, 0.65))
        box = [cx - r, cy - r, cx + r, cy + r]
        fill = COLORS[color]
        if shape == "circle":
            d.ellipse(box, fill=fill)
        elif shape == "square":
            d.rectangle(box, fill=fill)
        else:
            d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def build_synthetic(data_dir, *, images: int = 4, seed: int = 0) -> Path:
    """Write the three benchmarks under ``data_dir/synthetic`` and return that folder."""
    for n, aspect in enumerate(SIZES):
        _build_one(Path(data_dir) / "synthetic" / aspect, SIZES[aspect], images, random.Random(seed * 10 + n))
    return Path(data_dir) / "synthetic"


def _build_one(root: Path, sizes: list, images: int, rng: random.Random) -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "coco").mkdir(exist_ok=True)
    questions, labels = [], {"shape": [], "color": []}
    qid = 0
    for n in range(images):
        size = sizes[n % len(sizes)]
        objects = [(rng.choice(SHAPES), rng.choice(list(COLORS))) for _ in range(rng.randint(1, 2))]
        name = f"img_{n:02d}.png"
        _draw(size, objects, rng).save(root / "images" / name)
        shape, color = objects[0]
        present = {(s, c) for s, c in objects}
        want_yes = n % 2 == 0
        # "shape": a present colour with its shape (yes) or a shape never drawn in that colour (no)
        if want_yes:
            ask_shape, label_shape = shape, "yes"
        else:
            ask_shape = next(s for s in SHAPES if (s, color) not in present)
            label_shape = "no"
        # "color": the drawn shape in another colour (no) or its own (yes), alternating the other way round
        if not want_yes:
            ask_color, label_color = color, "yes"
        else:
            ask_color = next(c for c in COLORS if (shape, c) not in present)
            label_color = "no"
        for cat, text, label in (("shape", f"Is there a {color} {ask_shape} in the image?", label_shape),
                                 ("color", f"Is there a {ask_color} {shape} in the image?", label_color)):
            q = {"question_id": qid, "image": name, "text": text + "\n" + SUFFIX, "category": cat}
            questions.append(q)
            labels[cat].append({**q, "label": label})
            qid += 1
    with open(root / "llava_synthetic.jsonl", "w") as f:
        f.writelines(json.dumps(q) + "\n" for q in questions)
    for cat, rows in labels.items():
        with open(root / "coco" / f"coco_pope_{cat}.json", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.synthetic", description=__doc__.split("\n")[0])
    p.add_argument("data_dir")
    p.add_argument("--images", type=int, default=4, help="images per aspect class (2 questions each)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(build_synthetic(a.data_dir, images=a.images, seed=a.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
