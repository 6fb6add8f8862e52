"""HiMAP patch series (patches/HiMAP): applies at the pin, DEBIAS=off equals upstream, both stages debiased.

Runs in the HiMAP CPU environment (.venv-HiMAP: stock transformers 4.31.0, see envs/cpu/HiMAP.txt); skips elsewhere.
The model is HiMAP's own LLaVA-1.1.3 class (llava_llama.LlavaLlamaForCausalLM over Himap_LlamaModel), tiny and
random, with a tiny CLIP tower at the real 24×24 geometry; each tree (pristine, patched) runs in its own
interpreter through himap_probe.py, loading the same saved weights. Stage 1 ranks at layer 1 (K_t=1) and stage 2
at layer 2 (K_i=2) of 3, with the official debias budgets R_t=115, R_i=90.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests import support
from tests.baselines.contract import BaselineContract, Run, pytest_generate_tests  # noqa: F401 (the hook)

pytestmark = pytest.mark.baseline

NAME = "HiMAP"
PROBE = Path(__file__).with_name("himap_probe.py")
LLAVA = Path("src/LLaVA")
R_T, R_I = 115, 90
SPAN = 576
# (W, H) → valid tokens at τ = 0.5: 96 (stage 1 capped, stage 2 not), 48 (both capped), 192 (no cap)
SIZES = {"1200x200": (1200, 200), "1000x101": (1000, 101), "640x200": (640, 200)}
TREND = "paper:himap/gqa"


@pytest.fixture(scope="module")
def env():
    support.require_populated(NAME)
    support.require_transformers("4.31", NAME)
    pytest.importorskip("safetensors", reason="HiMAP probe saves weights with safetensors (a transformers dependency)")


def _export(dest: Path, patched: bool) -> Path:
    """The pinned tree (5.7 MB), with our series applied when ``patched``."""
    return support.patched_tree(NAME, dest) if patched else support.pristine_tree(NAME, dest)


def _flat(n: int) -> dict:
    return {"form": "table", "values": [1.0] * n}


@pytest.fixture(scope="module")
def runs(env, tmp_path_factory):
    """Probe results: {"pristine": {case: result}, "patched": {...}, "entry": {...}, "valid": {size: [...]}}."""
    import debias_core
    tmp = tmp_path_factory.mktemp("himap")
    trees = {k: _export(tmp / k, k == "patched") for k in ("pristine", "patched")}
    models = tmp / "models"
    support.run_probe(PROBE, [trees["pristine"] / LLAVA], ["init", str(models), json.dumps({
        "random": {"seed": 0, "R_t": R_T, "R_i": R_I},
        "flat": {"seed": 1, "R_t": R_T, "R_i": R_I, "variant": "flat"},
        "recency": {"seed": 2, "R_t": R_T, "R_i": R_I, "variant": "recency"}})])
    # stage 0 flat (weight 1: stage 1 ranks as upstream), stage 1 favours odd raster positions by 10⁶
    parity = tmp / "parity-trend.json"
    parity.write_text(json.dumps({"form": "staged", "stages": {
        "0": _flat(SPAN), "1": {"form": "table", "values": [1.0 if i % 2 == 0 else 1e-6 for i in range(SPAN)]}}}))

    upstream = [{"name": f"off-{s}", "model": "random", "mode": "off", "image_size": SIZES[s]} for s in SIZES]
    upstream += [{"name": f"off-{m}", "model": m, "mode": "off", "image_size": SIZES["640x200"]}
                 for m in ("flat", "recency")]
    upstream += [{"name": "off-nocontext", "model": "random", "mode": "off", "image_size": SIZES["1200x200"],
                  "no_context": True}]
    ours = [dict(c, name=f"{mode}-{s}", mode=mode, trend=TREND if mode == "full" else None)
            for mode in ("full", "pad") for s, c in ((s, {"model": "random", "image_size": SIZES[s]}) for s in SIZES)]
    ours += [{"name": "pos-flat", "model": "flat", "mode": "pos", "trend": TREND, "image_size": SIZES["640x200"]},
             {"name": "full-flat", "model": "flat", "mode": "full", "trend": TREND, "image_size": SIZES["640x200"]},
             {"name": "pos-recency", "model": "recency", "mode": "pos", "trend": TREND, "image_size": SIZES["640x200"]},
             {"name": "pos-parity", "model": "random", "mode": "pos", "trend": str(parity),
              "image_size": SIZES["1200x200"]},
             {"name": "pos-random", "model": "random", "mode": "pos", "trend": TREND, "image_size": SIZES["1200x200"]}]
    out = {}
    for kind, cases in (("pristine", upstream), ("patched", upstream + ours)):
        spec = tmp / f"cases-{kind}.json"
        spec.write_text(json.dumps(cases))
        out[kind] = support.run_probe(PROBE, [trees[kind] / LLAVA], ["run", str(models), str(tmp / f"out-{kind}"), str(spec)])
    out["entry"] = {
        case["name"]: support.run_probe(PROBE, [trees["patched"] / LLAVA], [
            "entry", str(models / "llava-tiny-random"), str(tmp / "out-entry"), json.dumps(case)])
        for case in ({"name": "full-pad", "mode": "full", "trend": TREND, "image_size": SIZES["1200x200"],
                      "R_t": R_T, "R_i": R_I},
                     {"name": "full-crop", "mode": "full", "trend": TREND, "image_size": SIZES["1200x200"],
                      "preprocess": "none", "R_t": R_T, "R_i": R_I})}
    out["valid"] = {s: sorted(map(int, debias_core.valid_mask(debias_core.pad_fractions(wh), 0.5).reshape(-1).nonzero()[0]))
                    for s, wh in SIZES.items()}
    return out


def _logits(result: dict) -> dict:
    from safetensors.torch import load_file
    return load_file(result["logits_file"])


# ------------------------------------------------------------------------------------------------ the series

def test_series_applies_at_pin_and_stays_small(env, tmp_path):
    patches = support.apply_series(NAME, _export(tmp_path / "tree", patched=False), ["0001", "0002"])
    support.check_line_budget(NAME, 120)
    added = [l[1:] for p in patches for l in p.read_text().splitlines()
             if l.startswith("+") and not l.startswith("+++")]
    assert [l for l in added if "import" in l] == ["import debias_core"]
    assert not [l for l in added if "np.load" in l or "open(" in l or ".item()" in l or ".cpu()" in l]


def test_apply_patches_script_applies_reapplies_reverses(env, tmp_path):
    support.check_apply_patches_roundtrip(NAME, tmp_path)


# ------------------------------------------------------------------------------------------------ the contract

def _run(result: dict, logits: bool = True) -> Run:
    """A probe result in the contract's terms: stage 1 then stage 2 of each forward (prefill, 2 decode steps)."""
    return Run(kept=[kept for f in result["forwards"] for kept in (f["stage1"], f["stage2"])],
               tokens=result["generated"], logits=_logits(result) if logits else {},
               extra={"forwards": result["forwards"]})  # every field the probe records per forward


@pytest.fixture(scope="module")
def results(runs):
    """What the contract's hooks receive: every probe result."""
    return runs


class TestContract(BaselineContract):
    off_cases = [f"off-{s}" for s in SIZES] + ["off-flat", "off-recency", "off-nocontext"]
    padded_cases = [f"{mode}-{size}" for mode in ("full", "pad") for size in SIZES]
    pos_cases = ["recency"]

    def off_pair(self, runs, case):
        return _run(runs["pristine"][case]), _run(runs["patched"][case])

    def check_off(self, runs, case, up, ours):
        assert len(up.extra["forwards"]) == 3, "expected a prefill and two decode steps"
        assert len(up.logits) == 3
        # and upstream itself keeps exactly R_t then R_i image tokens
        assert all(len(f["stage1"]) == R_T and len(f["stage2"]) == R_I for f in up.extra["forwards"])

    def padded(self, runs, case):
        size = case.split("-", 1)[1]
        valid = set(runs["valid"][size])
        k_txt = min(R_T, len(valid))
        k_img = min(R_I, k_txt)
        r = runs["patched"][case]
        return _run(r, logits=False), valid, [k_txt, k_img] * len(r["forwards"])

    def check_padded(self, runs, case, run, valid):
        r = runs["patched"][case]
        assert set(r["pixel_valid"]) == valid, "debias_core's pad geometry disagrees with HiMAP's process_images pixels"
        n_text = len(r["input_ids"]) - 1 - r["s0"]
        for step, f in enumerate(r["forwards"]):
            assert f["length"] == r["s0"] + SPAN + n_text + step
            assert set(f["stage2"]) <= set(f["stage1"]), f"step {step}: stage 2 not within stage 1"
            assert f["stage1_sys"] == f["stage2_sys"] == r["s0"]
            assert f["stage1_text"] == f["stage2_text"] == n_text + step
        # off on the same image keeps padding whenever the budget exceeds the content
        off = runs["patched"][f"off-{case.split('-', 1)[1]}"]["forwards"][0]
        if len(valid) < R_T:
            assert not set(off["stage1"]) <= valid

    def pos_pair(self, runs, case):
        """Stage-1 scores rising slowly with position (a recency bias of ×1.3 over the span): upstream keeps the
        last R_t image tokens, pos (the paper's HiMAP/GQA trend, ×3.5) the first R_t."""
        return _run(runs["patched"][f"off-{case}"]), _run(runs["patched"][f"pos-{case}"])

    def check_pos(self, runs, case, off, pos):
        assert runs["pristine"]["off-recency"]["forwards"] == off.extra["forwards"]
        for f in off.extra["forwards"]:
            assert f["stage1"] == list(range(SPAN - R_T, SPAN))
        for f in pos.extra["forwards"]:
            assert f["stage1"] == list(range(R_T))

    def entry(self, runs):
        """HiMAP's eval path on CPU: load_pretrained_model (fp16) → model.config HiMAP settings → reset_hmapv() →
        generate(use_cache=False, output_attentions=True) inside debias_core.sample(...), prefill + 2 decode steps."""
        return _run(runs["entry"]["full-pad"], logits=False)

    def check_entry(self, runs, run):
        pad, crop = runs["entry"]["full-pad"], runs["entry"]["full-crop"]
        assert pad["dtype"] == crop["dtype"] == "torch.float16" and pad["finite"] and crop["finite"]
        valid = set(runs["valid"]["1200x200"])
        for r in (pad, crop):
            assert len(r["generated"]) == 3 and len(r["forwards"]) == 3
            assert len(r["recorded"]["0"]) == len(r["recorded"]["1"]) == 3
        for f in pad["forwards"]:
            assert len(f["stage1"]) == len(valid) and set(f["stage1"]) <= valid and len(f["stage2"]) == R_I
        # centre crop (model_vqa.py / eval_scivqa.py preprocessing) has no padding: nothing is masked or capped
        for f in crop["forwards"]:
            assert len(f["stage1"]) == R_T and len(f["stage2"]) == R_I


# ------------------------------------------------------------------------------------------------ HiMAP's own

@pytest.mark.parametrize("case", [f"{m}-{s}" for m in ("full", "pad") for s in SIZES]
                         + ["pos-flat", "full-flat", "pos-recency", "pos-parity", "pos-random", "off-1200x200"])
def test_sites_rank_what_they_hand_to_debias_core(runs, case):
    """Each stage's kept set is the top-k of debias_core applied to the raw scores the site recorded, at
    original raster positions: stage 2's positions are exactly stage 1's survivors."""
    r = runs["patched"][case]
    rec, exp = r["recorded"], r["expected"]
    assert [len(rec["0"]), len(rec["1"])] == [len(r["forwards"])] * 2, "every forward must call both sites"
    for step, f in enumerate(r["forwards"]):
        assert rec["0"][step]["positions"] == list(range(SPAN))
        assert sorted(rec["1"][step]["positions"]) == f["stage1"]
        assert exp["0"][step] == f["stage1"] and exp["1"][step] == f["stage2"]


# ------------------------------------------------------------------------------------------------ pos

def test_pos_on_tied_scores_keeps_the_earliest(runs):
    """Layer 0 with a zero query projection: every text→image attention is equal, so stage-1 scores tie."""
    for f in runs["patched"]["pos-flat"]["forwards"]:
        assert f["stage1"] == list(range(R_T))
    valid = runs["valid"]["640x200"]
    for f in runs["patched"]["full-flat"]["forwards"]:
        assert f["stage1"] == valid[:R_T]


def test_pos_at_stage_2_weights_original_positions(runs):
    """A stage-2 trend that favours odd raster positions by 10⁶ (stage 1 unweighted): stage 2 keeps every odd
    survivor of stage 1, which upstream's ranking does not. Compacted indices instead of raster positions
    would pick a different set."""
    off, pos = runs["patched"]["off-1200x200"], runs["patched"]["pos-parity"]
    for f_off, f_pos in zip(off["forwards"], pos["forwards"]):
        assert f_pos["stage1"] == f_off["stage1"]
        odd = {p for p in f_pos["stage1"] if p % 2}
        assert 0 < len(odd) <= R_I
        assert odd <= set(f_pos["stage2"])
        assert not odd <= set(f_off["stage2"])
