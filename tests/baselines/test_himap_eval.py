"""HiMAP through the eval driver: ``python -m eval.run --method himap`` in the HiMAP environment.

The patched tree (support.patched_tree: third_party/HiMAP at its pin + patches/HiMAP, a temp copy) reaches the
adapter through EVAL_THIRD_PARTY. The model is a tiny random LLaVA-1.5 (eval/tiny_llava.py) with 9 decoder layers,
so the paper's schedule runs unchanged (stage 1 before layer K_t = 2 keeps R_t = 115, stage 2 before layer
K_i = 8 keeps R_i = 90); it is built by HiMAP's own LLaVA 1.1.3 on transformers 4.31, the format HiMAP's
load_pretrained_model reads. Benchmarks: eval/synthetic.py, plus a 1000×101 image (48 non-padding tokens, fewer
than both budgets) and a text-only question added to synthetic_wide.

Observation is probe-only: this file, run as a script, wraps eval.run.main with forward pre-hooks on decoder
layers K_t and K_i (the position ids HiMAP hands them are the original indices of the tokens it kept) and
debias_core.recording() (what each ranking stage handed debias_core); the adapter and the driver are unchanged.

Runs in .venv-HiMAP (envs/cpu/HiMAP.txt); skips elsewhere, saying why.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests import support
from tests.baselines import eval_support as es

pytestmark = pytest.mark.baseline

NAME, METHOD = "HiMAP", "himap"
LAYERS, K_T, R_T, K_I, R_I, SPAN = 9, 2, 115, 8, 90, 576
BUDGET = f"{R_T}_{R_I}"
TREND = "paper:himap/pope"                # the synthetic benchmarks are POPE-format yes/no questions
BENCHES = ("synthetic_wide", "synthetic_tall", "synthetic_square")
NARROW = es.NARROW                        # 48 valid tokens at τ = 0.5
# added to synthetic_wide: text-only first, so the image question after it checks that the method comes back
TEXT_ONLY_QID = es.TEXT_ONLY[0]["question_id"]
EXTRA = [es.TEXT_ONLY[0], es.NARROW_QUESTION]
MODES = {"off": "off", "full": "full-paper-himap-pope"}


def _require_env():
    support.require_populated(NAME)
    support.require_transformers("4.31", NAME)
    support.require_module("debias_core", "the HiMAP patches import debias_core", env=NAME)
    for module in ("sentencepiece", "accelerate"):
        support.require_module(module, f"eval.run loads HiMAP through its load_pretrained_model (slow "
                                       f"LlamaTokenizer: sentencepiece; device_map: accelerate); the HiMAP eval "
                                       f"path was not run", env=NAME)


def _run(args: list[str], trees: Path):
    return es.run_python(args, es.clean_env(trees=trees), timeout=600)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    _require_env()
    return es.self_probe_setup(tmp_path_factory.mktemp("himap-eval"), NAME, METHOD, LAYERS, EXTRA)


def _driver_args(setup, answers: Path, *extra) -> list[str]:
    return ["--method", METHOD, "--benchmark", ",".join(BENCHES), "--mode", "off,full", "--trend", TREND,
            "--model-path", str(setup["model"]), "--data-dir", str(setup["data"]), "--answers-dir", str(answers),
            "--max-new-tokens", "2", "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def run(setup):
    """The driver in modes off and full under the probe; returns the answers folder and the observations."""
    args = _driver_args(setup, setup["tmp"] / "answers", "--method-arg", f"sys_length={setup['s0']}")
    return es.run_self_probe(__file__, setup, args)


def _image_forwards(run, mode):
    return [f for f in run["forwards"] if f["mode"] == mode and f["image_size"] is not None]


# --- answers --------------------------------------------------------------------------------------------

def test_answers_for_every_question_in_off_and_full(setup, run):
    wide = []
    for bench in BENCHES:
        aspect = bench.split("_")[1]
        qids = [q["question_id"] for q in es.rows(setup["data"] / "synthetic" / aspect / "llava_synthetic.jsonl")]
        for mode, folder in MODES.items():
            run_dir = run["answers"] / bench / f"{METHOD}-{BUDGET}" / folder
            rows = es.assert_answers(run_dir, qids, "tiny-llava", METHOD, mode, BUDGET, TREND)
            wide += [rows] if bench == "synthetic_wide" else []
            run_json = json.loads((run_dir / "run.json").read_text())
            assert (run_json["method_args"]["hmap_v_attn_txt_layer"], run_json["method_args"]["hmap_v_attn_img_layer"]) \
                == (K_T, K_I)
    assert len(wide) == len(MODES) and all(any(r["question_id"] == TEXT_ONLY_QID for r in rows) for rows in wide)


# --- the method really ran, with debias in full mode ----------------------------------------------------

def test_both_stages_run_and_each_calls_debias_core(run):
    ranked = [f for f in run["forwards"] if f["himap_on"]]
    assert ranked and all(f["image_size"] is not None for f in ranked)
    assert run["recorded"] == {"0": len(ranked), "1": len(ranked)}, "one debias_core call per stage and forward"
    for f in ranked:
        assert f["stage1"] == f["expected1"], "stage 1 did not keep top-k of its debiased scores"
        assert f["stage2"] == f["expected2"], "stage 2 did not keep top-k of its debiased scores"
        assert set(f["stage2"]) <= set(f["stage1"])


def test_off_keeps_the_paper_budgets_including_padding(run):
    forwards = _image_forwards(run, "off")
    assert forwards and all((len(f["stage1"]), len(f["stage2"])) == (R_T, R_I) for f in forwards)
    narrow = [f for f in forwards if tuple(f["image_size"]) == NARROW]
    assert narrow and all(set(f["stage1"]) & support.padding_positions(NARROW) for f in narrow), \
        "off kept no padding on the 1000×101 image, so the full-mode check below would be vacuous"


def test_full_keeps_no_padding_and_caps_both_stages(run):
    forwards = _image_forwards(run, "full")
    assert forwards and all(f["himap_on"] for f in forwards)
    for f in forwards:
        pad = support.padding_positions(f["image_size"])
        valid = SPAN - len(pad)
        assert not (set(f["stage1"]) | set(f["stage2"])) & pad, f"full kept padding on {f['image_size']}"
        assert (len(f["stage1"]), len(f["stage2"])) == (min(R_T, valid), min(R_I, valid))
    assert any(tuple(f["image_size"]) == NARROW and len(f["stage1"]) == len(f["stage2"]) == 48 for f in forwards)


def test_text_only_questions_run_with_himap_off_and_it_comes_back(run):
    # every image forward (the narrow question comes right after the text-only one) ran the method again
    es.assert_off_for_text_only(run["forwards"], "himap_on", SPAN)


# --- per eval module preprocessing ----------------------------------------------------------------------

def test_preprocessing_follows_llava_1_1_3s_eval_modules():
    es.assert_llava113_preprocessing(METHOD)


# --- clear errors ---------------------------------------------------------------------------------------

def test_wrong_sys_length_is_a_clear_error(setup):
    r = _run(["-m", "eval.run", *_driver_args(setup, setup["tmp"] / "bad-sys", "--limit", "1")], setup["trees"])
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"s0={setup['s0']}" in r.stderr and "sys_length=35" in r.stderr, r.stderr[-2000:]


def test_a_model_too_shallow_for_stage_2_is_a_clear_error(setup):
    args = _driver_args(setup, setup["tmp"] / "shallow", "--limit", "1", "--method-arg", f"sys_length={setup['s0']}",
                        "--method-arg", f"hmap_v_attn_img_layer={LAYERS}")
    r = _run(["-m", "eval.run", *args], setup["trees"])
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"hmap_v_attn_img_layer ({LAYERS}) < {LAYERS}" in r.stderr, r.stderr[-2000:]


# --- probe (this file run as a script, in the HiMAP environment) ------------------------------------------

def _probe(out_json: str, argv: list[str]) -> int:
    """eval.run.main(argv) with forward pre-hooks on decoder layers K_t (stage 1's survivors) and K_i (stage 2's),
    installed once the adapter has configured the model, and debias_core.recording() around the whole run."""
    import torch

    import debias_core
    from eval import run as driver
    from eval.methods.himap import HiMAPAdapter

    forwards = []
    configure = HiMAPAdapter.configure

    def observed_configure(self, loaded):
        configure(self, loaded)
        model, a = loaded.model, self.args
        s0, n = a["sys_length"], a["img_length"]
        layers = model.get_model().layers

        def visual(kwargs) -> list:
            return sorted(p - s0 for p in kwargs["position_ids"][0].tolist() if s0 <= p < s0 + n)

        def before_stage1(module, args, kwargs):          # layer K_t: HiMAP has just run stage 1
            (ctx,) = debias_core.current_samples()
            hidden = args[0] if args else kwargs["hidden_states"]
            f = {"image_size": ctx.image_size, "mode": debias_core.settings().mode,
                 "himap_on": bool(model.model.use_hmap_v), "length": int(hidden.shape[1])}
            if f["himap_on"]:
                f["stage1"] = visual(kwargs)
                _, raw = rec.rows[0][-1]
                with debias_core.recording():              # keeps this re-computation out of `rec`
                    scores = debias_core.debias(torch.from_numpy(raw).float(), stage=0)
                    f["expected1"] = sorted(scores.topk(debias_core.keep_cap(a["hmap_v_attn_txt_rank"])).indices.tolist())
            forwards.append(f)

        def before_stage2(module, args, kwargs):          # layer K_i: HiMAP has just run stage 2
            f = forwards[-1]
            if f["himap_on"]:
                f["stage2"] = visual(kwargs)
                pos, raw = rec.rows[1][-1]
                with debias_core.recording():
                    scores = debias_core.debias(torch.from_numpy(raw).float(), torch.from_numpy(pos), stage=1)
                    k = debias_core.keep_cap(min(a["hmap_v_attn_img_rank"], len(raw)))
                    f["expected2"] = sorted(pos[scores.topk(k).indices.numpy()].tolist())

        layers[a["hmap_v_attn_txt_layer"]].register_forward_pre_hook(before_stage1, with_kwargs=True)
        layers[a["hmap_v_attn_img_layer"]].register_forward_pre_hook(before_stage2, with_kwargs=True)

    HiMAPAdapter.configure = observed_configure
    with debias_core.recording() as rec:
        rc = driver.main(argv)
    recorded = {str(st): rec.count(st) for st in rec.stages}
    Path(out_json).write_text(json.dumps({"rc": rc, "forwards": forwards, "recorded": recorded}))
    return rc


if __name__ == "__main__":
    es.probe_main(_probe)
