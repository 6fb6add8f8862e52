"""The grounded synthetic VQA generator (study.data, study.assets): evidence boxes match the pixels, LLaVA-1.5 pad
geometry of evidence patches, determinism, balance, and the written split's layout and atomicity."""
import hashlib
import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from study import assets, data

OBJECT_RGB = {rgb: name for name, rgb in data.COLORS.items()}
# Smallest share of its own bounding box a shape fills (star ~0.36, triangle/diamond ~0.5), less a glyph's pixels.
MIN_FILL = {"circle": 0.5, "square": 0.5, "triangle": 0.4, "diamond": 0.3, "star": 0.3}


def _record_scenes(monkeypatch):
    """Make data._render keep every scene it draws (the last one is the image make_items returns)."""
    scenes = []
    original = data._render

    def recording(rng):
        scene = original(rng)
        scenes.append(scene)
        return scene

    monkeypatch.setattr(data, "_render", recording)
    return scenes


def _color_mask(pixels, color_name):
    return np.all(pixels == np.array(data.COLORS[color_name], dtype=np.uint8), axis=-1)


def _find(objects, color, shape):
    return [obj for obj in objects if obj["color"] == color and obj["shape"] == shape]


def _scene_items(monkeypatch, seeds, questions=6):
    scenes = _record_scenes(monkeypatch)
    for seed in seeds:
        image, items = data.make_items(np.random.default_rng(seed), f"t_{seed}.png", questions)
        assert scenes[-1].image is image
        yield image, scenes[-1].objects, items


# ---------------------------------------------------------------------------------------------------------------------
# Rendered pixels and evidence boxes


def test_object_boxes_are_tight_and_object_colours_stay_inside_them(monkeypatch):
    for image, objects, _ in _scene_items(monkeypatch, range(12), questions=1):
        pixels = np.asarray(image)
        height, width, _ = pixels.shape
        inside_any = np.zeros((height, width), dtype=bool)
        for obj in objects:
            x0, y0, x1, y1 = obj["box"]
            assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
            inside_any[y0:y1, x0:x1] = True
            own = _color_mask(pixels, obj["color"])
            box = own[y0:y1, x0:x1]
            assert box.mean() >= MIN_FILL[obj["shape"]], (obj, box.mean())
            # tight: the colour reaches every edge of the box, and not one pixel of it in a 3-px ring around it
            assert box[0].any() and box[-1].any() and box[:, 0].any() and box[:, -1].any(), obj
            ring = own[max(0, y0 - 3):y1 + 3, max(0, x0 - 3):x1 + 3].sum() - box.sum()
            assert ring == 0, obj
        outside = pixels[~inside_any]
        for name in data.COLORS:
            assert not _color_mask(outside, name).any(), f"{name} drawn outside every object box"


def test_items_name_their_objects_and_evidence_is_those_objects(monkeypatch):
    seen = Counter()
    for _, objects, items in _scene_items(monkeypatch, range(40)):
        for item in items:
            seen[item.family, item.answer if item.answer in ("yes", "no") else "word"] += 1
            words = item.question.rstrip("?").split()
            if item.family == "color":
                (obj,) = [o for o in objects if o["shape"] == words[-1]]        # the shape occurs once
                assert item.answer == obj["color"] and item.evidence == (obj["box"],)
            elif item.family == "glyph":
                (obj,) = _find(objects, words[-2], words[-1])
                assert item.answer == obj["glyph"].lower() and item.evidence == (obj["box"],)
            elif item.family == "exists":
                color, shape = words[3], words[4]
                found = _find(objects, color, shape)
                assert item.answer == ("yes" if found else "no")
                if found:
                    assert item.evidence == (found[0]["box"],)
                else:
                    distractors = tuple(o["box"] for o in objects if o["color"] == color or o["shape"] == shape)
                    assert item.evidence == distractors and distractors, item   # adversarial: something shares
            else:
                (first,) = _find(objects, words[2], words[3])
                (second,) = _find(objects, words[-2], words[-1])
                axis = 0 if "left" in words else 1
                gap = data._centre(second["box"])[axis] - data._centre(first["box"])[axis]
                assert abs(gap) >= max(data._object_size(first), data._object_size(second))
                assert item.answer == ("yes" if gap > 0 else "no")
                assert item.evidence == (first["box"], second["box"])
    assert {family for family, _ in seen} == set(data.FAMILIES)


def test_evidence_pixels_hold_the_queried_colour(monkeypatch):
    """From pixels alone: each named object's colour fills its evidence box (catches a shifted or swapped box)."""
    for image, _, items in _scene_items(monkeypatch, range(100, 130)):
        pixels = np.asarray(image)
        for item in items:
            words = item.question.rstrip("?").split()
            if item.family == "color":
                named = [(item.answer, words[-1])]
            elif item.family == "glyph":
                named = [(words[-2], words[-1])]
            elif item.family == "relpos":
                named = [(words[2], words[3]), (words[-2], words[-1])]
            elif item.answer == "yes":
                named = [(words[3], words[4])]
            else:
                continue
            for (color, shape), (x0, y0, x1, y1) in zip(named, item.evidence):
                share = _color_mask(pixels[y0:y1, x0:x1], color).mean()
                assert share >= MIN_FILL[shape], (item, share)


# ---------------------------------------------------------------------------------------------------------------------
# LLaVA-1.5 pad geometry


def test_pad_offset_is_floor_of_half_the_difference():
    assert data.pad_offset((336, 336)) == (0, 0)
    assert data.pad_offset((672, 336)) == (0, 168)
    assert data.pad_offset((672, 335)) == (0, 168)       # 337 / 2 = 168.5 -> 168, as expand2square pastes
    assert data.pad_offset((335, 672)) == (168, 0)
    assert data.pad_offset((100, 37)) == (0, 31)


def test_evidence_patches_square_image_hand_computed():
    size = (336, 336)
    assert data.evidence_patches([(0, 0, 14, 14)], size) == [0]
    assert data.evidence_patches([(14, 0, 28, 14)], size) == [1]
    assert data.evidence_patches([(7, 0, 21, 14)], size) == [0, 1]            # half of each
    assert data.evidence_patches([(10, 0, 24, 14)], size) == [0, 1]           # 4/14 = 29 % of patch 0
    assert data.evidence_patches([(11, 0, 25, 14)], size) == [1]              # 3/14 = 21 % of patch 0
    assert data.evidence_patches([(7, 7, 14, 14)], size) == [0]               # exactly 25 %
    assert data.evidence_patches([(8, 7, 14, 14)], size) == []                # just under 25 %
    assert data.evidence_patches([(322, 322, 336, 336)], size) == [575]
    assert data.evidence_patches([(0, 28, 28, 56)], size) == [48, 49, 72, 73]
    # a double-resolution square image: the same boxes scaled by 2 give the same patches
    assert data.evidence_patches([(0, 56, 56, 112)], (672, 672)) == [48, 49, 72, 73]


def test_evidence_patches_landscape_shifts_rows_by_the_padding():
    # 672 x 336 -> S = 672, content pasted at y = 168, scale 0.5: a 28-px box at the image's top-left lands in
    # resized (0..14, 84..98), i.e. row 6, col 0.
    assert data.evidence_patches([(0, 0, 28, 28)], (672, 336)) == [6 * 24]
    assert data.evidence_patches([(644, 308, 672, 336)], (672, 336)) == [17 * 24 + 23]
    # odd padding: 672 x 335 pads 168 above (floor), so the same box still starts at padded y = 168
    assert data.evidence_patches([(0, 0, 28, 28)], (672, 335)) == [6 * 24]
    # 672 x 333: 169 above; padded y 169..197 covers row 6 by 27/28 (>= 25 %) and row 7 by 1/28 (< 25 %)
    assert data.evidence_patches([(0, 0, 28, 28)], (672, 333)) == [6 * 24]
    assert data.evidence_patches([(0, 7, 28, 35)], (672, 334)) == [6 * 24, 7 * 24]   # 168 + 7 = 175: 21/28, 7/28


def test_evidence_patches_portrait_shifts_columns_by_the_padding():
    assert data.evidence_patches([(0, 0, 28, 28)], (336, 672)) == [6]
    assert data.evidence_patches([(308, 644, 336, 672)], (336, 672)) == [23 * 24 + 17]


def test_boxes_in_the_padding_give_no_patches_and_patches_never_cover_padding_only():
    assert data.evidence_patches([(0, -40, 50, -1)], (672, 336)) == []          # above the image: padding
    assert data.evidence_patches([(-50, 0, -1, 50)], (336, 672)) == []
    assert data.evidence_patches([(0, -168, 672, 0)], (672, 336)) == []
    # a box clipped at the image's edge keeps only the in-image part: rows 6..17 are the content rows of 672 x 336
    full = data.evidence_patches([(0, -1000, 672, 1000)], (672, 336))
    assert full == [row * 24 + col for row in range(6, 18) for col in range(24)]
    # over many generated items, no patch lies entirely in the padding
    rng = np.random.default_rng(5)
    for _ in range(30):
        _, items = data.make_items(rng, "x.png", 3)
        for item in items:
            width, height = item.image_size
            side = max(width, height)
            dx, dy = data.pad_offset(item.image_size)
            for index in data.evidence_patches(item.evidence, item.image_size):
                row, col = divmod(index, 24)
                assert (row + 1) * side > dy * 24 and row * side < (dy + height) * 24
                assert (col + 1) * side > dx * 24 and col * side < (dx + width) * 24


def test_row_band_uses_padded_square_coordinates():
    assert data.row_band([(0, 0, 10, 10)], (336, 336)) == "top"
    assert data.row_band([(0, 150, 10, 160)], (336, 336)) == "middle"
    assert data.row_band([(0, 300, 10, 336)], (336, 336)) == "bottom"
    assert data.row_band([(0, 111, 10, 112)], (336, 336)) == "top"           # centre 111.5 < 112: row 7
    assert data.row_band([(0, 112, 10, 113)], (336, 336)) == "middle"        # centre 112.5: row 8
    # mean of the box centres: one at the top and one at the bottom average to the middle
    assert data.row_band([(0, 0, 10, 10), (0, 326, 10, 336)], (336, 336)) == "middle"
    # a landscape strip 4:1 (672 x 168, 252 px of padding above): even its top edge is in the middle band
    assert data.row_band([(0, 0, 20, 20)], (672, 168)) == "middle"
    # 672 x 336: content rows 6..17 of 24; padded centre y 178 -> row 6 (top), 328 -> row 11 (middle), 494 -> row 17
    assert data.row_band([(0, 0, 20, 20)], (672, 336)) == "top"
    assert data.row_band([(0, 150, 20, 170)], (672, 336)) == "middle"
    assert data.row_band([(0, 316, 20, 336)], (672, 336)) == "bottom"
    assert data.row_band([(0, 330, 20, 336)], (336, 672)) == "middle"
    assert data.row_band([(0, 660, 20, 672)], (336, 672)) == "bottom"
    with pytest.raises(ValueError, match="error: row_band"):
        data.row_band([], (336, 336))


def test_geometry_matches_llava_expand2square():
    """The offset is LLaVA's own: paste a white box via llava.mm_utils.expand2square and find it in the padded image."""
    mm_utils = pytest.importorskip("llava.mm_utils", reason="llava-torch not installed: upstream padding not compared")
    for size, box in [((500, 211), (40, 30, 90, 80)), ((211, 500), (30, 40, 80, 90)), ((401, 400), (0, 0, 5, 5))]:
        image = Image.new("RGB", size, (0, 0, 0))
        image.paste((255, 255, 255), box)
        square = np.asarray(mm_utils.expand2square(image, (7, 7, 7)))
        ys, xs = np.nonzero(square[..., 0] == 255)
        dx, dy = data.pad_offset(size)
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy)


# ---------------------------------------------------------------------------------------------------------------------
# Determinism, seeds, balance


def test_same_seed_same_items_and_image_bytes():
    image_a, items_a = data.make_items(np.random.default_rng(11), "a.png", 3)
    image_b, items_b = data.make_items(np.random.default_rng(11), "a.png", 3)
    assert items_a == items_b and image_a.tobytes() == image_b.tobytes()
    image_c, items_c = data.make_items(np.random.default_rng(12), "a.png", 3)
    assert image_c.tobytes() != image_a.tobytes()


def _image_hashes(images):
    return {hashlib.sha256(image.tobytes()).hexdigest() for image in images}


def test_splits_and_training_workers_share_no_image(monkeypatch):
    """Every image a stream renders (yielded or still buffered) differs from every split's images and other workers'."""
    count = data.STREAM_QUESTIONS_PER_IMAGE     # same call as the stream makes, so equal seeds would give equal images
    per_split = {name: _image_hashes(data.make_items(data.split_image_rng(seed, i), "x.png", count)[0]
                                     for i in range(4)) for name, seed in data.SPLIT_SEEDS.items()}
    rendered = []
    original = data._make_items   # what the stream calls (it also keeps the objects for training targets)

    def recording(rng, name, n):
        image, items, objects = original(rng, name, n)
        rendered.append(image)
        return image, items, objects

    monkeypatch.setattr(data, "_make_items", recording)
    per_worker, first_yields_by_worker = [], []
    for worker in (0, 1):
        rendered.clear()
        stream = data.training_stream(data.SPLIT_SEEDS["train"], worker)
        first_yields = [next(stream)[0] for _ in range(4)]
        assert _image_hashes(first_yields) <= _image_hashes(rendered)
        per_worker.append(_image_hashes(rendered))
        first_yields_by_worker.append(first_yields)
    groups = list(per_split.values()) + per_worker
    for i, first in enumerate(groups):
        for second in groups[i + 1:]:
            assert not first & second
    # and the stream itself is reproducible
    rendered.clear()
    again = data.training_stream(data.SPLIT_SEEDS["train"], 0)
    assert [image.tobytes() for image, _, _ in (next(again) for _ in range(4))] == [
        image.tobytes() for image in first_yields_by_worker[0]]
    assert _image_hashes(rendered) == per_worker[0]


def test_training_stream_yields_single_word_answers():
    stream = data.training_stream(3, worker=2)
    for _ in range(40):
        image, question, answer = next(stream)
        assert isinstance(image, Image.Image) and question.endswith("?") and "\n" not in question
        assert answer and answer == answer.lower() and " " not in answer


@pytest.fixture(scope="module")
def split_500(tmp_path_factory):
    return data.generate_split("eval", tmp_path_factory.mktemp("split") / "eval", n_questions=500, progress=False)


def test_split_balance_families_aspects_and_bands(split_500):
    items = data.read_items(split_500)
    assert len(items) == 500
    families = Counter(item.family for item in items)
    assert set(families) == set(data.FAMILIES)
    for family, weight in data.FAMILY_WEIGHTS.items():
        assert abs(families[family] / 500 - weight) < 0.08, families
    assert {item.aspect for item in items} == set(data.ASPECTS)
    for item in items:
        assert item.answer and " " not in item.answer and item.answer == item.answer.lower()
        assert len(item.evidence) >= 1
    yes_no = [item.answer for item in items if item.family in ("exists", "relpos")]
    for family in ("exists", "relpos"):
        answers = Counter(item.answer for item in items if item.family == family)
        assert set(answers) == {"yes", "no"} and abs(answers["yes"] / sum(answers.values()) - 0.5) < 0.15, answers
    assert abs(yes_no.count("yes") / len(yes_no) - 0.5) < 0.1
    colours = Counter(item.answer for item in items if item.family == "color")
    assert set(colours) == set(data.COLORS)
    bands = Counter(data.row_band(item.evidence, item.image_size) for item in items)
    assert all(bands[band] >= 0.15 * 500 for band in ("top", "middle", "bottom")), bands


def test_split_files_are_llava_format(split_500):
    questions = [json.loads(line) for line in (split_500 / "questions.jsonl").read_text().splitlines()]
    answers = [json.loads(line) for line in (split_500 / "answers.jsonl").read_text().splitlines()]
    items = data.read_items(split_500)
    assert [q["question_id"] for q in questions] == [f"eval_{i:06d}" for i in range(500)]
    assert [a["question_id"] for a in answers] == [q["question_id"] for q in questions]
    for question, answer, item in zip(questions, answers, items):
        assert set(question) == {"question_id", "image", "text", "category"}
        assert question["text"] == item.question + "\nAnswer the question using a single word or phrase."
        assert question["category"] == item.family and answer["answer"] == item.answer
        assert question["image"] == item.image
    with Image.open(split_500 / "images" / items[0].image) as first:
        assert first.size == items[0].image_size
    manifest = json.loads((split_500 / "manifest.json").read_text())
    assert manifest["split"] == "eval" and manifest["seed"] == data.SPLIT_SEEDS["eval"]
    assert manifest["n_questions"] == 500 and manifest["generator_version"] == data.GENERATOR_VERSION
    assert manifest["photos_sha256"] == assets.photos_fingerprint()
    assert manifest["items_sha256"] == hashlib.sha256((split_500 / "items.jsonl").read_bytes()).hexdigest()
    assert len(list((split_500 / "images").glob("*.png"))) == manifest["n_images"] == 167


def test_split_matches_in_memory_generation(split_500):
    """The written images are make_items' images for split_image_rng(seed, i): the split is the documented recipe."""
    items = data.read_items(split_500)
    image, expected = data.make_items(data.split_image_rng(data.SPLIT_SEEDS["eval"], 5), "eval_000005.png", 3)
    with Image.open(split_500 / "images" / "eval_000005.png") as written:
        assert written.convert("RGB").tobytes() == image.tobytes()
    assert [(i.question, i.answer, i.evidence) for i in items[15:18]] == [(i.question, i.answer, i.evidence)
                                                                         for i in expected]


def test_generate_split_is_atomic(tmp_path, monkeypatch):
    calls = []
    original = data.make_items

    def failing(rng, name, count):
        calls.append(name)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return original(rng, name, count)

    monkeypatch.setattr(data, "make_items", failing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        data.generate_split("calib", tmp_path / "calib", n_questions=12, progress=False)
    assert len(calls) == 3
    assert list(tmp_path.iterdir()) == []          # neither the folder nor a partial one is left


def test_generate_split_reuses_identical_and_refuses_different(tmp_path, monkeypatch):
    out = tmp_path / "calib"
    data.generate_split("calib", out, n_questions=4, questions_per_image=2, progress=False)
    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert data.generate_split("calib", out, n_questions=4, questions_per_image=2, progress=False) == out
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    with pytest.raises(data.SplitError, match=rf"error: {out} holds a different split.*delete the folder"):
        data.generate_split("calib", out, n_questions=5, questions_per_image=2, progress=False)
    with pytest.raises(data.SplitError, match="holds a different split"):
        data.generate_split("calib", out, n_questions=4, questions_per_image=2, seed=9, progress=False)
    # the same parameters drawn over other background photos are a different split too
    monkeypatch.setattr(data, "_photos_fingerprint", lambda _: "0" * 64)
    with pytest.raises(data.SplitError, match="holds a different split"):
        data.generate_split("calib", out, n_questions=4, questions_per_image=2, progress=False)
    monkeypatch.undo()
    (out / "items.jsonl").write_text("tampered\n")
    with pytest.raises(data.SplitError, match="incomplete or changed"):
        data.generate_split("calib", out, n_questions=4, questions_per_image=2, progress=False)
    stranger = tmp_path / "other"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(data.SplitError, match=rf"error: {stranger} exists but holds no manifest"):
        data.generate_split("calib", stranger, n_questions=4, progress=False)
    with pytest.raises(data.SplitError, match="no default seed"):
        data.generate_split("test", tmp_path / "test", n_questions=4, progress=False)


# ---------------------------------------------------------------------------------------------------------------------
# Assets


def test_export_assets_round_trip(tmp_path, monkeypatch):
    monkeypatch.delenv(assets.ASSETS_ENV, raising=False)
    source_photos = assets.background_photos()
    written = assets.export_assets(tmp_path / "assets")
    assert sum(path.stat().st_size for path in written) < 3 * 2**20
    monkeypatch.setenv(assets.ASSETS_ENV, str(tmp_path / "assets"))
    assert assets.font_path() == tmp_path / "assets" / assets.FONT_NAME
    exported = assets.background_photos()
    assert len(exported) == len(source_photos)
    assert all(max(photo.size) <= assets.EXPORT_LONG_SIDE and photo.mode == "RGB" for photo in exported)
    # the generator runs on the exported assets alone
    image, items = data.make_items(np.random.default_rng(0), "x.png", 2)
    assert image.size == items[0].image_size


def test_missing_assets_folder_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv(assets.ASSETS_ENV, str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="error: STUDY_ASSETS=.*export_assets"):
        assets.font_path()
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv(assets.ASSETS_ENV, str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="DejaVuSans-Bold.ttf is missing"):
        assets.font_path()
    assert assets.background_photos() == []


def test_exported_assets_reproduce_the_same_images(tmp_path, monkeypatch):
    """A machine with only the exported folder draws byte-identical images (photo backgrounds included)."""
    monkeypatch.delenv(assets.ASSETS_ENV, raising=False)
    if not assets.background_photos():
        pytest.skip("no package photos installed here: photo backgrounds not compared")
    seeds = range(30)      # ~30 % photo backgrounds: about nine of them
    here = [data.make_items(np.random.default_rng(seed), "x.png", 1)[0].tobytes() for seed in seeds]
    fingerprint_here = assets.photos_fingerprint()
    assets.export_assets(tmp_path / "assets")
    monkeypatch.setenv(assets.ASSETS_ENV, str(tmp_path / "assets"))
    there = [data.make_items(np.random.default_rng(seed), "x.png", 1)[0].tobytes() for seed in seeds]
    assert here == there
    assert assets.photos_fingerprint() == fingerprint_here


def test_conversation_objects_are_the_images_objects():
    """A training conversation's object list (the dense read-outs' targets) is the image's: boxes hold the drawn
    colours."""
    conversations = data.training_conversations(7, 0, turns=3)
    for _ in range(3):
        image, turns, objects = next(conversations)
        assert len(turns) == 3
        assert objects and all({"shape", "color", "glyph", "box"} <= set(o) for o in objects)
        pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
        for o in objects:
            x0, y0, x1, y1 = o["box"]
            patch = pixels[y0:y1, x0:x1].reshape(-1, 3)
            near = np.abs(patch - np.array(data.COLORS[o["color"]])).sum(axis=1) < 60
            assert near.mean() > 0.2, (o, near.mean())
