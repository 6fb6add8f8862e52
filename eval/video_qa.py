"""Video QA (MSVD-QA, MSRVTT-QA, TGIF-QA; ActivityNet-QA) through Video-LLaVA's own scripts.

    python -m eval.video_qa plan   --answers-dir A --model-path M --benchmarks msvd,tgif --modes off,full ...
    python -m eval.video_qa infer  --run-dir D --num-chunks N --chunk-idx k      (one per GPU; resumes)
    python -m eval.video_qa merge  --run-dir D                                    (-> D/merge.jsonl)
    python -m eval.video_qa score  --run-dir D                                    (-> D/score_keyless.json)
    python -m eval.video_qa judge  --run-dir D        (GPT-3.5 judge, needs OPENAI_API_KEY; -> D/score_gpt.json)
    python -m eval.video_qa report --answers-dir A                                (Markdown table of every run)

``scripts/run_video.sh`` runs these in order. A run folder ``<A>/<model>/<bench>/<method>-<budget>/<mode tag>``
holds ``video_run.json`` (the settings; a resumed run must agree), Video-LLaVA's chunk outputs ``<N>_<k>.json``
(JSON lines ``{id, question, answer, pred}``), ``merge.jsonl`` and the two score files.

Inference is ``videollava/eval/video/run_inference_video_qa.py`` (ActivityNet: ``..._act.py``) of the patched
tree, unmodified, run from the tree's root (it writes the LanguageBind towers to ./cache_dir). That script does
not resume: it opens its output with "w" and writes through a buffered file. ``infer`` therefore hands it only
what is left to do: the chunk's questions (LLaVA's contiguous ceil(len/N) split) that no output file of the run
folder answers yet and whose video exists, as a question/answer file pair in the same order (the patched
script pairs them by position), with ``--num_chunks 1``, and a fresh output name for every restart
(``<N>_<k>.json``, then ``<N>_<k>.resume<j>.json``). A kill loses at most the answers still in the script's
buffer and a torn last line, which the next start redoes. Per-question results do not depend on the chunking:
patch 0003 seeds the random flip per question, and decoding is greedy (patch 0002).

Keyless score (``score``): Video-LLaVA's own ``EvalAIAnswerProcessor`` (videollava/eval/m4c_evaluator.py,
loaded by file path) normalises answer and prediction; exact match = equal normalised strings, contains = the
answer's words occur as a contiguous whole-word run in the prediction's. It is a proxy for comparing debias
modes, not comparable with the published GPT-judged accuracies.

GPT judge (``judge``): Video-LLaVA's ``eval_video_qa.py`` (Video-ChatGPT protocol, gpt-3.5-turbo, openai<1.0),
run only with OPENAI_API_KEY set. It retries failed requests forever, so a watchdog stops it when no new
judgement appears for ``--stall`` seconds. Its per-question files make it resumable.

Calibrating a video trend (pos/full need one; none is published, and the paper's presets cover LLaVA-1.5's
576 positions, not the 2056 = 8 frames x 257 video tokens): on a held-out split, run the inference script
in-process under ``debias_core.recording()`` with DEBIAS=off and FastV on, save ``rec.matrix(0, 2056)``
as S.npy, then ``python -m debias_core fit --scores S.npy --out video_trend.json`` and pass
``DEBIAS_TREND=calibrated:video_trend.json``.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .answers import get_chunk, qid_key, read_answers
from .common import ROOT, EvalError, check_model_path, populate_hint, project_state, slug, submodule_state
from . import registry, runinfo
from .runinfo import mode_tag

METHOD = registry.driven_by("eval.video_qa")  # the registry's video method: this module is its driver
UPSTREAM = METHOD["upstream"]
# What Video-LLaVA's patch series adds is FastV's pruning at layer K keeping R video tokens: run folders are
# named after it (<method>-<budget>: fastv-k<K>r<R>, or videollava-all without pruning), as the flags are.
PRUNED_LABEL, UNPRUNED_LABEL = "fastv", "videollava"
VIDEO_FORMATS = (".mp4", ".avi", ".mov", ".mkv")  # the order run_inference_video_qa.py tries
VIDEO_SPAN = 8 * 257   # LanguageBind video tower: 8 frames x (CLS + 16 x 16 patches) tokens per prompt
MODES = ("off", "pad", "pos", "full")
DATA_HINT = ("download it from Video-LLaVA's TRAIN_AND_VALIDATE.md (Validating: GPT_Zero_Shot_QA) or set "
             "VIDEO_DATA_DIR")
RUN_FILE = "video_run.json"
IDENTITY = ("benchmark", "script", "question_file", "answer_file", "video_dir", "video_prefix", "model_path",
            "model_base", "fastv_k", "fastv_rank", "mode", "trend", "limit")
CAVEATS = ["no lemmatisation: 'slice' does not match 'slicing'",
           "ActivityNet-QA yes/no answers are over-credited by contains ('no' in 'there is no ...'): read exact "
           "match and the judge there",
           "a proxy for comparing debias modes, not comparable with the published GPT-judged accuracies"]


@dataclass(frozen=True)
class VideoBench:
    key: str
    title: str
    folder: str      # under GPT_Zero_Shot_QA
    videos: str      # --video_dir, relative to the folder
    script: str      # under videollava/eval/video/
    prefix: str      # file name prefix the script puts before video_name


BENCHMARKS = {b.key: b for b in (
    VideoBench("msvd", "MSVD-QA", "MSVD_Zero_Shot_QA", "videos", "run_inference_video_qa.py", ""),
    VideoBench("msrvtt", "MSRVTT-QA", "MSRVTT_Zero_Shot_QA", "videos/all", "run_inference_video_qa.py", ""),
    VideoBench("tgif", "TGIF-QA", "TGIF_Zero_Shot_QA", "mp4", "run_inference_video_qa.py", ""),
    VideoBench("activitynet", "ActivityNet-QA", "Activitynet_Zero_Shot_QA", "all_test",
               "run_inference_video_qa_act.py", "v_"),
)}
DEFAULT_BENCHMARKS = ("msvd", "msrvtt", "tgif")


# ------------------------------------------------------------------ files
def _write_json(path: Path, data) -> None:
    """Atomic write (temp file + rename): a kill never leaves half a JSON file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _load_json(path: Path, what: str):
    path = Path(path)
    if not path.exists():
        raise EvalError(f"{what} {path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EvalError(f"{what} {path} is not valid JSON ({e})") from None


def read_run(run_dir: Path) -> dict:
    path = Path(run_dir) / RUN_FILE
    if not path.exists():
        raise EvalError(f"{path} does not exist: {run_dir} is not a video QA run folder (python -m eval.video_qa "
                        f"plan writes it)")
    return json.loads(path.read_text())


def load_qa(question_file: Path, answer_file: Path, limit: int | None = None) -> tuple[list[dict], list[dict]]:
    """Video-ChatGPT's test_q.json [{video_name, question, question_id}] and test_a.json [{answer, type,
    question_id}] (the first ``limit`` of each). Upstream pairs them by position, so they must have the same
    length and, where the answers carry question ids, the same order."""
    qs = _load_json(question_file, "question file")
    ans = _load_json(answer_file, "answer file")
    if not isinstance(qs, list) or not isinstance(ans, list):
        raise EvalError(f"{question_file} and {answer_file} must each hold a JSON list")
    if len(qs) != len(ans):
        raise EvalError(f"{question_file} has {len(qs)} questions but {answer_file} has {len(ans)} answers; "
                        f"Video-LLaVA pairs them by position")
    for i, (q, a) in enumerate(zip(qs, ans)):
        if "question_id" not in q or "video_name" not in q or "question" not in q:
            raise EvalError(f"{question_file} item {i} lacks video_name, question or question_id")
        if "question_id" in a and a["question_id"] != q["question_id"]:
            raise EvalError(f"{answer_file} item {i} answers question_id {a['question_id']!r} but {question_file} "
                            f"item {i} is {q['question_id']!r}; Video-LLaVA pairs them by position, so both files "
                            f"must be in the same order")
    return (qs[:limit], ans[:limit]) if limit else (qs, ans)


def video_path(video_dir: Path, name: str, prefix: str = "") -> Path | None:
    """The file the inference script would read for ``name`` (None: it skips the question silently)."""
    for fmt in VIDEO_FORMATS:
        p = Path(video_dir) / f"{prefix}{name}{fmt}"
        if p.exists():
            return p
    return None


OUTPUT_NAME = re.compile(r"^(\d+)_(\d+)(?:\.resume(\d+))?\.json$")


def output_files(run_dir: Path) -> list[Path]:
    """Every chunk output of the run, in (N, k, restart) order: ``<N>_<k>.json``, ``<N>_<k>.resume<j>.json``."""
    found = []
    for p in Path(run_dir).iterdir() if Path(run_dir).is_dir() else ():
        m = OUTPUT_NAME.match(p.name)
        if m:
            found.append(((int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)), p))
    return [p for _, p in sorted(found)]


def answered(run_dir: Path) -> dict[str, dict]:
    """{question key: first output line answering it} over every output file (a torn last line is ignored)."""
    out: dict[str, dict] = {}
    for path in output_files(run_dir):
        for row in read_answers(path):
            if "id" not in row or "pred" not in row:
                raise EvalError(f"{path}: a line lacks 'id' or 'pred'; it was not written by Video-LLaVA's "
                                f"run_inference_video_qa.py")
            out.setdefault(qid_key(row["id"]), row)
    return out


# ------------------------------------------------------------------ plan (all checks before any GPU work)
def video_llava_dir() -> Path:
    """third_party/Video-LLaVA, or $EVAL_THIRD_PARTY/Video-LLaVA (a folder of exported, patched trees)."""
    base = os.environ.get("EVAL_THIRD_PARTY")
    return (Path(base) if base else ROOT / "third_party") / UPSTREAM


def video_llava_root(root=None) -> Path:
    """The Video-LLaVA tree (``root`` or video_llava_dir()), checked populated."""
    path = Path(root) if root else video_llava_dir()
    if not (path / "videollava").is_dir():
        raise EvalError(f"{path} is not populated (no videollava/ folder); run {populate_hint(UPSTREAM)}")
    return path


# file -> text that only the patched file has (patches/Video-LLaVA 0001-0007)
PATCH_MARKERS = {"videollava/eval/video/run_inference_video_qa.py": "--fastv_k",
                 "videollava/eval/video/run_inference_video_qa_act.py": "--fastv_k",
                 "videollava/model/language_model/llava_llama.py": "video_fastv_k",
                 "videollava/model/llava_arch.py": "visual_span"}


def check_patched(root: Path) -> None:
    for rel, marker in PATCH_MARKERS.items():
        path = root / rel
        if not path.exists() or marker not in path.read_text(errors="replace"):
            raise EvalError(f"{path} lacks our patch series (patches/{UPSTREAM}); run bash scripts/apply_patches.sh "
                            f"{UPSTREAM}")


def check_checkpoint(model_path: str) -> None:
    name = model_path.strip("/").split("/")[-1]
    check_model_path(model_path, what="a Video-LLaVA folder", example="LanguageBind/Video-LLaVA-7B")
    if "llava" not in name.lower():
        raise EvalError(f"checkpoint folder name {name!r} must contain 'llava' (Video-LLaVA's load_pretrained_model "
                        f"otherwise builds a plain LLaMA); rename it, e.g. checkpoints/Video-LLaVA-7B")


def check_trend(mode: str, trend: str | None) -> str | None:
    """The trend spec a pos/full run uses, checked to cover the 2056 video positions; None otherwise."""
    if mode not in ("pos", "full"):
        return None
    fix = ("calibrate one over the 2056 video positions (python -m eval.video_qa --help, 'Calibrating') and pass "
           "DEBIAS_TREND=calibrated:<file>")
    if not trend:
        raise EvalError(f"mode {mode} needs DEBIAS_TREND: no positional trend is published for video; {fix}")
    if trend.startswith("paper:"):
        raise EvalError(f"DEBIAS_TREND={trend} is a LLaVA-1.5 preset over 576 positions; no video trend is "
                        f"published; {fix}")
    file = Path(trend[len("calibrated:"):] if trend.startswith("calibrated:") else trend)
    if not file.exists():
        raise EvalError(f"DEBIAS_TREND={trend}: trend file {file} does not exist; {fix}")
    trend = f"calibrated:{file.resolve()}"  # the inference script runs from the Video-LLaVA tree
    from debias_core.presets import resolve_trend
    try:
        t = resolve_trend(trend)
    except Exception as e:  # noqa: BLE001 (debias_core's message names the file and the problem)
        raise EvalError(f"DEBIAS_TREND={trend} cannot be loaded: {e}") from None
    n = t.for_stage(0).n
    if n < VIDEO_SPAN:
        raise EvalError(f"DEBIAS_TREND={trend} covers {n} positions but a video prompt has {VIDEO_SPAN} visual "
                        f"tokens; {fix}")
    return trend


def plan(answers_dir, model_path: str, benchmarks, modes, *, data_dir, trend=None, fastv_k=None,
         fastv_rank=None, model_base=None, limit=None, root=None) -> list[Path]:
    """Check everything a run needs and write each run folder's video_run.json (or check that an existing
    one agrees). Returns the run folders, benchmark-major."""
    root = video_llava_root(root).resolve()
    check_patched(root)
    check_checkpoint(model_path)
    if Path(model_path).expanduser().exists():
        model_path = str(Path(model_path).expanduser().resolve())  # the script runs from the tree's root
    if (fastv_k is None) != (fastv_rank is None):
        raise EvalError(f"FastV needs both K and R (got fastv_k={fastv_k}, fastv_rank={fastv_rank})")
    if fastv_k is not None and (fastv_k < 1 or fastv_rank < 1):
        raise EvalError(f"fastv_k={fastv_k} and fastv_rank={fastv_rank} must be ≥ 1 (FASTV_K=0 turns pruning off)")
    if limit is not None and limit < 1:
        raise EvalError(f"--limit {limit} must be ≥ 1")
    for m in modes:
        if m not in MODES:
            raise EvalError(f"debias mode {m!r} is unknown; use one of {', '.join(MODES)}")
    for b in benchmarks:
        if b not in BENCHMARKS:
            raise EvalError(f"video benchmark {b!r} is unknown; use one of {', '.join(BENCHMARKS)}")
    data_dir = Path(data_dir)
    for b in benchmarks:
        bench = BENCHMARKS[b]
        folder = data_dir / bench.folder
        if not folder.is_dir():
            raise EvalError(f"{bench.title} data {folder} does not exist; {DATA_HINT}")
        for f in ("test_q.json", "test_a.json", bench.videos):
            if not (folder / f).exists():
                raise EvalError(f"{bench.title} data is incomplete: {folder / f} does not exist; {DATA_HINT}")
        load_qa(folder / "test_q.json", folder / "test_a.json")
    trends = {m: check_trend(m, trend) for m in modes}
    method, budget = (PRUNED_LABEL, f"k{fastv_k}r{fastv_rank}") if fastv_k else (UNPRUNED_LABEL, "all")
    model = slug(model_path.strip("/").split("/")[-1])
    runs = []
    for b in benchmarks:
        bench = BENCHMARKS[b]
        folder = data_dir / bench.folder
        for m in modes:
            info = {"benchmark": b, "script": str(root / "videollava" / "eval" / "video" / bench.script),
                    "question_file": str((folder / "test_q.json").resolve()),
                    "answer_file": str((folder / "test_a.json").resolve()),
                    "video_dir": str((folder / bench.videos).resolve()), "video_prefix": bench.prefix,
                    "model_path": model_path, "model_base": model_base, "fastv_k": fastv_k, "fastv_rank": fastv_rank,
                    "mode": m, "trend": trends[m], "limit": limit, "method": method, "budget": budget,
                    "model_name": model}
            label = trends[m] and Path(trends[m].partition(":")[2]).name  # the file name, not its whole path
            run_dir = Path(answers_dir).resolve() / model / b / f"{method}-{budget}" / mode_tag(m, label)
            runinfo.write_or_check(run_dir / RUN_FILE, info, IDENTITY, "ANSWERS_DIR", created={
                "created": time.strftime("%Y-%m-%d %H:%M:%S"), "project": project_state()})
            runs.append(run_dir)
    return runs


# ------------------------------------------------------------------ infer (resumable chunk)
def todo(run: dict, run_dir: Path, num_chunks: int, chunk_idx: int) -> dict:
    """This chunk's question indices split into done / no video / to do."""
    qs, _ = load_qa(run["question_file"], run["answer_file"], run.get("limit"))
    idx = get_chunk(list(range(len(qs))), num_chunks, chunk_idx)
    done = answered(run_dir)
    out = {"chunk": idx, "done": [], "no_video": [], "todo": []}
    for i in idx:
        if qid_key(qs[i]["question_id"]) in done:
            out["done"].append(i)
        elif video_path(run["video_dir"], qs[i]["video_name"], run["video_prefix"]) is None:
            out["no_video"].append(i)
        else:
            out["todo"].append(i)
    return out


def next_output_name(run_dir: Path, n: int, k: int) -> str:
    if not (Path(run_dir) / f"{n}_{k}.json").exists():
        return f"{n}_{k}"
    j = 1
    while (Path(run_dir) / f"{n}_{k}.resume{j}.json").exists():
        j += 1
    return f"{n}_{k}.resume{j}"


def infer(run_dir: Path, num_chunks: int, chunk_idx: int, *, script: str | None = None, python: str | None = None,
          extra: list[str] | None = None) -> int:
    """Run Video-LLaVA's inference script on what is left of chunk ``chunk_idx``; returns its exit status."""
    run_dir = Path(run_dir).resolve()  # the script runs from the Video-LLaVA tree
    run = read_run(run_dir)
    script = Path(script or run["script"]).resolve()
    if not script.exists():
        raise EvalError(f"{script} does not exist; run {populate_hint(UPSTREAM)} and bash scripts/apply_patches.sh "
                        f"{UPSTREAM}")
    t = todo(run, run_dir, num_chunks, chunk_idx)
    label = f"chunk {chunk_idx}/{num_chunks} of {run_dir}"
    print(f"=== eval.video_qa infer {time.strftime('%Y-%m-%d %H:%M:%S')}: {label}\n"
          f"    {len(t['chunk'])} questions: {len(t['done'])} answered, {len(t['no_video'])} without a video "
          f"(skipped, as Video-LLaVA does), {len(t['todo'])} to do\n"
          f"    mode {run['mode']}  trend {run['trend']}  fastv K={run['fastv_k']} R={run['fastv_rank']}  "
          f"model {run['model_path']}\n    project {project_state()}  {UPSTREAM} {submodule_state(UPSTREAM)}",
          file=sys.stderr, flush=True)
    if not t["todo"]:
        return 0
    qs, ans = load_qa(run["question_file"], run["answer_file"], run.get("limit"))
    pending = run_dir / ".pending"
    pending.mkdir(exist_ok=True)
    q_file, a_file = pending / f"{num_chunks}_{chunk_idx}_q.json", pending / f"{num_chunks}_{chunk_idx}_a.json"
    _write_json(q_file, [qs[i] for i in t["todo"]])
    _write_json(a_file, [ans[i] for i in t["todo"]])
    cmd = [python or sys.executable, str(script), "--model_path", run["model_path"], "--cache_dir", "./cache_dir",
           "--video_dir", run["video_dir"], "--gt_file_question", str(q_file), "--gt_file_answers", str(a_file),
           "--output_dir", str(run_dir), "--output_name", next_output_name(run_dir, num_chunks, chunk_idx),
           "--num_chunks", "1", "--chunk_idx", "0"]
    if run.get("model_base"):
        cmd += ["--model_base", run["model_base"]]
    if run.get("fastv_k"):
        cmd += ["--fastv_k", str(run["fastv_k"]), "--fastv_rank", str(run["fastv_rank"])]
    cmd += list(extra or [])
    tree = Path(run["script"]).parents[3]  # <tree>/videollava/eval/video/<script>
    # debias_core takes the method's settings (its pad threshold and padding rule) from the registry entry
    env = dict(os.environ, DEBIAS=run["mode"], DEBIAS_METHOD=METHOD["key"],
               PYTHONPATH=os.pathsep.join([str(tree), str(ROOT)] + ([os.environ["PYTHONPATH"]]
                                                                    if os.environ.get("PYTHONPATH") else [])))
    env.pop("DEBIAS_TREND", None)
    if run["trend"]:
        env["DEBIAS_TREND"] = run["trend"]
    # From the tree's root, as Video-LLaVA's scripts run: its builder puts the towers in ./cache_dir.
    rc = subprocess.run(cmd, env=env, cwd=tree).returncode
    left = todo(run, run_dir, num_chunks, chunk_idx)["todo"]
    if rc:
        print(f"error: {label}: {script.name} exited {rc}; {len(t['todo']) - len(left)} of {len(t['todo'])} "
              f"answers were written; rerun to resume", file=sys.stderr)
        return rc
    if left:
        print(f"error: {label}: {script.name} finished but {len(left)} questions with a video have no answer "
              f"(first: {qs[left[0]]['question_id']!r}); rerun to retry them", file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------ merge
def merge(run_dir: Path, question_file=None, video_dir=None, video_prefix: str | None = None) -> dict:
    """Write ``merge.jsonl`` (question-file order, one line per answered question) from every chunk output;
    ``merge_stats.json`` records questions, answers and questions without a video. A question whose video
    exists but has no answer is an error (resume the run)."""
    run_dir = Path(run_dir)
    run = read_run(run_dir) if (run_dir / RUN_FILE).exists() else {}
    question_file = question_file or run.get("question_file")
    if not question_file:
        raise EvalError(f"{run_dir} has no {RUN_FILE}; pass --questions test_q.json")
    video_dir = video_dir or run.get("video_dir")
    prefix = run.get("video_prefix", "") if video_prefix is None else video_prefix
    qs = _load_json(question_file, "question file")[:run.get("limit") or None]
    rows = answered(run_dir)
    if not output_files(run_dir):
        raise EvalError(f"{run_dir} has no chunk output (<N>_<k>.json); run the inference first")
    keys = [qid_key(q["question_id"]) for q in qs]
    extra = set(rows) - set(keys)
    if extra:
        raise EvalError(f"{run_dir} answers {len(extra)} question(s) not in {question_file} (e.g. {sorted(extra)[0]});"
                        f" it belongs to another question file")
    missing = [q for q, key in zip(qs, keys) if key not in rows]
    no_video = [q for q in missing if video_dir and video_path(video_dir, q["video_name"], prefix) is None]
    no_video_keys = {qid_key(q["question_id"]) for q in no_video}
    unanswered = [q for q in missing if qid_key(q["question_id"]) not in no_video_keys]
    if video_dir and unanswered:
        raise EvalError(f"{len(unanswered)} of {len(qs)} questions in {run_dir} have a video but no answer (first: "
                        f"{unanswered[0]['question_id']!r}); resume the run (rerun scripts/run_video.sh), then merge")
    tmp = run_dir / ".merge.jsonl.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for key in keys:
            if key in rows:
                f.write(json.dumps(rows[key]) + "\n")  # ASCII JSON: eval_video_qa.py reads lines with eval()
    os.replace(tmp, run_dir / "merge.jsonl")
    stats = {"questions": len(qs), "answers": len(qs) - len(missing), "no_video": len(no_video),
             "no_video_ids": [q["question_id"] for q in no_video][:50],
             "unanswered_unchecked": 0 if video_dir else len(missing)}
    _write_json(run_dir / "merge_stats.json", stats)
    return stats


# ------------------------------------------------------------------ keyless score
def answer_processor(root=None):
    """Video-LLaVA's EvalAIAnswerProcessor() from videollava/eval/m4c_evaluator.py, loaded by file path
    (videollava/eval has no __init__.py, and importing the videollava package would build every tower)."""
    path = (Path(root) if root else video_llava_dir()) / "videollava" / "eval" / "m4c_evaluator.py"
    if not path.exists():
        raise EvalError(f"{path} does not exist: the keyless score uses Video-LLaVA's answer normaliser; run "
                        f"{populate_hint(UPSTREAM)}")
    spec = importlib.util.spec_from_file_location("videollava_m4c_evaluator", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.EvalAIAnswerProcessor()


def _contains(needle: list[str], hay: list[str]) -> bool:
    n = len(needle)
    return any(hay[i:i + n] == needle for i in range(len(hay) - n + 1))


def keyless(rows: list[dict], normalise) -> dict:
    """Exact match and whole-word containment (% of ``rows``) of normalised ``answer`` in normalised ``pred``.
    An answer that normalises to nothing ('a', 'the') matches only an empty prediction."""
    em = cont = empty = 0
    for r in rows:
        a = normalise(str(r["answer"])).split()
        p = normalise(str(r["pred"])).split()
        empty += not a
        em += a == p
        cont += (_contains(a, p) if a else not p)
    n = len(rows)
    pct = (lambda x: 100.0 * x / n) if n else (lambda x: None)
    return {"contains": pct(cont), "exact_match": pct(em), "n": n, "contains_count": cont,
            "exact_match_count": em, "empty_answers": empty}


def score(run_dir: Path, root=None) -> dict:
    run_dir = Path(run_dir)
    merged = run_dir / "merge.jsonl"
    if not merged.exists():
        raise EvalError(f"{merged} does not exist: merge first (python -m eval.video_qa merge --run-dir {run_dir})")
    proc = answer_processor(root)
    res = keyless(read_answers(merged), proc)
    run = read_run(run_dir) if (run_dir / RUN_FILE).exists() else {}
    stats = json.loads((run_dir / "merge_stats.json").read_text()) if (run_dir / "merge_stats.json").exists() else {}
    out = {"benchmark": run.get("benchmark"), "method": run.get("method"), "budget": run.get("budget"),
           "mode": run.get("mode"), "trend": run.get("trend"), "model_name": run.get("model_name"),
           "metric": "contains", "value": res["contains"], **res, "questions": stats.get("questions"),
           "no_video": stats.get("no_video"),
           "normaliser": "Video-LLaVA videollava/eval/m4c_evaluator.py EvalAIAnswerProcessor",
           "caveats": CAVEATS, "scored_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    _write_json(run_dir / "score_keyless.json", out)
    return out


# ------------------------------------------------------------------ GPT judge
def _openai_version(python: str) -> str | None:
    r = subprocess.run([python, "-c", "import importlib.metadata as m; print(m.version('openai'))"],
                       capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else None


def judge(run_dir: Path, *, root=None, num_tasks: int = 8, stall: float = 900.0, python: str | None = None,
          poll: float = 5.0) -> dict:
    """Video-LLaVA's eval_video_qa.py over merge.jsonl (only with OPENAI_API_KEY); -> score_gpt.json."""
    run_dir = Path(run_dir)
    merged = run_dir / "merge.jsonl"
    if not merged.exists():
        raise EvalError(f"{merged} does not exist: merge first (python -m eval.video_qa merge --run-dir {run_dir})")
    key = os.environ.get("OPENAI_API_KEY", "").strip()
    if not key:
        raise EvalError(f"the GPT-3.5 judge needs OPENAI_API_KEY; answers kept in {merged}; the keyless score "
                        f"is python -m eval.video_qa score --run-dir {run_dir} ({run_dir / 'score_keyless.json'})")
    path = (Path(root) if root else video_llava_dir()) / "videollava" / "eval" / "video" / "eval_video_qa.py"
    if not path.exists():
        raise EvalError(f"{path} does not exist; run {populate_hint(UPSTREAM)}; answers kept in {merged}")
    python = python or sys.executable
    version = _openai_version(python)
    if version is None or int(version.split(".")[0]) >= 1:
        raise EvalError(f"eval_video_qa.py needs the pre-1.0 openai package (openai.ChatCompletion) but {python} has "
                        f"{'none' if version is None else version}; pip install 'openai<1.0'; answers kept in {merged}")
    base = os.environ.get("OPENAI_API_BASE", "").strip() or "https://api.openai.com/v1"  # "" breaks every request
    out_dir, log = run_dir / "gpt3.5", run_dir / "gpt_eval.log"
    out_dir.mkdir(exist_ok=True)
    total = len(read_answers(merged))
    cmd = [python, str(path), "--pred_path", str(merged), "--output_dir", str(out_dir), "--output_json",
           str(run_dir / "gpt3.5_results.json"), "--api_key", key, "--api_base", base, "--num_tasks", str(num_tasks)]
    with open(log, "a") as f:
        f.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} eval_video_qa.py, api base {base}\n")
        f.flush()
        start = f.tell()
        # Its own process group, so that the watchdog stops its worker pool too; stopped as well whenever this
        # process leaves early (Ctrl-C reaches only the terminal's foreground group).
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            done, last = len(list(out_dir.glob("*.json"))), time.monotonic()
            while proc.poll() is None:
                time.sleep(poll)
                now = len(list(out_dir.glob("*.json")))
                if now != done:
                    done, last = now, time.monotonic()
                elif time.monotonic() - last > stall:
                    raise EvalError(f"the GPT judge made no progress for {stall:.0f} s ({done} of {total} judged) and "
                                    f"was stopped: eval_video_qa.py retries failed requests forever (bad key or API "
                                    f"base, network, unparsable replies); see {log}; rerun to resume; answers kept "
                                    f"in {merged}")
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait()
    with open(log, "rb") as f:
        f.seek(start)
        text = f.read().decode(errors="replace")
    acc = re.search(r"^Accuracy: ([\d.eE+-]+)", text, re.M)
    avg = re.search(r"^Average score: ([\d.eE+-]+)", text, re.M)
    if proc.returncode or not acc or not avg:
        raise EvalError(f"eval_video_qa.py failed (exit {proc.returncode}) or printed no Accuracy/Average score; see "
                        f"{log}; answers kept in {merged}")
    yes = re.search(r"^Yes count: (\d+)", text, re.M)
    no = re.search(r"^No count: (\d+)", text, re.M)
    run = read_run(run_dir) if (run_dir / RUN_FILE).exists() else {}
    out = {"benchmark": run.get("benchmark"), "method": run.get("method"), "budget": run.get("budget"),
           "mode": run.get("mode"), "trend": run.get("trend"), "model_name": run.get("model_name"),
           "metric": "accuracy", "value": 100.0 * float(acc.group(1)), "accuracy": 100.0 * float(acc.group(1)),
           "score": float(avg.group(1)), "yes": int(yes.group(1)) if yes else None,
           "no": int(no.group(1)) if no else None, "n": total, "judge": "gpt-3.5-turbo (eval_video_qa.py)",
           "api_base": base, "judged_at": time.strftime("%Y-%m-%d %H:%M:%S"),
           "note": "the gpt-3.5-turbo alias drifts over time: compare runs judged at about the same date"}
    _write_json(run_dir / "score_gpt.json", out)
    return out


# ------------------------------------------------------------------ report
def report(answers_dir: Path) -> str:
    """Markdown table of every video run under ``answers_dir`` (also written as video_results.md / .csv)."""
    answers_dir = Path(answers_dir)
    rows = []
    runs = [(json.loads(f.read_text()), f) for f in answers_dir.rglob(RUN_FILE)]
    order = list(BENCHMARKS)
    runs.sort(key=lambda r: (r[0]["model_name"], order.index(r[0]["benchmark"]), r[0]["method"], r[0]["budget"],
                             MODES.index(r[0]["mode"]), r[0]["trend"] or ""))
    for run, run_file in runs:
        d = run_file.parent
        k = json.loads((d / "score_keyless.json").read_text()) if (d / "score_keyless.json").exists() else {}
        g = json.loads((d / "score_gpt.json").read_text()) if (d / "score_gpt.json").exists() else {}
        fmt = lambda v: "" if v is None else f"{v:.2f}"  # noqa: E731
        rows.append([run["model_name"], BENCHMARKS[run["benchmark"]].title, f"{run['method']}-{run['budget']}",
                     run["mode"], run["trend"] or "", fmt(k.get("contains")), fmt(k.get("exact_match")),
                     str(k.get("n", "")), fmt(g.get("accuracy")), fmt(g.get("score"))])
    if not rows:
        raise EvalError(f"no video QA run ({RUN_FILE}) under {answers_dir}")
    head = ["model", "benchmark", "method", "mode", "trend", "contains %", "exact %", "answers", "GPT acc %",
            "GPT score"]
    md = "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                   + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"
    (answers_dir / "video_results.md").write_text(md)
    with open(answers_dir / "video_results.csv", "w", newline="") as f:
        csv.writer(f).writerows([head, *rows])
    return md


# ------------------------------------------------------------------ CLI
def _csv_list(text: str) -> list[str]:
    return [t for t in re.split(r"[,\s]+", text or "") if t]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.video_qa", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("plan", help="check data, checkpoint, patched tree and trend; write video_run.json; "
                                    "print the run folders")
    a.add_argument("--answers-dir", required=True, type=Path)
    a.add_argument("--model-path", required=True)
    a.add_argument("--model-base", default=None)
    a.add_argument("--data-dir", required=True, type=Path, help="the GPT_Zero_Shot_QA folder")
    a.add_argument("--benchmarks", default=",".join(DEFAULT_BENCHMARKS))
    a.add_argument("--modes", default="off,full")
    a.add_argument("--trend", default=os.environ.get("DEBIAS_TREND"))
    a.add_argument("--fastv-k", type=int, default=None)
    a.add_argument("--fastv-rank", type=int, default=None)
    a.add_argument("--limit", type=int, default=None, help="only the first N questions (smoke tests)")
    a.add_argument("--video-llava", default=None, help="Video-LLaVA tree (default third_party/Video-LLaVA)")
    a = sub.add_parser("infer", help="run Video-LLaVA's inference script on what is left of one chunk")
    a.add_argument("--run-dir", required=True, type=Path)
    a.add_argument("--num-chunks", type=int, default=1)
    a.add_argument("--chunk-idx", type=int, default=0)
    a.add_argument("--script", default=None, help="inference script (default: the one in video_run.json)")
    a.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more arguments for the script")
    a = sub.add_parser("merge", help="chunk outputs -> merge.jsonl")
    a.add_argument("--run-dir", required=True, type=Path)
    a.add_argument("--questions", default=None, help="test_q.json (default: from video_run.json)")
    a.add_argument("--video-dir", default=None, help="classify unanswered questions (default: from video_run.json)")
    a = sub.add_parser("score", help="keyless exact-match / contains score -> score_keyless.json")
    a.add_argument("--run-dir", required=True, type=Path)
    a.add_argument("--video-llava", default=None)
    a = sub.add_parser("judge", help="GPT-3.5 judge (needs OPENAI_API_KEY) -> score_gpt.json")
    a.add_argument("--run-dir", required=True, type=Path)
    a.add_argument("--video-llava", default=None)
    a.add_argument("--num-tasks", type=int, default=8)
    a.add_argument("--stall", type=float, default=900.0, help="stop after this many seconds without a judgement")
    a = sub.add_parser("report", help="Markdown/CSV table of every video run")
    a.add_argument("--answers-dir", required=True, type=Path)
    args = p.parse_args(argv)
    try:
        if args.cmd == "plan":
            for d in plan(args.answers_dir, args.model_path, _csv_list(args.benchmarks), _csv_list(args.modes),
                          data_dir=args.data_dir, trend=args.trend or None, fastv_k=args.fastv_k or None,
                          fastv_rank=args.fastv_rank if args.fastv_k else None, model_base=args.model_base,
                          limit=args.limit, root=args.video_llava):
                print(d)
        elif args.cmd == "infer":
            extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
            return infer(args.run_dir, args.num_chunks, args.chunk_idx, script=args.script, extra=extra)
        elif args.cmd == "merge":
            s = merge(args.run_dir, args.questions, args.video_dir)
            note = f", {s['no_video']} without a video (skipped as Video-LLaVA does)" if s["no_video"] else ""
            print(f"{args.run_dir / 'merge.jsonl'}: {s['answers']} of {s['questions']} questions answered{note}")
        elif args.cmd == "score":
            r = score(args.run_dir, args.video_llava)
            shown = "n/a" if r["n"] == 0 else f"{r['contains']:.2f} % (exact match {r['exact_match']:.2f} %)"
            print(f"{args.run_dir}: contains {shown} over {r['n']} answers (keyless proxy; caveats in "
                  f"score_keyless.json)")
        elif args.cmd == "judge":
            r = judge(args.run_dir, root=args.video_llava, num_tasks=args.num_tasks, stall=args.stall)
            print(f"{args.run_dir}: GPT-3.5 accuracy {r['accuracy']:.2f} %, score {r['score']:.3f} ({r['n']} answers)")
        elif args.cmd == "report":
            print(report(args.answers_dir), end="")
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
