"""iLLaVA's LLM stage on LLaVA-1.5 (the port in patches/LLaVA) through the eval driver:
``python -m eval.run --method illava`` (a subprocess in this environment) loads a tiny random LLaVA-1.5
(eval/tiny_llava.py, 3 layers) through LLaVA's own ``load_pretrained_model`` from the patched third_party/LLaVA
tree and answers the synthetic benchmark (eval/synthetic.py, wide images, one extra 1000×101 image, two
text-only questions) in modes off and full.

- every question is answered in both modes; metadata carries method, mode, budget, trend (full mode defaults
  to the FastV trend, the port's score being FastV's K = 2 score);
- the adapter enabled the port with k = 2, r = 448: layer 1's attention over the 576 visual tokens of the real
  span is ranked and 128 are kept, debiased in full mode (padding −inf at threshold 0.5 for each image's real
  size, the kept count capped to the real tokens on 1000×101);
- text-only questions are answered without merging;
- a LLaVA tree without the port stops the run with an error naming scripts/apply_patches.sh.
Observation is probe-only: a ``sitecustomize`` on PYTHONPATH wraps ``debias_core.sample/debias/keep_cap``. The
patched tree sits in a temp superproject (a copy of eval/ next to third_party/LLaVA), where the adapter finds it
exactly as it finds the submodule.

Environment: the main test env .venv-test (transformers 4.37.2, accelerate; its installed llava-torch is
shadowed by the tree, which the test checks).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests import support

pytestmark = pytest.mark.baseline

NAME, KEY = "LLaVA", "illava"
TREND = "paper:fastv"           # the adapter's default trend for full mode
THRESHOLD = 0.5                 # the paper's threshold for every method but PDrop
BUDGET = "448"
KEPT = 128                      # 576 − r
EXTREME = {"question_id": 800, "image": "extreme_1000x101.png", "text": "Is there a red circle in the image?"}
TEXT_ONLY = [{"question_id": 900, "text": "What shape is it?\nAnswer the question using a single word or phrase."},
             {"question_id": 901, "text": "Is there a red circle?"}]

# Probe-only observation, imported by the driver's interpreter at start-up when EVAL_PROBE_OUT is set.
SITECUSTOMIZE = r'''
import atexit, contextlib, json, os, sys
if os.environ.get("EVAL_PROBE_OUT"):
    import debias_core, torch
    _events = []
    _sample, _debias, _cap = debias_core.sample, debias_core.debias, debias_core.keep_cap

    @contextlib.contextmanager
    def sample(*args, **kwargs):
        with _sample(*args, **kwargs) as ctx:
            _events.append({"event": "sample", "image_size": ctx.image_size, "preprocess": ctx.preprocess,
                            "span_start": ctx.span_start, "mode": debias_core.settings().mode})
            yield ctx

    def debias(scores, positions=None, *, stage=0):
        out = _debias(scores, positions, stage=stage)
        _events.append({"event": "debias", "stage": stage, "n": int(scores.shape[-1]),
                        "neg_inf": int(torch.isneginf(out).sum()), "untouched": out is scores})
        return out

    def keep_cap(k, **kwargs):
        out = _cap(k, **kwargs)
        _events.append({"event": "keep_cap", "k": int(k), "capped": int(out)})
        return out

    debias_core.sample, debias_core.debias, debias_core.keep_cap = sample, debias, keep_cap

    @atexit.register
    def _dump():
        files = {m: getattr(sys.modules.get(m), "__file__", None) for m in ("eval", "llava")}
        with open(os.environ["EVAL_PROBE_OUT"], "w") as f:
            json.dump({"events": _events, "modules": files}, f)
'''

BUILD = r'''
import sys
from eval.tiny_llava import build_tiny_llava
print(build_tiny_llava(sys.argv[1], layers=3))   # k = 2 needs layers 0..2
'''


def valid_count(size, threshold, grid=24, resolution=336) -> int:
    """Visual tokens whose expand2square pad fraction is ≤ threshold (written out here, independently)."""
    w, h = size
    s, m = max(w, h), min(w, h)
    lo = (s - m) // 2 * resolution / s
    hi = lo + m * resolution / s
    side = resolution / grid
    cover = [max(0.0, min(side * (k + 1), hi) - max(side * k, lo)) / side for k in range(grid)]
    return grid * sum(1 for c in cover if 1 - c <= threshold + 1e-12)


def clean_env(path: list, **extra) -> dict:
    """This environment without DEBIAS* settings, offline, one thread; PYTHONPATH: ``path``, then what it was, then
    the repository (debias_core, where the environment does not install it; eval/ comes from ``path``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEBIAS")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONWARNINGS="ignore", **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(p) for p in path] + [p for p in [os.environ.get("PYTHONPATH")] if p]
                                        + [str(support.ROOT)])
    return env


def superproject(root: Path, *, patched: bool) -> Path:
    """A copy of eval/ next to third_party/LLaVA (an export, patched or not; `.git` for eval.common.populated())."""
    repo = root / "repo"
    shutil.copytree(support.ROOT / "eval", repo / "eval", ignore=shutil.ignore_patterns("__pycache__"))
    export = support.patched_tree if patched else support.pristine_tree
    (export(NAME, repo / "third_party" / NAME) / ".git").mkdir()
    return repo


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    support.require_populated(NAME)
    version = support.require_module("transformers", "LLaVA's loader needs transformers").__version__
    if not version.startswith("4.37."):
        pytest.skip(f"the iLLaVA port runs on LLaVA 1.2.2 (transformers 4.37) but this environment has transformers "
                    f"{version}; it runs in the main test environment (.venv-test: bash setup.sh --test)")
    support.require_module("accelerate", "LLaVA's load_pretrained_model passes low_cpu_mem_usage/device_map, "
                                         "which need accelerate; the eval adapter was not run")
    support.require_module("sentencepiece", "the tiny LLaVA's tokenizer is a sentencepiece model")
    from PIL import Image
    from eval.synthetic import build_synthetic

    root = tmp_path_factory.mktemp("illava-eval")
    repo = superproject(root, patched=True)
    tree = repo / "third_party" / NAME
    r = subprocess.run([sys.executable, "-c", BUILD, str(root / "tiny-llava-illava")], capture_output=True,
                       text=True, env=clean_env([tree, support.ROOT]), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    model = Path(r.stdout.strip().splitlines()[-1])

    data = root / "data"
    build_synthetic(data, images=3)  # wide: 640×480, 400×200, 640×200
    wide = data / "synthetic" / "wide"
    Image.new("RGB", (1000, 101), (200, 60, 60)).save(wide / "images" / EXTREME["image"])
    with open(wide / "llava_synthetic.jsonl", "a") as f:
        f.writelines(json.dumps(q) + "\n" for q in [EXTREME, *TEXT_ONLY])
    probe = root / "probe"
    probe.mkdir()
    (probe / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return {"root": root, "repo": repo, "tree": tree, "model": model, "data": data, "probe": probe,
            "questions": [json.loads(line) for line in (wide / "llava_synthetic.jsonl").read_text().splitlines()]}


def run_driver(setup, name: str, *args):
    answers, out = setup["root"] / name, setup["root"] / f"{name}.json"
    env = clean_env([setup["probe"], setup["repo"]], EVAL_PROBE_OUT=str(out))
    cmd = [sys.executable, "-m", "eval.run", "--method", KEY, "--benchmark", "synthetic_wide", "--model-path",
           str(setup["model"]), "--data-dir", str(setup["data"]), "--answers-dir", str(answers),
           "--max-new-tokens", "4", "--device", "cpu", *args]
    r = subprocess.run(cmd, cwd=setup["repo"], env=env, capture_output=True, text=True, timeout=900)
    probe = json.loads(out.read_text()) if out.exists() else None
    return r, answers / setup["model"].name / "synthetic_wide" / f"{KEY}-{BUDGET}", probe


@pytest.fixture(scope="module")
def run(setup):
    r, run_dir, probe = run_driver(setup, "answers", "--mode", "off,full")
    assert r.returncode == 0, r.stderr[-6000:]
    return run_dir, probe


def per_sample(events):
    """Split the event stream at each ``sample`` event: [(sample, [debias/keep_cap events])]."""
    out = []
    for e in events:
        if e["event"] == "sample":
            out.append((e, []))
        else:
            assert out, f"{e} happened outside any debias_core.sample context"
            out[-1][1].append(e)
    return out


def test_driver_ran_the_patched_tree(setup, run):
    _, probe = run
    assert Path(probe["modules"]["eval"]).is_relative_to(setup["repo"] / "eval")
    assert Path(probe["modules"]["llava"]).is_relative_to(setup["tree"]), probe["modules"]  # not llava-torch


@pytest.mark.parametrize("mode", ["off", "full"])
def test_every_question_answered_with_metadata(setup, run, mode):
    run_dir, _ = run
    folder = run_dir / ("off" if mode == "off" else "full-" + TREND.replace(":", "-").replace("/", "-"))
    rows = [json.loads(line) for line in (folder / "merge.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in rows] == [q["question_id"] for q in setup["questions"]]
    for r in rows:
        assert r["metadata"] == {"method": KEY, "mode": mode, "budget": BUDGET,
                                 "trend": None if mode == "off" else TREND, "preprocess": "pad"}
        assert isinstance(r["text"], str) and r["model_id"] == setup["model"].name


def test_port_settings_and_debiasing_reach_the_ranking(setup, run):
    from PIL import Image

    _, probe = run
    samples = per_sample(probe["events"])
    questions = setup["questions"] * 2  # off, then full
    assert len(samples) == len(questions)
    images = setup["data"] / "synthetic" / "wide" / "images"
    for (ctx, calls), q in zip(samples, questions):
        if "image" not in q:  # text-only: no span, nothing merged
            assert ctx["image_size"] is None and ctx["span_start"] is None and calls == [], (q, calls)
            continue
        size = Image.open(images / q["image"]).size
        assert tuple(ctx["image_size"]) == size and ctx["preprocess"] == "pad" and ctx["span_start"] is not None
        assert [c["event"] for c in calls] == ["debias", "keep_cap"], calls  # one ranking, before layer k = 2
        rank, cap = calls
        assert rank["stage"] == 0 and rank["n"] == 576 and cap["k"] == KEPT
        valid = valid_count(size, THRESHOLD)
        if ctx["mode"] == "off":
            assert rank["untouched"] and rank["neg_inf"] == 0 and cap["capped"] == KEPT
        else:
            assert ctx["mode"] == "full" and not rank["untouched"]
            assert rank["neg_inf"] == 576 - valid > 0 and cap["capped"] == min(KEPT, valid), (size, calls)
    assert valid_count((1000, 101), THRESHOLD) < KEPT  # the extreme image makes the cap bite


def test_llava_without_the_port_is_refused(setup, tmp_path):
    repo = superproject(tmp_path, patched=False)
    r, _, _ = run_driver({**setup, "repo": repo, "root": tmp_path}, "pristine", "--mode", "off", "--check-only")
    assert r.returncode == 2 and "lacks the iLLaVA port" in r.stderr and "apply_patches.sh LLaVA" in r.stderr, \
        r.stderr[-3000:]
