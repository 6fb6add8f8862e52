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
Observation is probe-only (eval_support.OBSERVER wraps ``debias_core.sample/debias/keep_cap``). The patched
TokenCarve tree reaches the adapter through EVAL_THIRD_PARTY; a patched upstream LLaVA tree exported next to it is
on PYTHONPATH (``llava``, as envs/TokenCarve.txt installs it from third_party/LLaVA).

Environment: .venv-TokenCarve (transformers 4.37; accelerate for load_pretrained_model).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests import support
from tests.baselines import eval_support as es

pytestmark = pytest.mark.baseline

NAME, KEY = "TokenCarve", "tokencarve"
TREND = "paper:tokencarve/gqa"
THRESHOLD = 0.5                 # DEBIAS_METHOD=tokencarve
BUDGET = "64"
RANKED = 96                     # int(64 / 2 * 3)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    support.require_populated(NAME)
    support.require_populated("LLaVA")
    support.require_transformers("4.37", NAME)
    support.require_module("accelerate", "upstream LLaVA's load_pretrained_model passes low_cpu_mem_usage/device_map, "
                                         "which need accelerate; the eval adapter was not run", NAME)
    support.require_module("sentencepiece", "the tiny LLaVA's tokenizer is a sentencepiece model", NAME)
    root = tmp_path_factory.mktemp("tokencarve-eval")
    trees = es.export_trees(root / "trees", NAME, "LLaVA")
    llava = trees / "LLaVA"         # `llava`, on PYTHONPATH as if installed
    # TokenCarve: work layer 2, SVD hidden >= 576 (4 heads)
    model = es.build_tiny_llava(root / "tiny-llava-tokencarve", es.clean_env([llava]), "--layers", "4",
                                "--hidden", "640")
    from eval.tiny_llava import image_start
    return {"root": root, "trees": trees, "tree": trees / NAME, "llava": llava, "model": model,
            "s0": image_start(model), "probe": es.observer_dir(root / "probe"),
            **es.synthetic_data(root / "data", images=3, extra=[es.NARROW_QUESTION, *es.TEXT_ONLY])}


def run_driver(setup, name: str, *args):
    r, answers, probe = es.run_observed(setup, name, KEY, *args, path=[setup["llava"]])
    return r, answers / f"{KEY}-{BUDGET}", probe


@pytest.fixture(scope="module")
def run(setup):
    assert setup["s0"] != 35, "the tiny prompt puts the image at 35: the sys-length check below would be vacuous"
    r, run_dir, probe = run_driver(setup, "answers", "--mode", "off,full", "--trend", TREND,
                                   "--method-arg", f"token_carve_sys_length={setup['s0']}")
    assert r.returncode == 0, r.stderr[-6000:]
    return run_dir, probe


def test_driver_ran_tokencarves_llama_from_the_patched_tree(setup, run):
    import transformers

    _, probe = run
    files = probe["modules"]
    assert Path(files["eval"]).is_relative_to(support.ROOT / "eval")
    assert Path(files["llava"]).is_relative_to(setup["llava"]), files
    assert Path(files["transformers.models.llama.modeling_llama"]) == setup["tree"] / "TokenCarve" / "modeling_llama.py"
    installed = Path(transformers.__file__).parent / "models" / "llama"
    assert "token_carve" not in (installed / "modeling_llama.py").read_text()
    assert "token_carve" not in (installed / "configuration_llama.py").read_text()


@pytest.mark.parametrize("mode", ["off", "full"])
def test_every_question_answered_with_metadata(setup, run, mode):
    run_dir, _ = run
    es.assert_answers(run_dir / es.mode_folder(mode, TREND), [q["question_id"] for q in setup["questions"]],
                      setup["model"].name, KEY, mode, BUDGET, TREND)


def test_paper_settings_and_debiasing_reach_the_ranking(setup, run):
    _, probe = run
    images = setup["data"] / "synthetic" / "wide" / "images"
    for ctx, calls, size in es.image_samples(probe, setup["questions"], images, span_start=setup["s0"]):
        assert [c["event"] for c in calls] == ["debias", "keep_cap"], calls  # one ranking, at the work layer
        rank, cap = calls
        assert rank["stage"] == 0 and rank["n"] == 576 and cap["k"] == RANKED
        valid = len(support.valid_positions(size, THRESHOLD))
        if ctx["mode"] == "off":
            assert rank["untouched"] and rank["neg_inf"] == 0 and cap["capped"] == RANKED
        else:
            assert ctx["mode"] == "full" and not rank["untouched"]
            assert rank["neg_inf"] == 576 - valid > 0 and cap["capped"] == min(RANKED, valid), (size, calls)
    assert len(support.valid_positions(es.NARROW, THRESHOLD)) < RANKED  # the extreme image makes the cap bite


def test_image_start_differing_from_sys_length_is_refused(setup, tmp_path):
    r, _, _ = run_driver({**setup, "root": tmp_path}, "sys35", "--mode", "off", "--limit", "1")
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"image starts at index {setup['s0']}" in r.stderr and "token_carve_sys_length=35" in r.stderr, \
        r.stderr[-3000:]
