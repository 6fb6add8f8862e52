"""scripts/run_video.sh and scripts/run_illava.sh: a missing environment, tree, checkpoint, dataset or trend
stops the script before any GPU work with one line naming the path and how to get it (exit 2); and
run_video.sh end to end (plan, one chunk per GPU, merge, keyless score, no-key note, table) on CPU with a
stand-in for Video-LLaVA's inference script (tests/test_eval_video_qa.py FAKE_SCRIPT: the model is the only
thing replaced) inside an exported, patched tree.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from eval import upstream
from tests.support import ROOT, require_populated
from tests.test_eval_video_qa import FAKE_SCRIPT, NO_VIDEO, make_data

PY = sys.executable
DEFAULT_HUB_IDS = ("liuhaotian/llava-v1.5-7b", "LanguageBind/Video-LLaVA-7B", "lmms-lab/llava-onevision-qwen2-7b-ov")


def fake_hub_cache(folder: Path, ids=DEFAULT_HUB_IDS) -> Path:
    """A Hugging Face hub cache in which ``ids`` look downloaded (a snapshot with a config.json each)."""
    for hub_id in ids:
        snap = folder / f"models--{hub_id.replace('/', '--')}" / "snapshots" / ("0" * 40)
        snap.mkdir(parents=True, exist_ok=True)
        (snap / "config.json").write_text("{}")
    return folder


@pytest.fixture(scope="module", autouse=True)
def _hub_cache(tmp_path_factory):
    """The default checkpoints' hub ids count as downloaded unless a test sets HF_HUB_CACHE itself."""
    global HUB_CACHE
    HUB_CACHE = fake_hub_cache(tmp_path_factory.mktemp("hub"))


def run(script, env, cwd=None, root=ROOT):
    full = {k: v for k, v in os.environ.items()
            if k not in ("PYTHON", "EVAL_THIRD_PARTY", "CKPT", "DEBIAS_TREND", "TREND", "MODES", "BENCHMARKS",
                         "OPENAI_API_KEY", "GPUS", "CUDA_VISIBLE_DEVICES", "TARGET", "VIDEO_DATA_DIR", "DATA_DIR",
                         "LIMIT", "METHOD_ARGS", "HF_HOME", "HUGGINGFACE_HUB_CACHE")}
    full["HF_HUB_CACHE"] = str(HUB_CACHE)
    full.update(env)
    return subprocess.run(["bash", str(root / "scripts" / script)], env=full, cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def one_error(r, *parts):
    """Exit 2 and exactly one stderr line, 'error: ...', containing every part."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for p in parts:
        assert p in lines[0], (p, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def video_tree(tmp_path_factory):
    require_populated("Video-LLaVA")
    tp = tmp_path_factory.mktemp("tp")
    upstream.export_tree("Video-LLaVA", tp / "Video-LLaVA", paths=["videollava/eval", "videollava/model"])
    return tp


@pytest.fixture()
def bare_repo(tmp_path):
    """The run scripts and their lib in a folder with no environments and no third_party."""
    (tmp_path / "scripts" / "lib").mkdir(parents=True)
    for f in ("run_video.sh", "run_illava.sh", "lib/common.sh"):
        shutil.copy(ROOT / "scripts" / f, tmp_path / "scripts" / f)
    return tmp_path


# ------------------------------------------------------------------ run_video.sh errors
def test_video_missing_environment(bare_repo):
    one_error(run("run_video.sh", {}, root=bare_repo), f"{bare_repo}/envs/venv-Video-LLaVA",
              "bash setup.sh --only Video-LLaVA")


def test_video_unpopulated_tree(bare_repo):
    one_error(run("run_video.sh", {"PYTHON": PY}, root=bare_repo), f"{bare_repo}/third_party/Video-LLaVA is not "
              "populated", "git submodule update --init third_party/Video-LLaVA")


def test_video_series_not_applied():
    require_populated("Video-LLaVA")
    state = subprocess.run(["bash", str(ROOT / "scripts" / "apply_patches.sh"), "--status", "Video-LLaVA"],
                           capture_output=True, text=True).stdout
    if " applied=yes" in state:
        pytest.skip("third_party/Video-LLaVA has the series applied here, so the not-applied error was not tested")
    one_error(run("run_video.sh", {"PYTHON": PY}), "third_party/Video-LLaVA does not have patches/Video-LLaVA "
              "applied", "bash scripts/apply_patches.sh Video-LLaVA")


def test_video_pristine_export_refused(tmp_path):
    require_populated("Video-LLaVA")
    upstream.export_tree("Video-LLaVA", tmp_path / "Video-LLaVA", patched=False, paths=["videollava/eval"])
    one_error(run("run_video.sh", {"PYTHON": PY, "EVAL_THIRD_PARTY": str(tmp_path)}),
              f"{tmp_path}/Video-LLaVA/videollava/eval/video/run_inference_video_qa.py lacks our patch series",
              "bash scripts/apply_patches.sh Video-LLaVA")


def test_video_missing_checkpoint(video_tree):
    one_error(run("run_video.sh", {"PYTHON": PY, "EVAL_THIRD_PARTY": str(video_tree),
                                   "CKPT": "/nonexistent/Video-LLaVA-7B"}),
              "checkpoint /nonexistent/Video-LLaVA-7B does not exist", "set CKPT")


def test_video_checkpoint_name_without_llava(video_tree, tmp_path):
    (tmp_path / "my-model").mkdir()
    one_error(run("run_video.sh", {"PYTHON": PY, "EVAL_THIRD_PARTY": str(video_tree),
                                   "CKPT": str(tmp_path / "my-model")}), "'my-model' must contain 'llava'")


def test_video_missing_data(video_tree, tmp_path):
    (tmp_path / "Video-LLaVA-7B").mkdir()
    env = {"PYTHON": PY, "EVAL_THIRD_PARTY": str(video_tree), "CKPT": str(tmp_path / "Video-LLaVA-7B")}
    one_error(run("run_video.sh", {**env, "VIDEO_DATA_DIR": str(tmp_path / "vqa")}),
              f"MSVD-QA data {tmp_path}/vqa/MSVD_Zero_Shot_QA does not exist", "TRAIN_AND_VALIDATE.md")
    one_error(run("run_video.sh", {**env, "DATA_DIR": str(tmp_path / "eval")}),   # LLaVA's DATA_DIR is the base
              f"{tmp_path}/eval/GPT_Zero_Shot_QA/MSVD_Zero_Shot_QA does not exist")
    data = make_data(tmp_path / "d")
    one_error(run("run_video.sh", {**env, "VIDEO_DATA_DIR": str(data), "BENCHMARKS": "msvd tgif"}),
              f"TGIF-QA data {data}/TGIF_Zero_Shot_QA does not exist")


@pytest.mark.parametrize("trend,parts", [
    ("", ["mode full needs DEBIAS_TREND", "calibrate one over the 2056 video positions"]),
    ("paper:fastv", ["paper:fastv is a LLaVA-1.5 preset over 576 positions"]),
    ("/nonexistent/video_trend.json", ["trend file /nonexistent/video_trend.json does not exist"]),
])
def test_video_full_mode_needs_a_video_trend(video_tree, tmp_path, trend, parts):
    (tmp_path / "Video-LLaVA-7B").mkdir()
    one_error(run("run_video.sh", {"PYTHON": PY, "EVAL_THIRD_PARTY": str(video_tree), "DEBIAS_TREND": trend,
                                   "CKPT": str(tmp_path / "Video-LLaVA-7B"), "BENCHMARKS": "msvd",
                                   "VIDEO_DATA_DIR": str(make_data(tmp_path / "d"))}), *parts)


def test_video_end_to_end_with_a_stand_in_model(tmp_path):
    """Two GPUs' chunks, modes off and full, merge, keyless score, the no-key note, the table; then a rerun
    resumes with nothing left to do."""
    require_populated("Video-LLaVA")
    tp = tmp_path / "tp"
    tree = upstream.export_tree("Video-LLaVA", tp / "Video-LLaVA", paths=["videollava/eval", "videollava/model"])
    (tree / "videollava" / "eval" / "video" / "run_inference_video_qa.py").write_text(FAKE_SCRIPT)
    (tmp_path / "Video-LLaVA-7B").mkdir()
    trend = tmp_path / "video_trend.json"
    trend.write_text(json.dumps({"form": "exponential", "a": 1.0, "b": 1e-4, "n": 2056}))
    answers = tmp_path / "answers"
    make_data(tmp_path / "d")
    env = {"PYTHON": PY, "EVAL_THIRD_PARTY": str(tp), "CKPT": "Video-LLaVA-7B",   # paths relative to the cwd
           "VIDEO_DATA_DIR": "d/GPT_Zero_Shot_QA", "ANSWERS_DIR": "answers", "GPUS": "0,1",
           "BENCHMARKS": "msvd", "DEBIAS_TREND": "calibrated:video_trend.json",
           "FAKE_LOG": str(tmp_path / "calls.jsonl")}
    r = run("run_video.sh", env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    base = answers / "Video-LLaVA-7B" / "msvd" / "fastv-k2r1028"
    for tag, mode in (("off", "off"), ("full-video_trend.json", "full")):
        d = base / tag
        merged = [json.loads(x) for x in (d / "merge.jsonl").read_text().splitlines()]
        assert [m["id"] for m in merged] == [f"q{i}" for i in range(9) if f"q{i}" != NO_VIDEO]
        score = json.loads((d / "score_keyless.json").read_text())
        assert score["n"] == 8 and score["contains"] == pytest.approx(100 * 5 / 8) and score["mode"] == mode
        assert f"answers kept in {d}/merge.jsonl" in r.stdout
    c = [json.loads(x) for x in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert sorted(tuple(x["ids"]) for x in c) == sorted([("q0", "q1", "q2", "q3", "q4"), ("q6", "q7", "q8")] * 2)
    assert {x["DEBIAS"] for x in c} == {"off", "full"}
    assert "| MSVD-QA | fastv-k2r1028 | full |" in (answers / "video_results.md").read_text()
    r2 = run("run_video.sh", env, cwd=tmp_path)
    assert r2.returncode == 0, r2.stderr
    assert len((tmp_path / "calls.jsonl").read_text().splitlines()) == len(c)   # nothing left to do


# ------------------------------------------------------------------ run_illava.sh errors
def test_illava_unknown_target():
    one_error(run("run_illava.sh", {"PYTHON": PY, "TARGET": "qwen"}), "TARGET=qwen is unknown",
              "llava15 (default) or onevision")


@pytest.mark.parametrize("target,env_name", [("llava15", "LLaVA"), ("onevision", "iLLaVA")])
def test_illava_missing_environment(bare_repo, target, env_name):
    one_error(run("run_illava.sh", {"TARGET": target}, root=bare_repo), f"{bare_repo}/envs/venv-{env_name}",
              f"bash setup.sh --only {env_name}")


def test_illava_llava15_needs_the_port():
    require_populated("LLaVA")
    state = subprocess.run(["bash", str(ROOT / "scripts" / "apply_patches.sh"), "--status", "LLaVA"],
                           capture_output=True, text=True).stdout
    if " applied=yes" in state:
        pytest.skip("third_party/LLaVA has the series applied here, so the not-applied error was not tested")
    one_error(run("run_illava.sh", {"PYTHON": PY}), "third_party/LLaVA does not have patches/LLaVA applied",
              "bash scripts/apply_patches.sh LLaVA")


def test_illava_llava15_pristine_export_refused(tmp_path):
    require_populated("LLaVA")
    upstream.export_tree("LLaVA", tmp_path / "LLaVA", patched=False, paths=["llava/model"])
    one_error(run("run_illava.sh", {"PYTHON": PY, "EVAL_THIRD_PARTY": str(tmp_path)}),
              f"{tmp_path}/LLaVA/llava/model/language_model/illava_llama.py lacks our patch series",
              "bash scripts/apply_patches.sh LLaVA")


def test_illava_llava15_reaches_the_driver_checks(tmp_path):
    """With the port exported, the common driver's own checks run (here: its missing-checkpoint line)."""
    require_populated("LLaVA")
    upstream.export_tree("LLaVA", tmp_path / "tp" / "LLaVA", paths=["llava"])
    r = run("run_illava.sh", {"PYTHON": PY, "EVAL_THIRD_PARTY": str(tmp_path / "tp"),
                              "CKPT": "/nonexistent/llava-v1.5-7b"})
    one_error(r, "checkpoint /nonexistent/llava-v1.5-7b does not exist")


def ov(env):
    return run("run_illava.sh", {"PYTHON": PY, "TARGET": "onevision", **env})


def test_onevision_missing_checkpoint():
    one_error(ov({"CKPT": "/nonexistent/llava-onevision-qwen2-7b-ov", "MODES": "off"}),
              "checkpoint /nonexistent/llava-onevision-qwen2-7b-ov does not exist",
              "huggingface-cli download lmms-lab/llava-onevision-qwen2-7b-ov")


@pytest.mark.parametrize("trend,parts", [
    ("", ["mode full needs DEBIAS_TREND", "no positional trend is published for LLaVA-OneVision"]),
    ("N576", ["covers 576 positions but the visual span may reach 32768"]),
    ("/nonexistent/ov_trend.json", ["/nonexistent/ov_trend.json", "does not exist"]),
])
def test_onevision_trend(tmp_path, trend, parts):
    if trend == "N576":
        trend = str(tmp_path / "t.json")
        Path(trend).write_text(json.dumps({"form": "exponential", "a": 1.0, "b": 1e-3, "n": 576}))
    one_error(ov({"DEBIAS_TREND": trend, "MODES": "off full"}), *parts)


def test_onevision_trend_bound_follows_the_checkpoint(tmp_path):
    ckpt = tmp_path / "llava-onevision-tiny"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"max_position_embeddings": 4096}))
    trend = tmp_path / "t.json"
    trend.write_text(json.dumps({"form": "exponential", "a": 1.0, "b": 1e-3, "n": 2048}))
    one_error(ov({"DEBIAS_TREND": str(trend), "CKPT": str(ckpt), "MODES": "off full"}),
              "covers 2048 positions but the visual span may "
              "reach 4096")


def test_onevision_unknown_task():
    require_populated("iLLaVA")
    one_error(ov({"MODES": "off", "BENCHMARKS": "gqa,not_a_task"}), "lmms-eval task 'not_a_task'",
              "is not defined under")


def test_onevision_environment_without_lmms_eval(tmp_path):
    """A patched tree but an interpreter lacking the iLLaVA environment's packages (.venv-test has no
    accelerate): named, with how to build the environment."""
    require_populated("iLLaVA")
    upstream.export_tree("iLLaVA", tmp_path / "iLLaVA",
                         paths=["src/lmms_eval-0.2.4/lmms_eval", "src/transformers-4.46.0/src/transformers/models/qwen2"])
    r = ov({"MODES": "off", "EVAL_THIRD_PARTY": str(tmp_path), "BENCHMARKS": "gqa"})
    line = one_error(r, "build it with: bash setup.sh --only iLLaVA")
    assert "has no" in line or "not from the patched tree" in line



FAKE_LAUNCH = r'''#!/usr/bin/env bash
# Stands in for the iLLaVA environment's interpreter: lmms-eval launches are recorded (argv, DEBIAS*, GPUs) and
# leave a results file where lmms-eval writes one; everything else runs on the test interpreter.
if [[ $1 == -m && ( $2 == lmms_eval || $2 == accelerate.commands.launch ) ]]; then
  exec {py} - "$@" <<'END'
import json, os, sys
argv = sys.argv[1:]
out = argv[argv.index("--output_path") + 1]
os.makedirs(os.path.join(out, "llava_qwen_training_free"), exist_ok=True)
open(os.path.join(out, "llava_qwen_training_free", "20260101_000000_results.json"), "w").write("{{}}")
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({{"argv": argv, "env": {{k: v for k, v in os.environ.items()
                                              if k.startswith("DEBIAS") or k == "CUDA_VISIBLE_DEVICES"}},
                        "pythonpath": os.environ.get("PYTHONPATH", "")}}) + "\n")
END
fi
exec {py} "$@"
'''


def test_onevision_launches_lmms_eval_per_task_and_mode(tmp_path):
    """The notes' lmms-eval command per (task, mode), one process per GPU through accelerate, DEBIAS* set per
    mode, the patched tree first on PYTHONPATH; a rerun skips what has a results file. lmms-eval itself is
    replaced (FAKE_LAUNCH), and accelerate is an empty stand-in package: only its presence is checked here."""
    require_populated("iLLaVA")
    tp = tmp_path / "tp"
    upstream.export_tree("iLLaVA", tp / "iLLaVA", paths=[
        "src/lmms_eval-0.2.4/lmms_eval", "src/transformers-4.46.0/src/transformers/__init__.py",
        "src/transformers-4.46.0/src/transformers/models/qwen2", "src/LLaVA-OneVision/llava/__init__.py"])
    site = tmp_path / "site"
    (site / "accelerate").mkdir(parents=True)
    (site / "accelerate" / "__init__.py").write_text("")
    fake = tmp_path / "python"
    fake.write_text(FAKE_LAUNCH.format(py=PY))
    fake.chmod(0o755)
    trend = tmp_path / "ov_trend.json"
    trend.write_text(json.dumps({"form": "exponential", "a": 1.0, "b": 1e-5, "n": 32768}))
    log = tmp_path / "launches.jsonl"
    env = {"PYTHON": str(fake), "TARGET": "onevision", "EVAL_THIRD_PARTY": str(tp), "PYTHONPATH": str(site),
           "BENCHMARKS": "gqa,mme", "DEBIAS_TREND": f"calibrated:{trend}", "GPUS": "0,1", "MODES": "off full",
           "ANSWERS_DIR": str(tmp_path / "answers"), "FAKE_LOG": str(log)}
    r = run("run_illava.sh", env)
    assert r.returncode == 0, r.stdout + r.stderr
    launches = [json.loads(x) for x in log.read_text().splitlines()]
    assert len(launches) == 4
    out = tmp_path / "answers" / "onevision" / "llava-onevision-qwen2-7b-ov"
    for x, (task, mode) in zip(launches, [("gqa", "off"), ("gqa", "full"), ("mme", "off"), ("mme", "full")]):
        a = x["argv"]
        assert a[:7] == ["-m", "accelerate.commands.launch", "--num_processes", "2", "--main_process_port", "29517",
                         "-m"] and a[7] == "lmms_eval"
        opt = {a[i]: a[i + 1] for i in range(8, len(a) - 1) if a[i].startswith("--")}
        assert opt["--model"] == "llava_onevision_training_free" and opt["--tasks"] == task
        assert opt["--model_args"] == (
            "pretrained=lmms-lab/llava-onevision-qwen2-7b-ov,conv_template=qwen_1_5,model_name=llava_qwen_training_free,"
            "device_map=auto,enable_illava_vit=True,illava_vit_k=5-6-7-8,illava_vit_r=92,enable_illava_llm=True,"
            "illava_llm_k=8,illava_llm_r=0.70")
        assert opt["--batch_size"] == "1" and "--log_samples" in a
        tag = "off" if mode == "off" else "full-ov_trend.json"
        assert opt["--output_path"] == str(out / task / "illava-image" / tag)
        assert x["env"].get("DEBIAS") == mode and x["env"]["CUDA_VISIBLE_DEVICES"] == "0,1"
        assert x["env"].get("DEBIAS_TREND") == (None if mode == "off" else f"calibrated:{trend}")
        assert "DEBIAS_METHOD" not in x["env"]
        assert x["pythonpath"].split(":")[:3] == [f"{tp}/iLLaVA/src/lmms_eval-0.2.4",
                                                  f"{tp}/iLLaVA/src/transformers-4.46.0/src",
                                                  f"{tp}/iLLaVA/src/LLaVA-OneVision"]
    r = run("run_illava.sh", env)
    assert r.returncode == 0 and r.stdout.count(": done (") == 4, r.stdout + r.stderr
    assert len(log.read_text().splitlines()) == 4
    other = tmp_path / "other" / "ov_trend.json"   # same file name, another trend: not the finished run
    other.parent.mkdir()
    other.write_text(json.dumps({"form": "exponential", "a": 1.0, "b": 2e-5, "n": 32768}))
    r = run("run_illava.sh", {**env, "DEBIAS_TREND": f"calibrated:{other}", "BENCHMARKS": "gqa"})
    assert r.returncode == 1 and "full-ov_trend.json holds results of another run" in r.stderr, r.stderr
    assert len(log.read_text().splitlines()) == 4


# ------------------------------------------------------------------ run_<method>.sh over scripts/lib/common.sh
FAKE_DRIVER = r'''#!/usr/bin/env bash
# Stands in for a method environment's interpreter: a real (not --check-only) eval.run records its argv, one
# JSON line, and does no work; everything else (the up-front checks) runs on the test interpreter.
if [[ $1 == -m && $2 == eval.run && " $* " != *" --check-only "* ]]; then
  exec {py} -c 'import json, os, sys; open(os.environ["FAKE_LOG"], "a").write(json.dumps(sys.argv[1:]) + "\n")' "$@"
fi
exec {py} "$@"
'''


@pytest.fixture()
def llava_run(tmp_path):
    """run_llava.sh with a local checkpoint folder, the synthetic POPE-format data and a driver that records
    what it is asked to do; returns (env, log of driver calls)."""
    subprocess.run([PY, "-m", "eval.synthetic", str(tmp_path / "data")], check=True, env={**os.environ,
                   "PYTHONPATH": str(ROOT)}, capture_output=True)
    (tmp_path / "llava-v1.5-7b").mkdir()
    fake = tmp_path / "python"
    fake.write_text(FAKE_DRIVER.format(py=PY))
    fake.chmod(0o755)
    log = tmp_path / "driver.jsonl"
    env = {"PYTHON": str(fake), "CKPT": str(tmp_path / "llava-v1.5-7b"), "DATA_DIR": str(tmp_path / "data"),
           "BENCHMARKS": "synthetic_wide", "ANSWERS_DIR": str(tmp_path / "answers"), "FAKE_LOG": str(log)}
    return env, log


def driver_calls(log: Path) -> list:
    return [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []


def test_run_script_without_a_downloaded_checkpoint(llava_run, tmp_path):
    env, log = llava_run
    env = {**env, "HF_HUB_CACHE": str(tmp_path / "empty-cache")}
    env.pop("CKPT")
    one_error(run("run_llava.sh", env), "checkpoint liuhaotian/llava-v1.5-7b is not downloaded",
              "huggingface-cli download liuhaotian/llava-v1.5-7b", "set CKPT")
    one_error(run("run_llava.sh", {**env, "CKPT": str(tmp_path / "nowhere")}),
              f"checkpoint {tmp_path}/nowhere does not exist", "set CKPT")
    assert driver_calls(log) == []


@pytest.mark.parametrize("limit", ["abc", "0", "-3", "1.5"])
def test_run_script_limit_must_be_a_positive_integer(llava_run, limit):
    env, log = llava_run
    one_error(run("run_llava.sh", {**env, "LIMIT": limit}), f"LIMIT={limit} is not a positive integer")
    assert driver_calls(log) == []


def test_run_script_refuses_a_limit_the_scorer_cannot_score(llava_run, tmp_path):
    """The synthetic benchmark alternates categories shape, color: eval_pope.py needs both, so LIMIT >= 2."""
    env, log = llava_run
    one_error(run("run_llava.sh", {**env, "LIMIT": "1"}), "LIMIT=1 is too small for Synthetic-wide",
              "use LIMIT=2 or more")
    assert driver_calls(log) == [] and not (tmp_path / "answers").exists()
    r = run("run_llava.sh", {**env, "LIMIT": "2"})
    calls = driver_calls(log)
    assert calls and "--limit" in calls[0] and calls[0][calls[0].index("--limit") + 1] == "2", r.stdout + r.stderr


def test_run_script_checks_the_scorer_files_before_any_answer(llava_run, tmp_path):
    """A POPE-format run needs coco/coco_pope_<category>.json to be scored: missing, nothing runs."""
    env, log = llava_run
    shutil.rmtree(tmp_path / "data" / "synthetic" / "wide" / "coco")
    one_error(run("run_llava.sh", env), "Synthetic-wide's scorer (LLaVA eval_pope.py) needs its label files",
              f"{tmp_path}/data/synthetic/wide/coco")
    assert driver_calls(log) == [] and not (tmp_path / "answers").exists()


def test_run_script_method_args_reach_the_driver_literally(llava_run, tmp_path):
    env, log = llava_run
    work = tmp_path / "cwd"
    work.mkdir()
    for name in ("k=1", "k=2"):                    # what an unquoted k=* would expand to
        (work / name).write_text("")
    # Record the --check-only call too (it runs first and may refuse keys the method does not know).
    fake = Path(env["PYTHON"])
    fake.write_text(FAKE_DRIVER.format(py=PY).replace('" --check-only "', '" --never-matches "'))
    run("run_llava.sh", {**env, "METHOD_ARGS": "k=*  other=[ab]"}, cwd=work)
    argv = driver_calls(log)[0]
    args = [argv[i + 1] for i, a in enumerate(argv) if a == "--method-arg"]
    assert args == ["k=*", "other=[ab]"], argv


def test_onevision_defaults_run_without_a_trend(tmp_path):
    """TARGET=onevision with its defaults: no OneVision trend exists, so the default modes need none (off)."""
    require_populated("iLLaVA")
    tp = tmp_path / "tp"
    upstream.export_tree("iLLaVA", tp / "iLLaVA", paths=[
        "src/lmms_eval-0.2.4/lmms_eval", "src/transformers-4.46.0/src/transformers/__init__.py",
        "src/transformers-4.46.0/src/transformers/models/qwen2", "src/LLaVA-OneVision/llava/__init__.py"])
    site = tmp_path / "site"
    (site / "accelerate").mkdir(parents=True)
    (site / "accelerate" / "__init__.py").write_text("")
    fake = tmp_path / "python"
    fake.write_text(FAKE_LAUNCH.format(py=PY))
    fake.chmod(0o755)
    log = tmp_path / "launches.jsonl"
    r = run("run_illava.sh", {"PYTHON": str(fake), "TARGET": "onevision", "EVAL_THIRD_PARTY": str(tp),
                              "PYTHONPATH": str(site), "BENCHMARKS": "gqa", "ANSWERS_DIR": str(tmp_path / "a"),
                              "FAKE_LOG": str(log)})
    assert r.returncode == 0, r.stdout + r.stderr
    launches = [json.loads(x) for x in log.read_text().splitlines()]
    assert [x["env"].get("DEBIAS") for x in launches] == ["off"]
    help_text = (ROOT / "scripts" / "run_illava.sh").read_text()
    assert "python -m debias_core fit" in help_text and 'MODES="off full" DEBIAS_TREND=calibrated:' in help_text
