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
Observation is probe-only (eval_support.OBSERVER wraps ``debias_core.sample/debias/keep_cap``); the patched
tree reaches the adapter through EVAL_THIRD_PARTY.

Environment: the main test env .venv-test (transformers 4.37.2, accelerate; its installed llava-torch is
shadowed by the tree, which the test checks).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests import support
from tests.baselines import eval_support as es

pytestmark = pytest.mark.baseline

NAME, KEY = "LLaVA", "illava"
TREND = "paper:fastv"           # the adapter's default trend for full mode
THRESHOLD = 0.5                 # the paper's threshold for every method but PDrop
BUDGET = "448"
KEPT = 128                      # 576 − r


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
    root = tmp_path_factory.mktemp("illava-eval")
    trees = es.export_trees(root / "trees", NAME)
    model = es.build_tiny_llava(root / "tiny-llava-illava", es.clean_env([trees / NAME]), "--layers", "3")  # k = 2
    return {"root": root, "trees": trees, "tree": trees / NAME, "model": model,
            "probe": es.observer_dir(root / "probe"),
            **es.synthetic_data(root / "data", images=3, extra=[es.NARROW_QUESTION, *es.TEXT_ONLY])}


def run_driver(setup, name: str, *args):
    r, answers, probe = es.run_observed(setup, name, KEY, *args)
    return r, answers / f"{KEY}-{BUDGET}", probe


@pytest.fixture(scope="module")
def run(setup):
    r, run_dir, probe = run_driver(setup, "answers", "--mode", "off,full")
    assert r.returncode == 0, r.stderr[-6000:]
    return run_dir, probe


def test_driver_ran_the_patched_tree(setup, run):
    _, probe = run
    assert Path(probe["modules"]["eval"]).is_relative_to(support.ROOT / "eval")
    assert Path(probe["modules"]["llava"]).is_relative_to(setup["tree"]), probe["modules"]  # not llava-torch


@pytest.mark.parametrize("mode", ["off", "full"])
def test_every_question_answered_with_metadata(setup, run, mode):
    run_dir, _ = run
    es.assert_answers(run_dir / es.mode_folder(mode, TREND), [q["question_id"] for q in setup["questions"]],
                      setup["model"].name, KEY, mode, BUDGET, TREND)


def test_port_settings_and_debiasing_reach_the_ranking(setup, run):
    _, probe = run
    images = setup["data"] / "synthetic" / "wide" / "images"
    for ctx, calls, size in es.image_samples(probe, setup["questions"], images):
        assert [c["event"] for c in calls] == ["debias", "keep_cap"], calls  # one ranking, before layer k = 2
        rank, cap = calls
        assert rank["stage"] == 0 and rank["n"] == 576 and cap["k"] == KEPT
        valid = len(support.valid_positions(size, THRESHOLD))
        if ctx["mode"] == "off":
            assert rank["untouched"] and rank["neg_inf"] == 0 and cap["capped"] == KEPT
        else:
            assert ctx["mode"] == "full" and not rank["untouched"]
            assert rank["neg_inf"] == 576 - valid > 0 and cap["capped"] == min(KEPT, valid), (size, calls)
    assert len(support.valid_positions(es.NARROW, THRESHOLD)) < KEPT  # the extreme image makes the cap bite


def test_llava_without_the_port_is_refused(setup, tmp_path):
    trees = es.export_trees(tmp_path / "trees", NAME, patched=False)
    r, _, _ = run_driver({**setup, "trees": trees, "root": tmp_path}, "pristine", "--mode", "off", "--check-only")
    assert r.returncode == 2 and "lacks the iLLaVA port" in r.stderr and "apply_patches.sh LLaVA" in r.stderr, \
        r.stderr[-3000:]
