"""The driver end to end with a tiny random LLaVA on the synthetic benchmarks (CPU, offline).

Needs LLaVA's load_pretrained_model to work here, which needs ``accelerate`` (and matplotlib for the figure).
"""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import ROOT, require_module

SUBSETS = ("synthetic_wide", "synthetic_tall", "synthetic_square")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    require_module("accelerate", "the eval driver loads models through LLaVA's load_pretrained_model, which "
                                 "needs accelerate (low_cpu_mem_usage); the driver was not run")
    from eval.synthetic import build_synthetic
    from eval.tiny_llava import build_tiny_llava

    root = tmp_path_factory.mktemp("evaldrv")
    model = build_tiny_llava(root / "tiny-llava")
    build_synthetic(root / "data", images=3)  # 6 questions per benchmark
    return {"root": root, "model": model, "data": root / "data"}


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")


def _driver_cmd(tiny, answers, benchmarks, modes="off", *extra):
    return [sys.executable, "-m", "eval.run", "--method", "llava", "--benchmark", ",".join(benchmarks),
            "--mode", modes, "--trend", "paper:fastv", "--model-path", str(tiny["model"]), "--data-dir",
            str(tiny["data"]), "--answers-dir", str(answers), "--max-new-tokens", "6", "--device", "cpu", *extra]


def _rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _comparable(rows):
    return [(r["question_id"], r["prompt"], r["text"], r["metadata"]) for r in rows]


@pytest.fixture(scope="module")
def one_shot(tiny):
    answers = tiny["root"] / "one-shot"
    r = subprocess.run(_driver_cmd(tiny, answers, SUBSETS, "off,full"), cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return answers / "tiny-llava"


def test_one_shot_writes_llava_answer_files(tiny, one_shot):
    rows = _rows(one_shot / "synthetic_wide" / "llava-all" / "off" / "merge.jsonl")
    questions = _rows(tiny["data"] / "synthetic" / "wide" / "llava_synthetic.jsonl")
    assert [r["question_id"] for r in rows] == [q["question_id"] for q in questions]
    for r, q in zip(rows, questions):
        assert set(r) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
        assert r["prompt"] == q["text"] and r["model_id"] == "tiny-llava"
        assert r["metadata"] == {"method": "llava", "mode": "off", "budget": "all", "trend": None,
                                 "preprocess": "pad"}
    full = _rows(one_shot / "synthetic_wide" / "llava-all" / "full-paper-fastv" / "merge.jsonl")
    assert full[0]["metadata"]["trend"] == "paper:fastv" and full[0]["metadata"]["mode"] == "full"
    # no ranking site in plain LLaVA: the debias mode cannot change an answer (greedy decoding)
    assert [r["text"] for r in full] == [r["text"] for r in rows]
    log = (one_shot / "synthetic_wide" / "llava-all" / "off" / "1_0.log").read_text()
    for field in ("method     llava", "budget     all", "mode       off", "trend", "project", "upstream"):
        assert field in log


def test_chunked_run_script_merges_to_the_one_shot_answers(tiny, one_shot):
    answers = tiny["root"] / "chunked"
    env = dict(_env(), PYTHON=sys.executable, CKPT=str(tiny["model"]), DATA_DIR=str(tiny["data"]),
               ANSWERS_DIR=str(answers), BENCHMARKS="synthetic_wide", GPUS="0,1",
               MAX_NEW_TOKENS="6", CUDA_VISIBLE_DEVICES="")
    r = subprocess.run(["bash", "scripts/run_llava.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    for bench in ("synthetic_wide",):
        run = answers / "tiny-llava" / bench / "llava-all" / "off"
        assert (run / "2_0.jsonl").exists() and (run / "2_1.jsonl").exists()
        assert _comparable(_rows(run / "merge.jsonl")) == _comparable(
            _rows(one_shot / bench / "llava-all" / "off" / "merge.jsonl"))
        score = json.loads((run / "score.json").read_text())
        assert score["metric"] == "f1" and score["n_answers"] == 6 and score["scoring"] == "local"


def test_sigkill_at_random_points_then_resume_gives_each_answer_once(tiny, one_shot):
    answers = tiny["root"] / "killed"
    cmd = _driver_cmd(tiny, answers, SUBSETS, "off,full")
    files = lambda: list(answers.rglob("1_0.jsonl"))  # noqa: E731
    count = lambda: sum(len(p.read_bytes().splitlines()) for p in files())  # noqa: E731
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    points = []
    for _ in range(3):
        p = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        start, target = count(), rng.randint(1, 6)  # 3 kills × (≤ 6 + what lands in the sleep) stay below all 36
        deadline = time.time() + 120
        while p.poll() is None and count() < start + target and time.time() < deadline:
            time.sleep(rng.uniform(0.0, 0.05))
        time.sleep(rng.uniform(0.0, 0.3))  # lands anywhere: between answers, mid-write, mid-generate
        p.send_signal(signal.SIGKILL)
        p.wait()
        points.append(count())
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"kill points {points}: " + r.stderr[-3000:]
    assert points[-1] < 36, f"the runs finished before being killed ({points}); the test did not kill anything"
    for bench in SUBSETS:
        for mode in ("off", "full-paper-fastv"):
            run = answers / "tiny-llava" / bench / "llava-all" / mode
            ids = [r["question_id"] for r in _rows(run / "1_0.jsonl")]
            expected = [q["question_id"] for q in _rows(tiny["data"] / "synthetic" / bench.split("_")[1]
                                                         / "llava_synthetic.jsonl")]
            assert sorted(ids) == sorted(expected), f"kill points {points}: {bench}/{mode}"
            assert _comparable(_rows(run / "merge.jsonl")) == _comparable(
                _rows(one_shot / bench / "llava-all" / mode / "merge.jsonl"))


def test_driver_opens_the_debias_sample_context_around_generate(tiny, tmp_path, monkeypatch):
    """What a patched baseline's ranking site will see: the image size, pad preprocessing and the real span."""
    import debias_core
    from eval import run as driver
    from eval.methods.llava import LlavaAdapter

    seen = []
    original = LlavaAdapter.generate

    def spy(self, loaded, input_ids, image_tensor, image_size, **kw):
        ctx = debias_core.current_samples()[0]
        s0 = int((input_ids[0] == -200).nonzero()[0, 0])
        seen.append((ctx.image_size, ctx.preprocess, ctx.span_start, s0, ctx.grid, ctx.resolution,
                     debias_core.settings().mode))
        return original(self, loaded, input_ids, image_tensor, image_size, **kw)

    monkeypatch.setattr(LlavaAdapter, "generate", spy)
    args = driver.parse_args(["--method", "llava", "--method-arg", "source=installed", "--benchmark",
                              "synthetic_tall", "--mode", "pad", "--model-path", str(tiny["model"]),
                              "--data-dir", str(tiny["data"]), "--answers-dir", str(tmp_path), "--max-new-tokens", "2",
                              "--device", "cpu"])
    try:
        driver.run(args)
    finally:
        debias_core.reset()
    from PIL import Image
    sizes = [Image.open(tiny["data"] / "synthetic" / "tall" / "images" / q["image"]).size
             for q in _rows(tiny["data"] / "synthetic" / "tall" / "llava_synthetic.jsonl")]
    assert [s[0] for s in seen] == sizes
    assert all(s[1] == "pad" and s[2] == s[3] and s[4:6] == (24, 336) and s[6] == "pad" for s in seen)
    assert debias_core.current_samples() is None  # closed after each sample


def test_fastv_style_selection_and_figure(tiny, tmp_path):
    require_module("matplotlib", "the kept-token figure needs matplotlib")
    import torch
    import debias_core
    from eval.methods import get_adapter
    from eval.overlay import draw_kept, fastv_style_selection
    from PIL import Image

    adapter = get_adapter("llava", {"source": "installed"})
    adapter.activate()
    loaded = adapter.load(str(tiny["model"]), device="cpu")
    image = Image.new("RGB", (1000, 101), (200, 30, 30))  # 48 content tokens at threshold 0.5
    try:
        e = fastv_style_selection(adapter, loaded, image, "Is there a red square?", keep=128, modes=("off", "full"))
        # recompute the raw scores to check "off" is plain top-k of layer-1 last-token attention
        ids = adapter.input_ids(loaded, "Is there a red square?", has_image=True)
        s0 = adapter.span_start(ids)
        with torch.inference_mode():
            out = loaded.model(ids, images=e["pixels"][None], image_sizes=[image.size], output_attentions=True)
        raw = out.attentions[1][0].mean(0)[-1, s0:s0 + 576]
        assert e["kept"]["off"] == sorted(torch.topk(raw, 128).indices.tolist())
        valid = debias_core.valid_mask(debias_core.pad_fractions((1000, 101)), 0.5).reshape(-1)
        assert len(e["kept"]["full"]) == int(valid.sum()) == 48
        assert valid[e["kept"]["full"]].all()
        ids = adapter.input_ids(loaded, "Hello?", has_image=False)  # a text-only sample (ScienceQA has them)
        assert adapter.span_start(ids) is None
        with debias_core.sample(image_size=None):
            assert isinstance(adapter.generate(loaded, ids, None, None, max_new_tokens=2), str)
        png = draw_kept([dict(e, name="wide")], tmp_path / "k.png", mean=loaded.image_processor.image_mean,
                        std=loaded.image_processor.image_std, title="test")
        assert png.stat().st_size > 10_000
    finally:
        debias_core.reset()


FAKE_SBATCH = r'''#!/usr/bin/env python3
# Stand-in for SLURM's sbatch: records the call, then runs the job at once (array tasks one after another).
import os, subprocess, sys
opts, script = {}, None
for a in sys.argv[1:]:
    if a.startswith("--"):
        k, _, v = a[2:].partition("=")
        opts[k] = v
    else:
        script = a
env = dict(os.environ, SLURM_SUBMIT_DIR=os.getcwd())
for kv in opts.get("export", "").split(",")[1:]:
    k, _, v = kv.partition("=")
    env[k] = v
with open(os.environ["FAKE_SBATCH_LOG"], "a") as log:
    log.write(" ".join(sys.argv[1:]) + "\n")
tasks = [None]
if "array" in opts:
    lo, hi = map(int, opts["array"].split("-"))
    tasks = list(range(lo, hi + 1))
for t in tasks:
    e = dict(env)
    if t is not None:
        e.update(SLURM_ARRAY_TASK_ID=str(t), SLURM_ARRAY_TASK_COUNT=str(len(tasks)))
    r = subprocess.run(["bash", script], env=e, stdout=sys.stderr)
    if r.returncode:
        sys.exit(r.returncode)
print(sum(1 for _ in open(os.environ["FAKE_SBATCH_LOG"])) + 100)
'''


def test_slurm_array_template_runs_chunks_then_merges_and_scores(tiny, one_shot, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "sbatch").chmod(0o755)
    answers = tmp_path / "answers"
    env = dict(_env(), PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_SBATCH_LOG=str(tmp_path / "sbatch.log"),
               METHOD="llava", ENV="test", PYTHON=sys.executable, CHUNKS="2", CKPT=str(tiny["model"]),
               DATA_DIR=str(tiny["data"]), ANSWERS_DIR=str(answers), BENCHMARKS="synthetic_square", MODES="off",
               MAX_NEW_TOKENS="6")
    r = subprocess.run(["bash", "scripts/slurm/submit.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    calls = (tmp_path / "sbatch.log").read_text().splitlines()
    assert "--array=0-1" in calls[0] and calls[0].endswith("scripts/slurm/eval_array.sbatch")
    # afterany: the merge runs when every task has ended, and names the chunks to resubmit if one failed
    assert "--dependency=afterany:101" in calls[1] and calls[1].endswith("scripts/slurm/merge_score.sbatch")
    run = answers / "tiny-llava" / "synthetic_square" / "llava-all" / "off"
    assert (run / "2_0.jsonl").exists() and (run / "2_1.jsonl").exists() and (run / "score.json").exists()
    assert _comparable(_rows(run / "merge.jsonl")) == _comparable(
        _rows(one_shot / "synthetic_square" / "llava-all" / "off" / "merge.jsonl"))
