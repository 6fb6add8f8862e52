"""PyramidDrop through the eval driver: ``python -m eval.run --method pdrop`` (a subprocess in this environment)
loads a tiny random LLaVA-1.5 through PDrop's own ``load_pretrained_model`` from the patched tree and answers the
synthetic benchmark (eval/synthetic.py, wide images, plus two text-only questions) in modes off and full.

- every question is answered in both modes; metadata carries method, mode, budget, trend;
- the adapter enabled the paper's schedule: keep counts 184 / 92 / 46 (layers 2, 10, 20; ratios 0.32, 0.16, 0.08
  after the 1.0 the eval modules prepend), ranked over the 576 visual tokens, then the kept ones;
- in full mode the ranking really was debiased: padding (threshold 0.01) is −inf at stage 0 for each image's
  real size, and the keep count is capped to the real tokens where it exceeds them (640×200);
- text-only questions are answered without reaching the ranking site.
Observation is probe-only (eval_support.OBSERVER wraps ``debias_core.sample/debias/keep_cap``); the adapter and
the patches run unchanged, the patched tree reaching the adapter through EVAL_THIRD_PARTY (eval_support).

Environment: .venv-PyramidDrop (transformers 4.37, accelerate for load_pretrained_model).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests import support
from tests.baselines import eval_support as es

pytestmark = pytest.mark.baseline

NAME, KEY = "PyramidDrop", "pdrop"
LAYERS = 24                     # the paper's layer_list [2, 10, 20] needs 21+
TREND = "paper:pdrop/gqa"
THRESHOLD = 0.01                # DEBIAS_METHOD=pdrop
BUDGET = "2-10-20_0.32-0.16-0.08"
KEEP = [184, 92, 46]            # int(576 × ratio)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    support.require_populated(NAME)
    support.require_transformers("4.37", NAME)
    support.require_module("accelerate", "PyramidDrop's load_pretrained_model passes low_cpu_mem_usage/device_map, "
                                         "which need accelerate; the eval adapter was not run", NAME)
    support.require_module("sentencepiece", "the tiny LLaVA's tokenizer is a sentencepiece model", NAME)
    root = tmp_path_factory.mktemp("pdrop-eval")
    trees = es.export_trees(root / "trees", NAME)
    # --attn default: no _attn_implementation, as llava-v1.5-7b's config.json (transformers 4.37 then picks sdpa)
    model = es.build_tiny_llava(root / "tiny-llava-pdrop", es.clean_env([trees / NAME]), "--layers", str(LAYERS),
                                "--attn", "default")
    return {"root": root, "trees": trees, "tree": trees / NAME, "model": model,
            "probe": es.observer_dir(root / "probe"),
            **es.synthetic_data(root / "data", images=3, extra=es.TEXT_ONLY)}


def run_driver(setup, name: str, *args):
    r, answers, probe = es.run_observed(setup, name, KEY, *args)
    return r, answers / f"{KEY}-{BUDGET}", probe


@pytest.fixture(scope="module")
def run(setup):
    r, run_dir, probe = run_driver(setup, "answers", "--mode", "off,full", "--trend", TREND)
    assert r.returncode == 0, r.stderr[-6000:]
    return run_dir, probe


def test_driver_ran_the_patched_tree(setup, run):
    _, probe = run
    assert Path(probe["modules"]["eval"]).is_relative_to(support.ROOT / "eval")
    assert Path(probe["modules"]["llava"]).is_relative_to(setup["tree"]), probe["modules"]


@pytest.mark.parametrize("mode", ["off", "full"])
def test_every_question_answered_with_metadata(setup, run, mode):
    run_dir, _ = run
    es.assert_answers(run_dir / es.mode_folder(mode, TREND), [q["question_id"] for q in setup["questions"]],
                      setup["model"].name, KEY, mode, BUDGET, TREND)


def test_paper_schedule_and_debiasing_reach_the_ranking(setup, run):
    _, probe = run
    samples = es.image_samples(probe, setup["questions"], setup["data"] / "synthetic" / "wide" / "images")
    for ctx, calls, size in samples:
        ranks = [c for c in calls if c["event"] == "debias"]
        caps = [c for c in calls if c["event"] == "keep_cap"]
        assert [c["stage"] for c in ranks] == [0, 1, 2] and [c["k"] for c in caps] == KEEP, calls
        assert ranks[0]["n"] == 576
        assert [c["n"] for c in ranks[1:]] == [caps[0]["capped"], caps[1]["capped"]]  # each stage ranks the kept
        valid = len(support.valid_positions(size, THRESHOLD))
        if ctx["mode"] == "off":
            assert all(c["untouched"] and c["neg_inf"] == 0 for c in ranks)
            assert all(c["capped"] == c["k"] for c in caps)
        else:
            assert ctx["mode"] == "full" and not any(c["untouched"] for c in ranks)
            assert ranks[0]["neg_inf"] == 576 - valid > 0, (size, ranks[0])
            assert [c["capped"] for c in caps] == [min(k, valid) for k in KEEP], (size, caps)
    full_caps = [c for ctx, calls, _ in samples if ctx["mode"] == "full" for c in calls if c["event"] == "keep_cap"]
    assert any(c["capped"] < c["k"] for c in full_caps), "no image made the cap bite (the test would be vacuous)"


def test_checkpoint_asking_for_eager_attention_is_refused(setup, tmp_path):
    model = tmp_path / "tiny-llava-eager"
    shutil.copytree(setup["model"], model)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "_attn_implementation": "eager"}))
    r, _, _ = run_driver({**setup, "model": model, "root": tmp_path}, "eager", "--mode", "off")
    assert r.returncode == 2 and "_attn_implementation='eager'" in r.stderr and "pdrop_rank_drop" in r.stderr, \
        r.stderr[-3000:]
