"""Scoring with LLaVA's own scorers and converters, run as LLaVA's scripts run them (never rewritten).

Where they come from: third_party/LLaVA when populated (``llava/eval/*.py`` and ``scripts/convert_*.py``),
else the installed llava-torch 1.2.2.post1 for ``llava/eval`` (its wheel has no ``scripts/``: a benchmark that
needs a converter then fails with an error naming the missing file). Each scorer runs in a subprocess of the
current interpreter with that LLaVA first on PYTHONPATH, and its printed result is parsed.

  benchmark    LLaVA tool (what is parsed)                                   headline
  pope         llava/eval/eval_pope.py (per-category Accuracy, F1)            mean F1 ×100
  scienceqa    llava/eval/eval_science_qa.py (IMG-Accuracy)                   IMG-Accuracy
  textvqa      python -m llava.eval.eval_textvqa (m4c evaluator)              Accuracy
  gqa          scripts/convert_gqa_for_eval.py + GQA's eval/eval.py           Accuracy
  mme          MME/convert_answer_to_mme.py + MME eval_tool/calculation.py    Perception total
  seed         scripts/convert_seed_for_submission.py                        image accuracy
  mmbench(_cn) scripts/convert_mmbench_for_submission.py (upload xlsx); dev accuracy locally (below)
  vizwiz       scripts/convert_vizwiz_for_submission.py                      server (EvalAI)
  vqav2        scripts/convert_vqav2_for_submission.py                       server (EvalAI)
  mmvet        scripts/convert_mmvet_for_eval.py + MM-Vet's GPT-4 judge       needs OPENAI_API_KEY

MMBench dev: LLaVA ships no local scorer (it submits to the server). The dev tsv has the answers, so
``mmbench_accuracy`` compares the predicted option letter with them: plain accuracy per row and circular
accuracy (a question counts only if every rotated copy, index mod 1e6, is right), OpenCompass's rule.
"""
from __future__ import annotations

import csv
import importlib.metadata as md
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from .answers import read_answers
from .benchmarks import Benchmark, get_benchmark
from .common import THIRD_PARTY, EvalError, populate_hint, populated, slug, third_party_dir
from . import runinfo


# ------------------------------------------------------------------ where LLaVA's tools are
def llava_tools() -> dict:
    """{"pythonpath": [...], "eval_dir": Path, "scripts_dir": Path | None, "source": str}."""
    if populated("LLaVA"):
        root = third_party_dir("LLaVA")   # the submodule, or the exported tree EVAL_THIRD_PARTY names
        return {"pythonpath": [str(root)], "eval_dir": root / "llava" / "eval", "scripts_dir": root / "scripts",
                "source": "third_party/LLaVA" if root == THIRD_PARTY / "LLaVA" else str(root)}
    try:
        version = md.version("llava-torch")
    except md.PackageNotFoundError:
        raise EvalError("no reference LLaVA to score with: third_party/LLaVA is not populated and llava-torch is "
                        f"not installed here; run {populate_hint('LLaVA')} (or pip install --no-deps "
                        "llava-torch==1.2.2.post1)") from None
    spec = importlib.util.find_spec("llava")
    pkg = Path(spec.submodule_search_locations[0])
    return {"pythonpath": [], "eval_dir": pkg / "eval", "scripts_dir": None, "source": f"llava-torch {version}"}


def llava_script(name: str) -> Path:
    """third_party/LLaVA/scripts/<name>, or an error saying it is missing and how to get it."""
    tools = llava_tools()
    if tools["scripts_dir"] is None:
        raise EvalError(f"LLaVA's scripts/{name} is needed but third_party/LLaVA is not populated (the llava-torch "
                        f"wheel has no scripts/); run {populate_hint('LLaVA')}")
    path = tools["scripts_dir"] / name
    if not path.exists():
        raise EvalError(f"{path} does not exist; third_party/LLaVA is not at its pin (git -C third_party/LLaVA status)")
    return path


def run_tool(cmd: list, *, cwd=None, what: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python <cmd>`` with the reference LLaVA first on PYTHONPATH; EvalError with its output on failure."""
    env = dict(os.environ)
    paths = llava_tools()["pythonpath"]
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    r = subprocess.run([sys.executable, *map(str, cmd)], cwd=cwd, env=env, capture_output=True, text=True)
    if check and r.returncode:
        tail = (r.stderr or r.stdout).strip().splitlines()[-6:]
        raise EvalError(f"{what} failed (exit {r.returncode}): " + " | ".join(tail))
    return r


def _need(path: Path, what: str) -> Path:
    if not Path(path).exists():
        raise EvalError(f"{path} does not exist: {what}")
    return Path(path)


def _float(pattern: str, text: str, what: str) -> float:
    m = re.search(pattern, text)
    if not m:
        raise EvalError(f"could not read {what} from the scorer output: {text.strip()[-300:]!r}")
    return float(m.group(1))


# ------------------------------------------------------------------ scorers: (bench, run_dir, data_dir, merged) -> dict
def score_pope(bench: Benchmark, run_dir: Path, data_dir: Path, merged: Path, annotation_dir: Path | None = None):
    ann = _need(annotation_dir or bench.root(data_dir) / "coco", "POPE's coco_pope_<category>.json label files")
    out = run_tool([llava_tools()["eval_dir"] / "eval_pope.py", "--annotation-dir", ann,
                    "--question-file", bench.questions_path(data_dir), "--result-file", merged],
                   what="LLaVA eval_pope.py").stdout
    cats = {}
    for block in out.split("Category: ")[1:]:
        name = block.split(",")[0].strip()
        cats[name] = {"accuracy": 100 * _float(r"Accuracy: ([\d.]+)", block, "POPE accuracy"),
                      "f1": 100 * _float(r"F1 score: ([\d.]+)", block, "POPE F1"),
                      "precision": 100 * _float(r"Precision: ([\d.]+)", block, "POPE precision"),
                      "recall": 100 * _float(r"Recall: ([\d.]+)", block, "POPE recall"),
                      "yes_ratio": _float(r"Yes ratio: ([\d.]+)", block, "POPE yes ratio"),
                      "samples": int(_float(r"# samples: (\d+)", block, "POPE samples"))}
    if not cats:
        raise EvalError(f"eval_pope.py found no category in {ann}: {out.strip()[-300:]!r}")
    mean = lambda k: sum(c[k] for c in cats.values()) / len(cats)  # noqa: E731
    return {"f1": mean("f1"), "accuracy": mean("accuracy"), "categories": cats}


def score_scienceqa(bench, run_dir, data_dir, merged):
    base = bench.root(data_dir)
    for f in ("problems.json", "pid_splits.json"):
        _need(base / f, f"ScienceQA's {f} (LLaVA docs/Evaluation.md)")
    out = run_tool([llava_tools()["eval_dir"] / "eval_science_qa.py", "--base-dir", base, "--result-file", merged,
                    "--output-file", run_dir / "sqa_output.json", "--output-result", run_dir / "sqa_result.json"],
                   what="LLaVA eval_science_qa.py").stdout
    return {"img_accuracy": _float(r"IMG-Accuracy: ([\d.]+)%", out, "ScienceQA IMG-Accuracy"),
            "accuracy_all": _float(r" Accuracy: ([\d.]+)%", out, "ScienceQA Accuracy"),
            "note": "only image questions are run (ScienceQA-IMG); accuracy_all counts text-only ones as failed"}


def score_textvqa(bench, run_dir, data_dir, merged):
    ann = _need(bench.root(data_dir) / "TextVQA_0.5.1_val.json", "TextVQA's TextVQA_0.5.1_val.json")
    out = run_tool(["-m", "llava.eval.eval_textvqa", "--annotation-file", ann, "--result-file", merged],
                   what="LLaVA eval_textvqa").stdout
    return {"accuracy": _float(r"Accuracy: ([\d.]+)%", out, "TextVQA accuracy")}


def score_gqa(bench, run_dir, data_dir, merged):
    gqa = bench.root(data_dir) / "data"
    evaluator = _need(gqa / "eval" / "eval.py", "GQA's official eval/eval.py (LLaVA docs/Evaluation.md, GQA)")
    pred = run_dir / "testdev_balanced_predictions.json"
    run_tool([llava_script("convert_gqa_for_eval.py"), "--src", merged, "--dst", pred],
             what="LLaVA convert_gqa_for_eval.py")
    out = run_tool([evaluator, "--tier", "testdev_balanced", "--predictions", pred], cwd=gqa,
                   what="GQA eval/eval.py").stdout
    return {"accuracy": _float(r"Accuracy: ([\d.]+)%", out, "GQA accuracy"), "predictions": str(pred)}


def score_mme(bench, run_dir, data_dir, merged):
    mme = bench.root(data_dir)
    convert = _need(mme / "convert_answer_to_mme.py", "LLaVA's MME converter (eval.zip: MME/convert_answer_to_mme.py)")
    calc = _need(mme / "eval_tool" / "calculation.py", "MME's eval_tool/calculation.py")
    exp = slug(f"{run_dir.parent.parent.parent.name}-{run_dir.parent.name}-{run_dir.name}")
    (mme / "answers").mkdir(exist_ok=True)
    staged = mme / "answers" / f"{exp}.jsonl"  # where LLaVA's converter reads answers from
    staged.write_bytes(merged.read_bytes())
    run_tool([convert, "--experiment", exp], cwd=mme, what="MME convert_answer_to_mme.py")
    out = run_tool([calc, "--results_dir", f"answers/{exp}"], cwd=mme / "eval_tool",
                   what="MME eval_tool/calculation.py").stdout
    perception = _float(r"Perception =+\s*total score: ([\d.]+)", out, "MME perception score")
    cognition = re.search(r"Cognition =+\s*total score: ([\d.]+)", out)
    return {"perception": perception, "cognition": float(cognition.group(1)) if cognition else None,
            "experiment": exp}


def score_seed(bench, run_dir, data_dir, merged):
    ann = _need(bench.root(data_dir) / "SEED-Bench.json", "SEED-Bench.json")
    r = run_tool([llava_script("convert_seed_for_submission.py"), "--annotation-file", ann, "--result-file", merged,
                  "--result-upload-file", run_dir / "seed_upload.jsonl"], what="LLaVA convert_seed_for_submission.py",
                 check=False)
    if not re.search(r"image accuracy: [\d.]+%", r.stdout):
        hint = (" (a known defect of LLaVA's converter: it raises KeyError when every answer of a question type "
                "is wrong, since that type's correct count is never initialised)" if "KeyError" in r.stderr else "")
        raise EvalError("LLaVA convert_seed_for_submission.py failed" + hint + ": "
                        + (r.stderr or r.stdout).strip().splitlines()[-1][-300:])
    res = {"image_accuracy": _float(r"image accuracy: ([\d.]+)%", r.stdout, "SEED image accuracy"),
           "total_accuracy": _float(r"Total accuracy: ([\d.]+)%", r.stdout, "SEED total accuracy")}
    if r.returncode:
        res["warning"] = ("the converter failed after printing accuracies (upload file not written): "
                          + (r.stderr.strip().splitlines() or ["?"])[-1])
    return res


def _letter(text: str, options: list) -> str | None:
    t = text.strip()
    if t in options:
        return t
    m = re.match(r"^\(?([A-D])[).:\s]", t + " ")
    if m and m.group(1) in options:
        return m.group(1)
    m = re.findall(r"The answer is ([A-D])", t)
    return m[0] if len(m) == 1 and m[0] in options else None


def mmbench_accuracy(tsv: Path, answers: list[dict]) -> dict:
    """Plain and circular accuracy against the dev tsv's ``answer`` column (None on a test split)."""
    csv.field_size_limit(sys.maxsize)
    with open(tsv, encoding="utf-8", newline="") as f:
        truth = {}
        for row in csv.DictReader(f, delimiter="\t"):
            if "answer" not in row or not (row.get("answer") or "").strip():
                return {"accuracy": None, "circular_accuracy": None}
            truth[int(row["index"])] = row["answer"].strip()
    right, groups = 0, {}
    for a in answers:
        idx = int(a["question_id"])
        ok = _letter(a["text"], a.get("option_char") or ["A", "B", "C", "D"]) == truth.get(idx)
        right += ok
        groups.setdefault(idx % 1_000_000, []).append(ok)
    n = len(answers)
    return {"accuracy": 100 * right / n if n else None,
            "circular_accuracy": 100 * sum(all(g) for g in groups.values()) / len(groups) if groups else None,
            "questions": len(groups), "rows": n}


def score_mmbench(bench, run_dir, data_dir, merged):
    tsv = bench.questions_path(data_dir)
    res = mmbench_accuracy(tsv, read_answers(merged))
    upload = run_dir / "upload"
    upload.mkdir(exist_ok=True)
    if importlib.util.find_spec("pandas") and importlib.util.find_spec("openpyxl"):
        run_tool([llava_script("convert_mmbench_for_submission.py"), "--annotation-file", tsv,
                  "--result-dir", run_dir, "--upload-dir", upload, "--experiment", "merge"],
                 what="LLaVA convert_mmbench_for_submission.py")
        res["upload"] = str(upload / "merge.xlsx")
    else:
        res["upload"] = None
        res["upload_error"] = "the OpenCompass upload file needs pandas and openpyxl (pip install pandas openpyxl)"
        print(f"note: {bench.title}: {res['upload_error']}; the local dev accuracy is still computed",
              file=sys.stderr)
    res["accuracy_source"] = "eval.scoring.mmbench_accuracy (LLaVA has no local MMBench scorer)"
    return res


def score_vizwiz(bench, run_dir, data_dir, merged):
    dst = run_dir / "upload" / "vizwiz_test.json"
    run_tool([llava_script("convert_vizwiz_for_submission.py"), "--annotation-file", bench.questions_path(data_dir),
              "--result-file", merged, "--result-upload-file", dst], what="LLaVA convert_vizwiz_for_submission.py")
    return {"accuracy": None, "upload": str(dst), "server": "EvalAI VizWiz-VQA test"}


def score_vqav2(bench, run_dir, data_dir, merged):
    test = _need(bench.root(data_dir) / "llava_vqav2_mscoco_test2015.jsonl", "VQAv2's llava_vqav2_mscoco_test2015.jsonl")
    split, ckpt = "llava_vqav2_mscoco_test-dev2015", "merge"
    stage = run_dir / "vqav2_stage"  # the converter's fixed layout: <dir>/answers/<split>/<ckpt>/merge.jsonl
    src = stage / "answers" / split / ckpt / "merge.jsonl"
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_bytes(merged.read_bytes())
    link = stage / test.name
    if not link.exists():
        link.symlink_to(test.resolve())
    run_tool([llava_script("convert_vqav2_for_submission.py"), "--dir", stage, "--ckpt", ckpt, "--split", split],
             what="LLaVA convert_vqav2_for_submission.py")
    return {"accuracy": None, "upload": str(stage / "answers_upload" / split / f"{ckpt}.json"),
            "server": "EvalAI VQAv2 test-dev"}


def score_mmvet(bench, run_dir, data_dir, merged):
    results = run_dir / "mmvet_results"
    results.mkdir(exist_ok=True)
    exp = "merge"
    converted = results / f"{exp}.json"
    run_tool([llava_script("convert_mmvet_for_eval.py"), "--src", merged, "--dst", converted],
             what="LLaVA convert_mmvet_for_eval.py")
    kept = f"answers kept in {merged}; converted for the judge in {converted}"
    if not os.environ.get("OPENAI_API_KEY"):
        raise EvalError(f"MM-Vet is scored by a GPT-4 judge and OPENAI_API_KEY is not set; {kept}. Set the key "
                        f"and score again, or upload {converted.name} to the official MM-Vet evaluator")
    evaluator = Path(os.environ.get("MMVET_EVALUATOR", bench.root(data_dir) / "mm-vet_evaluator.py"))
    _need(evaluator, f"MM-Vet's official mm-vet_evaluator.py (set MMVET_EVALUATOR); {kept}")
    for mod in ("openai", "pandas"):
        if importlib.util.find_spec(mod) is None:
            raise EvalError(f"MM-Vet's evaluator needs {mod} (pip install openai pandas); {kept}")
    run_tool([evaluator, "--mmvet_path", bench.root(data_dir), "--model", exp, "--result_path", results,
              "--gpt_model", os.environ.get("MMVET_GPT_MODEL", "gpt-4-0613")], what="MM-Vet evaluator")
    csvs = sorted(results.glob(f"{exp}_*-cap-score-*runs.csv"))
    if not csvs:
        raise EvalError(f"MM-Vet evaluator wrote no cap-score csv in {results}; {kept}")
    with open(csvs[-1], newline="") as f:
        row = list(csv.DictReader(f))[-1]
    return {"total": float(row["total"]), "capabilities": {k: row[k] for k in row if k not in ("", "runs")}}


def answer_normalizer():
    """LLaVA's answer normalisation (``EvalAIAnswerProcessor`` of llava/eval/m4c_evaluator.py, the VQAv2/TextVQA
    rule: lower case, punctuation, articles, number words, contractions), loaded from the reference LLaVA."""
    path = _need(llava_tools()["eval_dir"] / "m4c_evaluator.py", "LLaVA's llava/eval/m4c_evaluator.py")
    spec = importlib.util.spec_from_file_location("_llava_m4c_evaluator", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.EvalAIAnswerProcessor()


def exact_match(answers: list[dict], key: dict, normalize) -> dict:
    """Accuracy (%) of ``answers`` (LLaVA answer lines) against ``key`` {question_id: [accepted answers]}."""
    per_question = {}
    for a in answers:
        accepted = {normalize(str(x)) for x in key[a["question_id"]]}
        per_question[a["question_id"]] = normalize(str(a["text"])) in accepted
    n = len(per_question)
    return {"accuracy": 100.0 * sum(per_question.values()) / n if n else None, "n": n,
            "correct": per_question}


def read_answer_key(path: Path) -> dict:
    """{question_id: [accepted answers]} from a jsonl of {"question_id", "answer": str | [str, ...]}."""
    key = {}
    with open(_need(path, "the answer key answers.jsonl"), encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                qid, ans = row["question_id"], row["answer"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise EvalError(f"{path} line {n}: expected {{\"question_id\", \"answer\"}} ({e!r})") from None
            key[qid] = ans if isinstance(ans, list) else [ans]
    return key


def score_exact_match(bench, run_dir, data_dir, merged):
    key = read_answer_key(bench.root(data_dir) / "answers.jsonl")
    answers = read_answers(merged)
    missing = [a["question_id"] for a in answers if a["question_id"] not in key]
    if missing:
        raise EvalError(f"{len(missing)} answered question(s) have no entry in answers.jsonl, e.g. {missing[0]!r}")
    result = exact_match(answers, key, answer_normalizer())
    correct = result.pop("correct")
    (Path(run_dir) / "correct.json").write_text(json.dumps(correct))
    return result


SCORERS = {"custom": score_exact_match, "study": score_exact_match, "pope": score_pope, "synthetic_wide": score_pope, "synthetic_tall": score_pope,
           "synthetic_square": score_pope, "scienceqa": score_scienceqa, "textvqa": score_textvqa,
           "gqa": score_gqa, "mme": score_mme, "seed": score_seed, "mmbench": score_mmbench,
           "mmbench_cn": score_mmbench, "vizwiz": score_vizwiz, "vqav2": score_vqav2, "mmvet": score_mmvet}


def score_run(run_dir, data_dir=None) -> dict:
    """Score ``run_dir/merge.jsonl`` with its benchmark's scorer; write and return ``score.json``."""
    run_dir = Path(run_dir)
    info = runinfo.read(run_dir / "run.json")
    bench = get_benchmark(info["benchmark"])
    data_dir = Path(data_dir or info["data_dir"])
    merged = run_dir / "merge.jsonl"
    if not merged.exists():
        raise EvalError(f"{merged} does not exist: merge the chunks first (python -m eval.merge --run-dir {run_dir})")
    metrics = SCORERS[bench.key](bench, run_dir, data_dir, merged)
    value = metrics.get(bench.metric)
    result = {
        "benchmark": bench.key, "title": bench.title, "method": info["method"], "budget": info["budget"],
        "mode": info["mode"], "trend": info["trend"], "model_name": info.get("model_name"),
        "metric": bench.metric, "value": value, "percent": None if value is None else value / bench.scale,
        "scoring": bench.scoring,
        "n_answers": len(read_answers(merged)), "limit": info.get("limit"), "metrics": metrics,
        "scored_with": llava_tools()["source"], "scored_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    (run_dir / "score.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return result
