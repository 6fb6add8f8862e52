"""PyramidDrop through the eval driver: ``python -m eval.run --method pdrop`` (a subprocess in this environment)
loads a tiny random LLaVA-1.5 through PDrop's own ``load_pretrained_model`` from the patched tree and answers the
synthetic benchmark (eval/synthetic.py, wide images, plus two text-only questions) in modes off and full.

- every question is answered in both modes; metadata carries method, mode, budget, trend;
- the adapter enabled the paper's schedule: keep counts 184 / 92 / 46 (layers 2, 10, 20; ratios 0.32, 0.16, 0.08
  after the 1.0 the eval modules prepend), ranked over the 576 visual tokens, then the kept ones;
- in full mode the ranking really was debiased: padding (threshold 0.01) is −inf at stage 0 for each image's
  real size, and the keep count is capped to the real tokens where it exceeds them (640×200);
- text-only questions are answered without reaching the ranking site.
Observation is probe-only: a ``sitecustomize`` on PYTHONPATH wraps ``debias_core.sample/debias/keep_cap`` and
records what they saw; the adapter and the patches run unchanged. The patched tree sits in a temp superproject
(a copy of eval/ next to third_party/PyramidDrop) so the adapter finds it exactly as it finds the submodule.

Environment: .venv-PyramidDrop (transformers 4.37, accelerate for load_pretrained_model).
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

NAME, KEY = "PyramidDrop", "pdrop"
LAYERS = 24                     # the paper's layer_list [2, 10, 20] needs 21+
TREND = "paper:pdrop/gqa"
THRESHOLD = 0.01                # DEBIAS_METHOD=pdrop
BUDGET = "2-10-20_0.32-0.16-0.08"
KEEP = [184, 92, 46]            # int(576 × ratio)
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
import json, sys
from pathlib import Path
from eval.tiny_llava import build_tiny_llava
out = build_tiny_llava(sys.argv[1], layers=int(sys.argv[2]))
cfg = json.loads((out / "config.json").read_text())
cfg.pop("_attn_implementation", None)   # as llava-v1.5-7b's config.json: transformers 4.37 then picks sdpa
(out / "config.json").write_text(json.dumps(cfg, indent=2))
print(out)
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


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    support.require_populated(NAME)
    support.require_transformers("4.37", NAME)
    support.require_module("accelerate", "PyramidDrop's load_pretrained_model passes low_cpu_mem_usage/device_map, "
                                         "which need accelerate; the eval adapter was not run", NAME)
    support.require_module("sentencepiece", "the tiny LLaVA's tokenizer is a sentencepiece model", NAME)
    from eval.synthetic import build_synthetic

    root = tmp_path_factory.mktemp("pdrop-eval")
    repo = root / "repo"  # the layout the adapter expects: eval/ next to third_party/<Name>
    shutil.copytree(support.ROOT / "eval", repo / "eval", ignore=shutil.ignore_patterns("__pycache__"))
    tree = support.patched_tree(NAME, repo / "third_party" / NAME)
    (tree / ".git").mkdir()  # eval.common.populated() looks for it
    r = subprocess.run([sys.executable, "-c", BUILD, str(root / "tiny-llava-pdrop"), str(LAYERS)], capture_output=True,
                       text=True, env=clean_env([tree, support.ROOT]), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    model = Path(r.stdout.strip().splitlines()[-1])

    data = root / "data"
    build_synthetic(data, images=3)  # wide: 640×480, 400×200, 640×200
    questions = data / "synthetic" / "wide" / "llava_synthetic.jsonl"
    with open(questions, "a") as f:
        f.writelines(json.dumps(q) + "\n" for q in TEXT_ONLY)
    probe = root / "probe"
    probe.mkdir()
    (probe / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return {"root": root, "repo": repo, "tree": tree, "model": model, "data": data, "probe": probe,
            "questions": [json.loads(line) for line in questions.read_text().splitlines()]}


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
    r, run_dir, probe = run_driver(setup, "answers", "--mode", "off,full", "--trend", TREND)
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
    assert Path(probe["modules"]["llava"]).is_relative_to(setup["tree"]), probe["modules"]


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


def test_paper_schedule_and_debiasing_reach_the_ranking(setup, run):
    from PIL import Image

    _, probe = run
    samples = per_sample(probe["events"])
    questions = setup["questions"] * 2  # off, then full
    assert len(samples) == len(questions)
    images = setup["data"] / "synthetic" / "wide" / "images"
    for (ctx, calls), q in zip(samples, questions):
        if "image" not in q:  # text-only: no image, no ranking
            assert ctx["image_size"] is None and ctx["span_start"] is None and calls == [], (q, calls)
            continue
        size = Image.open(images / q["image"]).size
        assert tuple(ctx["image_size"]) == size and ctx["preprocess"] == "pad" and ctx["span_start"] is not None
        ranks = [c for c in calls if c["event"] == "debias"]
        caps = [c for c in calls if c["event"] == "keep_cap"]
        assert [c["stage"] for c in ranks] == [0, 1, 2] and [c["k"] for c in caps] == KEEP, calls
        assert ranks[0]["n"] == 576
        assert [c["n"] for c in ranks[1:]] == [caps[0]["capped"], caps[1]["capped"]]  # each stage ranks the kept
        valid = valid_count(size, THRESHOLD)
        if ctx["mode"] == "off":
            assert all(c["untouched"] and c["neg_inf"] == 0 for c in ranks)
            assert all(c["capped"] == c["k"] for c in caps)
        else:
            assert ctx["mode"] == "full" and not any(c["untouched"] for c in ranks)
            assert ranks[0]["neg_inf"] == 576 - valid > 0, (size, ranks[0])
            assert [c["capped"] for c in caps] == [min(k, valid) for k in KEEP], (size, caps)
    full_caps = [c for ctx, calls in samples if ctx["mode"] == "full" for c in calls if c["event"] == "keep_cap"]
    assert any(c["capped"] < c["k"] for c in full_caps), "no image made the cap bite (the test would be vacuous)"


def test_checkpoint_asking_for_eager_attention_is_refused(setup, tmp_path):
    model = tmp_path / "tiny-llava-eager"
    shutil.copytree(setup["model"], model)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "_attn_implementation": "eager"}))
    r, _, _ = run_driver({**setup, "model": model, "root": tmp_path}, "eager", "--mode", "off")
    assert r.returncode == 2 and "_attn_implementation='eager'" in r.stderr and "pdrop_rank_drop" in r.stderr, \
        r.stderr[-3000:]
