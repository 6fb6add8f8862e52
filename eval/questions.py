"""Reading a benchmark's question file into samples, prompting exactly as LLaVA's eval module does.

A ``Sample`` carries what the driver needs: ``question`` (text given to the model, image token not included:
the adapter adds "<image>\\n" in front as every LLaVA module does), ``prompt`` (the answer file's ``prompt``
field, as that module writes it), the image (loaded lazily) and extra answer fields (MMBench's options).
"""
from __future__ import annotations

import base64
import csv
import io
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .benchmarks import Benchmark
from .common import EvalError

MMBENCH_OPTIONS = ("A", "B", "C", "D")


@dataclass
class Sample:
    question_id: object
    question: str
    prompt: str
    image_path: Path | None = None
    image_b64: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def has_image(self) -> bool:
        return self.image_path is not None or self.image_b64 is not None

    def load_image(self):
        """PIL RGB image, or None for a text-only sample."""
        from PIL import Image

        if self.image_path is not None:
            if not self.image_path.exists():
                raise EvalError(f"image {self.image_path} of question {self.question_id!r} does not exist; "
                                f"the image folder is incomplete")
            return Image.open(self.image_path).convert("RGB")
        if self.image_b64 is not None:
            return Image.open(io.BytesIO(base64.b64decode(self.image_b64))).convert("RGB")
        return None


def _is_none(value) -> bool:
    """LLaVA model_vqa_mmbench.is_none, for csv strings (pandas would have given NaN for empty cells)."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in ("", "nan", "none")


def _jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise EvalError(f"{path} line {n} is not JSON ({e})") from None
    return rows


def _loader_samples(bench: Benchmark, path: Path, images: Path | None) -> list[Sample]:
    out = []
    for row in _jsonl(path):
        try:
            qid, text, image = row["question_id"], row["text"], row.get("image")
        except KeyError as e:
            raise EvalError(f"{path}: a question lacks {e} (LLaVA jsonl needs question_id, text, image)") from None
        q = text if bench.suffix is None else text + "\n" + bench.suffix
        out.append(Sample(qid, q, text, (images / image) if image else None))
    return out


def _science_samples(bench: Benchmark, path: Path, images: Path | None) -> list[Sample]:
    """model_vqa_science.py: the question is the first human turn without '<image>'; the prompt field gets
    '<image>\\n' in front for image questions (eval_science_qa reads that to count IMG-Accuracy)."""
    out = []
    for row in json.loads(path.read_text(encoding="utf-8")):
        qs = row["conversations"][0]["value"].replace("<image>", "").strip()
        has_image = "image" in row
        if bench.image_only and not has_image:
            continue
        prompt = ("<image>\n" + qs) if has_image else qs
        if bench.suffix:
            qs, prompt = qs + "\n" + bench.suffix, prompt + "\n" + bench.suffix
        out.append(Sample(row["id"], qs, prompt, (images / row["image"]) if has_image else None))
    return out


def _int_or_str(value: str):
    try:
        return int(value)
    except ValueError:
        return value


def _mmbench_samples(bench: Benchmark, path: Path, images: Path | None) -> list[Sample]:
    """model_vqa_mmbench.py without --all-rounds (as LLaVA's scripts run it): one round per row."""
    csv.field_size_limit(sys.maxsize)
    out = []
    with open(path, encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            options = []
            for o in MMBENCH_OPTIONS:
                if _is_none(row.get(o)):
                    break
                options.append(row[o])
            question = row["question"]
            if not _is_none(row.get("hint")):
                question = row["hint"] + "\n" + question
            for char, option in zip(MMBENCH_OPTIONS, options):
                question = question + "\n" + char + ". " + option
            qs = question if bench.suffix is None else question + "\n" + bench.suffix
            extra = {"round_id": 0, "options": options, "option_char": list(MMBENCH_OPTIONS[:len(options)])}
            out.append(Sample(_int_or_str(row["index"]), qs, question, image_b64=row["image"], extra=extra))
    return out


READERS = {"jsonl": _loader_samples, "sqa": _science_samples, "tsv": _mmbench_samples}


def load_samples(bench: Benchmark, data_dir, limit: int | None = None) -> list[Sample]:
    """All samples of ``bench`` in question-file order (the first ``limit`` if given)."""
    bench.check_data(data_dir)
    samples = READERS[bench.fmt](bench, bench.questions_path(data_dir), bench.images_path(data_dir))
    seen = set()
    for s in samples:
        key = json.dumps(s.question_id)
        if key in seen:
            raise EvalError(f"{bench.questions_path(data_dir)} has question_id {s.question_id!r} twice; "
                            f"answers are matched by question_id, so ids must be unique")
        seen.add(key)
    return samples if limit is None else samples[:limit]
