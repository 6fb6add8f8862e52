"""FastV through the eval driver: ``python -m eval.run --method fastv`` in the FastV environment.

The patched tree (support.patched_tree: third_party/FastV at its pin + patches/FastV, a temp copy) reaches the
adapter through EVAL_THIRD_PARTY. The model is a tiny random LLaVA-1.5 (eval/tiny_llava.py, 3 decoder layers)
built by FastV's own LLaVA 1.1.3 / transformers-4.31 fork, so it is saved in the format FastV's
load_pretrained_model reads (as the released llava-v1.5 checkpoints). Benchmarks: eval/synthetic.py, plus a very
wide image (1000×101: 48 non-padding tokens < R = 128) and a text-only question added to synthetic_wide.

Observation is probe-only: this file, run as a script, wraps eval.run.main with a forward pre-hook on decoder
layer K (the mask row FastV hands it: which visual tokens stay visible) and debias_core.recording() (what the
ranking site handed debias_core); the adapter and the driver are unchanged.

Runs in .venv-FastV when it can run LLaVA's loader (sentencepiece, accelerate); skips elsewhere, saying why.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests import support
from tests.baselines import eval_support as es

pytestmark = pytest.mark.baseline

NAME, METHOD = "FastV", "fastv"
LAYERS, K, R, SPAN = 3, 2, 128, 576
BENCHES = ("synthetic_wide", "synthetic_tall", "synthetic_square")
NARROW = es.NARROW                        # 48 valid tokens at τ = 0.5
# added to synthetic_wide: text-only first, so the image question after it checks that the method comes back
TEXT_ONLY_QID = es.TEXT_ONLY[0]["question_id"]
EXTRA = [es.TEXT_ONLY[0], es.NARROW_QUESTION]
MODES = {"off": "off", "full": "full-paper-fastv"}   # mode -> run folder


def _require_env():
    support.require_populated(NAME)
    support.require_transformers("4.31", NAME)
    support.require_module("debias_core", "the FastV patch imports debias_core", env=NAME)
    for module in ("sentencepiece", "accelerate"):
        support.require_module(module, f"eval.run loads FastV through LLaVA 1.1.3's load_pretrained_model (slow "
                                       f"LlamaTokenizer: sentencepiece; low_cpu_mem_usage: accelerate), so "
                                       f"envs/cpu/FastV.txt must list sentencepiece and accelerate==0.21.0; the "
                                       f"FastV eval path was not run", env=NAME)


def _run(args: list[str], trees: Path):
    return es.run_python(args, es.clean_env(trees=trees), timeout=600)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    _require_env()
    return es.self_probe_setup(tmp_path_factory.mktemp("fastv-eval"), NAME, METHOD, LAYERS, EXTRA)


def _driver_args(setup, answers: Path, *extra) -> list[str]:
    return ["--method", METHOD, "--benchmark", ",".join(BENCHES), "--mode", "off,full", "--model-path",
            str(setup["model"]), "--data-dir", str(setup["data"]), "--answers-dir", str(answers),
            "--max-new-tokens", "3", "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def run(setup):
    """The driver in modes off and full under the probe; returns the answers folder and the observations."""
    args = _driver_args(setup, setup["tmp"] / "answers", "--method-arg", f"fast_v_sys_length={setup['s0']}")
    return es.run_self_probe(__file__, setup, args)


# --- answers --------------------------------------------------------------------------------------------

def test_answers_for_every_question_in_off_and_full(setup, run):
    wide = []
    for bench in BENCHES:
        aspect = bench.split("_")[1]
        qids = [q["question_id"] for q in es.rows(setup["data"] / "synthetic" / aspect / "llava_synthetic.jsonl")]
        for mode, folder in MODES.items():
            run_dir = run["answers"] / bench / f"{METHOD}-{R}" / folder
            rows = es.assert_answers(run_dir, qids, "tiny-llava", METHOD, mode, str(R), "paper:fastv")
            wide += [rows] if bench == "synthetic_wide" else []
            run_json = json.loads((run_dir / "run.json").read_text())
            assert run_json["method_args"]["fast_v_agg_layer"] == K and run_json["budget"] == str(R)
    assert len(wide) == len(MODES) and all(any(r["question_id"] == TEXT_ONLY_QID for r in rows) for rows in wide)


# --- the method really ran, with debias in full mode ----------------------------------------------------

def _image_events(run, mode):
    return [e for e in run["events"] if e["mode"] == mode and e["image_size"] is not None]


def test_fastv_ranks_at_every_forward_and_the_site_calls_debias_core(run):
    ranked = [e for e in run["events"] if e["fastv_on"]]
    assert ranked and all(e["image_size"] is not None for e in ranked)
    # one debias_core call per ranking (prefill and each decode step), made just before layer K runs
    assert [e["n_recorded"] for e in ranked] == list(range(1, len(ranked) + 1))
    assert run["recorded"] == len(ranked)
    for e in ranked:
        assert e["kept"] == e["expected"], "the kept set is not top-k of the site's debiased scores"


def test_off_keeps_R_tokens_including_padding(run):
    events = _image_events(run, "off")
    assert events and all(len(e["kept"]) == R for e in events)
    narrow = [e for e in events if tuple(e["image_size"]) == NARROW]
    assert narrow and all(set(e["kept"]) & support.padding_positions(NARROW) for e in narrow), \
        "off kept no padding on the 1000×101 image, so the full-mode check below would be vacuous"


def test_full_keeps_no_padding_and_caps_the_count(run):
    events = _image_events(run, "full")
    assert events and all(e["fastv_on"] for e in events)
    for e in events:
        pad = support.padding_positions(e["image_size"])
        assert not set(e["kept"]) & pad, f"full kept padding on {e['image_size']}"
        assert len(e["kept"]) == min(R, SPAN - len(pad))
    assert any(tuple(e["image_size"]) == NARROW and len(e["kept"]) == 48 for e in events)


def test_text_only_questions_run_with_fastv_off_and_it_comes_back(run):
    # every image forward (the narrow question comes right after the text-only one) ran the method again
    es.assert_off_for_text_only(run["events"], "fastv_on", SPAN)


# --- per eval module preprocessing ----------------------------------------------------------------------

def test_preprocessing_follows_llava_1_1_3s_eval_modules():
    es.assert_llava113_preprocessing(METHOD)


# --- clear errors ---------------------------------------------------------------------------------------

def test_wrong_sys_length_is_a_clear_error(setup):
    r = _run(["-m", "eval.run", *_driver_args(setup, setup["tmp"] / "bad-sys", "--limit", "1")], setup["trees"])
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"s0={setup['s0']}" in r.stderr and "fast_v_sys_length=35" in r.stderr, r.stderr[-2000:]


def test_debias_on_an_unpatched_tree_is_a_clear_error(setup):
    pristine = setup["tmp"] / "pristine"
    if not pristine.exists():
        support.pristine_tree(NAME, pristine / NAME)
    args = _driver_args(setup, setup["tmp"] / "unpatched", "--limit", "1", "--method-arg",
                        f"fast_v_sys_length={setup['s0']}")
    args[args.index("off,full")] = "full"
    r = _run(["-m", "eval.run", *args], pristine)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "needs the patched fastv" in r.stderr and "apply_patches.sh FastV" in r.stderr, r.stderr[-2000:]


# --- probe (this file run as a script, in the FastV environment) ------------------------------------------

def _probe(out_json: str, argv: list[str]) -> int:
    """eval.run.main(argv) with a forward pre-hook on decoder layer K, installed once the adapter has
    configured the model, and debias_core.recording() around the whole run (the driver runs every sample in
    this thread: workers 0 on CPU)."""
    import torch

    import debias_core
    from eval import run as driver
    from eval.methods.fastv import FastVAdapter

    events = []
    configure = FastVAdapter.configure

    def observed_configure(self, loaded):
        configure(self, loaded)
        model = loaded.model
        s0, n, r = (self.args[k] for k in ("fast_v_sys_length", "fast_v_image_token_length", "fast_v_attention_rank"))

        def before_layer_k(module, args, kwargs):
            (ctx,) = debias_core.current_samples()
            row = kwargs["attention_mask"][0, 0, -1]       # additive mask of the last query: 0 = visible
            e = {"image_size": ctx.image_size, "mode": debias_core.settings().mode,
                 "fastv_on": bool(model.model.use_fast_v), "length": int(row.shape[-1])}
            if e["fastv_on"]:
                e["kept"] = (row[s0:s0 + n] == 0).nonzero().flatten().tolist()
                _, raw = rec.rows[0][-1]                     # what the site handed debias_core for this forward
                e["n_recorded"] = rec.count(0)
                with debias_core.recording():                # keeps this re-computation out of `rec`
                    scores = debias_core.debias(torch.from_numpy(raw).float())
                    e["expected"] = sorted(scores.topk(debias_core.keep_cap(r)).indices.tolist())
            events.append(e)

        model.model.layers[self.args["fast_v_agg_layer"]].register_forward_pre_hook(before_layer_k, with_kwargs=True)

    FastVAdapter.configure = observed_configure
    with debias_core.recording() as rec:
        rc = driver.main(argv)
    Path(out_json).write_text(json.dumps({"rc": rc, "events": events, "recorded": rec.count(0)}))
    return rc


if __name__ == "__main__":
    es.probe_main(_probe)
