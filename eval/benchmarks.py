"""The benchmark registry: one entry per benchmark instead of one script per (method, benchmark).

Data layout is LLaVA's (docs/Evaluation.md, its eval.zip): ``$DATA_DIR/<folder>/...``, where DATA_DIR is
typically ``playground/data/eval``. Each entry names the question file, image folder, LLaVA eval module whose
prompting it follows (loader = model_vqa_loader, vqa = model_vqa, science = model_vqa_science, mmbench =
model_vqa_mmbench), the prompt suffix that module appends, ``max_new_tokens`` as in LLaVA, and the scorer.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .common import EvalError

SINGLE_PRED = "Answer with the option's letter from the given choices directly."
SINGLE_PRED_CN = "请直接回答选项字母。"
GET_DATA = "download LLaVA's eval data (docs/Evaluation.md in third_party/LLaVA: eval.zip, then the {what}) into {path}"


@dataclass(frozen=True)
class Benchmark:
    key: str                    # registry key, also the paper-preset benchmark name where one exists
    title: str                  # display name in tables and charts
    folder: str                 # under DATA_DIR
    question_file: str          # relative to folder
    image_folder: str | None    # relative to folder; None = images inside the question file (MMBench tsv)
    module: str                 # loader | vqa | science | mmbench
    scoring: str                # local | server | judge
    metric: str                 # the headline metric name in score.json
    fmt: str = "jsonl"          # jsonl | sqa (ScienceQA json list) | tsv (MMBench)
    suffix: str | None = None   # appended to the question as "\n" + suffix (LLaVA's --single-pred-prompt)
    max_new_tokens: int = 128   # model_vqa_loader 128; model_vqa / science / mmbench 1024
    image_only: bool = False    # skip text-only questions (ScienceQA-IMG)
    preset: str | None = None   # benchmark name of the paper's trend presets (None: no preset)
    data_hint: str = "the benchmark's images"
    scale: float = 1.0          # headline metric / scale = percent, for averages (MME perception: 2000 max)
    extra_files: tuple = field(default_factory=tuple)  # files the scorer needs, relative to folder (the run scripts
    #                                                    check them before any answer; POPE's coco/ labels have their own check)

    def root(self, data_dir) -> Path:
        return Path(data_dir) / self.folder

    def questions_path(self, data_dir) -> Path:
        return self.root(data_dir) / self.question_file

    def images_path(self, data_dir) -> Path | None:
        return None if self.image_folder is None else self.root(data_dir) / self.image_folder

    def check_data(self, data_dir) -> None:
        """One-line EvalError naming the first missing path and how to get it."""
        if data_dir is None:
            raise EvalError(f"no data folder given for {self.key}: set DATA_DIR (or --data-dir) to LLaVA's "
                            f"playground/data/eval")
        for path in (self.root(data_dir), self.questions_path(data_dir), self.images_path(data_dir)):
            if path is not None and not path.exists():
                raise EvalError(f"{self.title}: {path} does not exist; "
                                + GET_DATA.format(what=self.data_hint, path=self.root(data_dir)))


B = Benchmark
REGISTRY: dict[str, Benchmark] = {b.key: b for b in [
    B("gqa", "GQA", "gqa", "llava_gqa_testdev_balanced.jsonl", "data/images", "loader", "local", "accuracy",
      preset="gqa", extra_files=('data/eval/eval.py',), data_hint="GQA images into data/images and GQA's eval/eval.py with its testdev_balanced files "
                              "into data/"),
    B("mmbench", "MMBench", "mmbench", "mmbench_dev_20230712.tsv", None, "mmbench", "local", "accuracy",
      fmt="tsv", suffix=SINGLE_PRED, max_new_tokens=1024, preset="mmbench", data_hint="mmbench_dev_20230712.tsv"),
    B("mmbench_cn", "MMBench-CN", "mmbench_cn", "mmbench_dev_cn_20231003.tsv", None, "mmbench", "local",
      "accuracy", fmt="tsv", suffix=SINGLE_PRED_CN, max_new_tokens=1024, preset="mmbench_cn",
      data_hint="mmbench_dev_cn_20231003.tsv"),
    B("mme", "MME", "MME", "llava_mme.jsonl", "MME_Benchmark_release_version", "loader", "local", "perception",
      preset="mme", scale=20.0, extra_files=('convert_answer_to_mme.py', 'eval_tool/calculation.py'), data_hint="MME_Benchmark_release_version and MME's eval_tool"),
    B("mmvet", "MM-Vet", "mm-vet", "llava-mm-vet.jsonl", "images", "vqa", "judge", "total",
      max_new_tokens=1024, preset="mmvet", data_hint="mm-vet images and mm-vet.json"),
    B("pope", "POPE", "pope", "llava_pope_test.jsonl", "val2014", "loader", "local", "f1", preset="pope",
      data_hint="COCO val2014 images and POPE's coco/coco_pope_*.json"),
    B("scienceqa", "ScienceQA-IMG", "scienceqa", "llava_test_CQM-A.json", "images/test", "science", "local",
      "img_accuracy", fmt="sqa", suffix=SINGLE_PRED, max_new_tokens=1024, image_only=True, preset="scienceqa",
      extra_files=('problems.json', 'pid_splits.json'), data_hint="ScienceQA images/test, problems.json and pid_splits.json"),
    B("textvqa", "TextVQA", "textvqa", "llava_textvqa_val_v051_ocr.jsonl", "train_images", "loader", "local",
      "accuracy", preset="textvqa", extra_files=('TextVQA_0.5.1_val.json',), data_hint="TextVQA train_images and TextVQA_0.5.1_val.json"),
    B("vizwiz", "VizWiz", "vizwiz", "llava_test.jsonl", "test", "loader", "server", "accuracy", preset="vizwiz",
      data_hint="VizWiz test images"),
    B("vqav2", "VQAv2", "vqav2", "llava_vqav2_mscoco_test-dev2015.jsonl", "test2015", "loader", "server",
      "accuracy", preset="vqav2", extra_files=('llava_vqav2_mscoco_test2015.jsonl',), data_hint="COCO test2015 images"),
    B("seed", "SEED-Bench", "seed_bench", "llava-seed-bench.jsonl", "", "loader", "local", "image_accuracy",
      extra_files=('SEED-Bench.json',), data_hint="SEED-Bench images, extracted video frames and SEED-Bench.json"),
    # The embedded demo's benchmarks (eval.synthetic): POPE-format yes/no questions on generated images.
    *[B(f"synthetic_{a}", f"Synthetic-{a}", f"synthetic/{a}", "llava_synthetic.jsonl", "images", "loader", "local",
        "f1", data_hint="python -m eval.synthetic DATA_DIR") for a in ("wide", "tall", "square")],
    # Any LLaVA-format question file with single-word answers: DATA_DIR holds questions.jsonl (question_id, image,
    # text), images/ and answers.jsonl (question_id, answer: a string or a list of accepted strings); scored by
    # exact match after LLaVA's answer normalisation (eval.scoring.score_exact_match).
    B("custom", "Custom questions", "", "questions.jsonl", "images", "loader", "local", "accuracy",
      max_new_tokens=16, extra_files=("answers.jsonl",),
      data_hint="questions.jsonl, images/ and answers.jsonl (see README: bring your own questions)"),
    # The study model's grounded synthetic VQA (python -m study data): the same layout, one folder per split.
    B("study", "Study VQA", "", "questions.jsonl", "images", "loader", "local", "accuracy", max_new_tokens=16,
      extra_files=("answers.jsonl",), data_hint="the split written by python -m study data --split eval --out DIR"),
]}
SYNTHETIC = ("synthetic_wide", "synthetic_tall", "synthetic_square")

# The ten image benchmarks of the paper (SEED-Bench and the synthetic ones are extra).
PAPER_BENCHMARKS = ("gqa", "mmbench", "mmbench_cn", "mme", "mmvet", "pope", "scienceqa", "textvqa", "vizwiz", "vqav2")


def get_benchmark(key: str) -> Benchmark:
    if key not in REGISTRY:
        raise EvalError(f"benchmark {key!r} is unknown; use one of {', '.join(REGISTRY)}")
    return REGISTRY[key]
