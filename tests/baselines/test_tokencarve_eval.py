"""TokenCarve through the eval driver: ``python -m eval.run --method tokencarve`` (a subprocess in this
environment) loads TokenCarve's own Llama files from the patched tree (importlib, never TokenCarve/config.py),
then a tiny random LLaVA-1.5 (hidden 640: TokenCarve's SVD needs hidden >= 576) through upstream LLaVA's
``load_pretrained_model``, and answers the synthetic benchmark (eval/synthetic.py, wide images, one extra
1000×101 image, two short text-only questions) in modes off and full.

- every question is answered in both modes; metadata carries method, mode, budget, trend;
- the adapter enabled TokenCarve as its loader does: the 576-token window at the image start, R = 96 ranked for
  64 tokens (token_carve_image_token_nums), debiased in full mode (padding −inf at threshold 0.5 for each image's
  real size, R capped to the real tokens on 1000×101);
- text-only questions are answered (TokenCarve's own forward cannot run prompts under 150 positions);
- an image start that differs from token_carve_sys_length stops the run with an error naming both (the tiny
  tokenizer puts the image elsewhere than LLaVA-1.5's index 35: the runs pass its real start, and 35 must fail);
- site-packages transformers is left untouched.
Observation is probe-only: a ``sitecustomize`` on PYTHONPATH wraps ``debias_core.sample/debias/keep_cap``. The
patched TokenCarve tree and a patched upstream LLaVA tree (``llava``, as envs/TokenCarve.txt installs it from
third_party/LLaVA) sit in a temp superproject next to a copy of eval/.

Environment: .venv-TokenCarve (transformers 4.37; accelerate for load_pretrained_model).
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

NAME, KEY = "TokenCarve", "tokencarve"
TREND = "paper:tokencarve/gqa"
THRESHOLD = 0.5                 # DEBIAS_METHOD=tokencarve
BUDGET = "64"
RANKED = 96                     # int(64 / 2 * 3)
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
        files = {m: getattr(sys.modules.get(m), "__file__", None)
                 for m in ("eval", "llava", "transformers.models.llama.modeling_llama")}
        with open(os.environ["EVAL_PROBE_OUT"], "w") as f:
            json.dump({"events": _events, "modules": files}, f)
'''

BUILD = r'''
import json, sys
from eval.tiny_llava import build_tiny_llava
out = build_tiny_llava(sys.argv[1], layers=4, hidden=640, heads=4)   # TokenCarve: work layer 2, SVD hidden >= 576
from transformers import AutoTokenizer
from llava.conversation import conv_templates
from llava.mm_utils import tokenizer_image_token
conv = conv_templates["vicuna_v1"].copy()
conv.append_message(conv.roles[0], "<image>\nWhat is it?")
conv.append_message(conv.roles[1], None)
ids = tokenizer_image_token(conv.get_prompt(), AutoTokenizer.from_pretrained(out, use_fast=False), -200)
print(json.dumps({"model": str(out), "s0": ids.index(-200)}))
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
    support.require_populated("LLaVA")
    support.require_transformers("4.37", NAME)
    support.require_module("accelerate", "upstream LLaVA's load_pretrained_model passes low_cpu_mem_usage/device_map, "
                                         "which need accelerate; the eval adapter was not run", NAME)
    support.require_module("sentencepiece", "the tiny LLaVA's tokenizer is a sentencepiece model", NAME)
    from PIL import Image
    from eval.synthetic import build_synthetic

    root = tmp_path_factory.mktemp("tokencarve-eval")
    repo = root / "repo"  # the layout the adapter expects: eval/ next to third_party/<Name>
    shutil.copytree(support.ROOT / "eval", repo / "eval", ignore=shutil.ignore_patterns("__pycache__"))
    tree = support.patched_tree(NAME, repo / "third_party" / NAME)
    (tree / ".git").mkdir()  # eval.common.populated() looks for it
    llava = support.patched_tree("LLaVA", repo / "third_party" / "LLaVA")  # `llava`, on PYTHONPATH as if installed
    r = subprocess.run([sys.executable, "-c", BUILD, str(root / "tiny-llava-tokencarve")], capture_output=True,
                       text=True, env=clean_env([llava, support.ROOT]), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    built = json.loads(r.stdout.strip().splitlines()[-1])

    data = root / "data"
    build_synthetic(data, images=3)  # wide: 640×480, 400×200, 640×200
    wide = data / "synthetic" / "wide"
    Image.new("RGB", (1000, 101), (200, 60, 60)).save(wide / "images" / EXTREME["image"])
    with open(wide / "llava_synthetic.jsonl", "a") as f:
        f.writelines(json.dumps(q) + "\n" for q in [EXTREME, *TEXT_ONLY])
    probe = root / "probe"
    probe.mkdir()
    (probe / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return {"root": root, "repo": repo, "tree": tree, "llava": llava, "model": Path(built["model"]),
            "s0": built["s0"], "data": data, "probe": probe,
            "questions": [json.loads(line) for line in (wide / "llava_synthetic.jsonl").read_text().splitlines()]}


def run_driver(setup, name: str, *args):
    answers, out = setup["root"] / name, setup["root"] / f"{name}.json"
    env = clean_env([setup["probe"], setup["repo"], setup["llava"]], EVAL_PROBE_OUT=str(out))
    cmd = [sys.executable, "-m", "eval.run", "--method", KEY, "--benchmark", "synthetic_wide", "--model-path",
           str(setup["model"]), "--data-dir", str(setup["data"]), "--answers-dir", str(answers),
           "--max-new-tokens", "4", "--device", "cpu", *args]
    r = subprocess.run(cmd, cwd=setup["repo"], env=env, capture_output=True, text=True, timeout=900)
    probe = json.loads(out.read_text()) if out.exists() else None
    return r, answers / setup["model"].name / "synthetic_wide" / f"{KEY}-{BUDGET}", probe


@pytest.fixture(scope="module")
def run(setup):
    assert setup["s0"] != 35, "the tiny prompt puts the image at 35: the sys-length check below would be vacuous"
    r, run_dir, probe = run_driver(setup, "answers", "--mode", "off,full", "--trend", TREND,
                                   "--method-arg", f"token_carve_sys_length={setup['s0']}")
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


def test_driver_ran_tokencarves_llama_from_the_patched_tree(setup, run):
    import transformers

    _, probe = run
    files = probe["modules"]
    assert Path(files["eval"]).is_relative_to(setup["repo"] / "eval")
    assert Path(files["llava"]).is_relative_to(setup["llava"]), files
    assert Path(files["transformers.models.llama.modeling_llama"]) == setup["tree"] / "TokenCarve" / "modeling_llama.py"
    installed = Path(transformers.__file__).parent / "models" / "llama"
    assert "token_carve" not in (installed / "modeling_llama.py").read_text()
    assert "token_carve" not in (installed / "configuration_llama.py").read_text()


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


def test_paper_settings_and_debiasing_reach_the_ranking(setup, run):
    from PIL import Image

    _, probe = run
    samples = per_sample(probe["events"])
    questions = setup["questions"] * 2  # off, then full
    assert len(samples) == len(questions)
    images = setup["data"] / "synthetic" / "wide" / "images"
    for (ctx, calls), q in zip(samples, questions):
        if "image" not in q:  # text-only: no image, nothing carved
            assert ctx["image_size"] is None and ctx["span_start"] is None and calls == [], (q, calls)
            continue
        size = Image.open(images / q["image"]).size
        assert tuple(ctx["image_size"]) == size and ctx["preprocess"] == "pad" and ctx["span_start"] == setup["s0"]
        assert [c["event"] for c in calls] == ["debias", "keep_cap"], calls  # one ranking, at the work layer
        rank, cap = calls
        assert rank["stage"] == 0 and rank["n"] == 576 and cap["k"] == RANKED
        valid = valid_count(size, THRESHOLD)
        if ctx["mode"] == "off":
            assert rank["untouched"] and rank["neg_inf"] == 0 and cap["capped"] == RANKED
        else:
            assert ctx["mode"] == "full" and not rank["untouched"]
            assert rank["neg_inf"] == 576 - valid > 0 and cap["capped"] == min(RANKED, valid), (size, calls)
    assert valid_count((1000, 101), THRESHOLD) < RANKED  # the extreme image makes the cap bite


def test_image_start_differing_from_sys_length_is_refused(setup, tmp_path):
    r, _, _ = run_driver({**setup, "root": tmp_path}, "sys35", "--mode", "off", "--limit", "1")
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"image starts at index {setup['s0']}" in r.stderr and "token_carve_sys_length=35" in r.stderr, \
        r.stderr[-3000:]
