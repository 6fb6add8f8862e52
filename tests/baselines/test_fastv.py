"""FastV patch series (patches/FastV): applies at the pin, and debiases both ranking sites.

Runs in .venv-FastV (envs/cpu/FastV.txt): the FastV transformers fork (4.31.0) and LLaVA 1.1.3 come from
an export of third_party/FastV on PYTHONPATH, once pristine and once patched, each in its own
subprocess (tests/baselines/fastv_probe.py). Geometry is LLaVA-1.5's: 576 visual tokens at s0 = 35,
rank 128, K = 2, prefill + 3 decode steps. Elsewhere (CI's .venv-test, empty third_party) it skips.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests import support
from tests.baselines.contract import BaselineContract, Run, pytest_generate_tests  # noqa: F401 (the hook)

pytestmark = pytest.mark.baseline

NAME = "FastV"
PROBE = Path(__file__).with_name("fastv_probe.py")
# The probe needs only these two folders of the FastV repository (the whole tree is 140 MB).
TREE_PATHS = ("src/transformers/src", "src/LLaVA")
MODELING = "src/transformers/src/transformers/models/llama/modeling_llama.py"
SPAN, RANK = 576, 128
NARROW, WIDE, SQUARE = (1000, 101), (640, 200), (500, 500)   # 48 and 192 valid patches (τ = 0.5); none padded
BASE = dict(rank=RANK, agg=2, steps=3)


def _require_env():
    support.require_populated(NAME)
    support.require_transformers("4.31", NAME)
    support.require_module("debias_core", "the FastV patch imports debias_core")


def _export(dest: Path, patched: bool) -> Path:
    """TREE_PATHS of third_party/FastV at its pin (optionally with the series applied) in ``dest``; blobs absent
    from the sparse submodule's store (an A-OKVQA .arrow file, a demo GIF: none of them code) are left out."""
    export = support.patched_tree if patched else support.pristine_tree
    return export(NAME, dest, paths=list(TREE_PATHS))


def _pythonpath(tree: Path) -> list[Path]:
    return [tree / p for p in TREE_PATHS]


def _probe(tree: Path, *args, env=None) -> dict:
    return support.run_probe(PROBE, _pythonpath(tree), list(args), env=env, timeout=600)


def _specs(specs: dict) -> str:
    return json.dumps({name: dict(BASE, **spec) for name, spec in specs.items()})


LLAMA_SPECS = {
    **{f"{d}-{m}-{tag}": dict(mode=m, debias=d, image=list(size))
       for m in ("mask", "inplace") for d in ("off", "pad", "full") for tag, size in (("narrow", NARROW), ("wide", WIDE))},
    **{f"ramp-{d}-{m}": dict(mode=m, debias=d, image=list(SQUARE), ramp=True)
       for m in ("mask", "inplace") for d in ("off", "pos")},
    "off-mask-nocontext": dict(mode="mask", debias="off", image=list(NARROW), context=False),
    "full-mask-nocontext": dict(mode="mask", debias="full", image=list(NARROW), context=False),
}
LLAVA_SPECS = {
    "off": dict(mode="mask", debias="off", image=list(WIDE)),
    "env": dict(mode="mask", debias="env", image=list(NARROW)),   # DEBIAS* as an eval driver sets them
}
DRIVER_ENV = {"DEBIAS": "full", "DEBIAS_TREND": "paper:fastv", "DEBIAS_METHOD": "fastv"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Probe results: {(tree, kind): {spec name: result}} for tree ∈ pristine/patched, kind ∈ llama/llava."""
    _require_env()
    base = tmp_path_factory.mktemp("fastv")
    trees = {t: _export(base / t, patched=(t == "patched")) for t in ("pristine", "patched")}
    weights = base / "weights"
    weights.mkdir()
    for kind in ("llama", "llava"):
        _probe(trees["pristine"], "init", kind, str(weights))
    out = {}
    for t, tree in trees.items():
        out[t, "llama"] = _probe(tree, "run", "llama", str(weights), _specs(LLAMA_SPECS))
        out[t, "llava"] = _probe(tree, "run", "llava", str(weights), _specs(LLAVA_SPECS), env=DRIVER_ENV)
        assert out[t, "llama"]["_env"]["modeling_llama"].startswith(str(tree)), out[t, "llama"]["_env"]
        assert out[t, "llama"]["_env"]["calls_debias_core"] == (t == "patched")
    return out


def _ok(result: dict) -> dict:
    assert "error" not in result, result["error"]
    assert len(result["kept"]) == 1 + BASE["steps"], "expected a ranking at prefill and at every decode step"
    return result


# --- the series applies ------------------------------------------------------------------------------

def test_series_applies_at_the_pin(tmp_path):
    _require_env()
    tree = _export(tmp_path / "tree", patched=False)
    support.apply_series(NAME, tree)
    text = (tree / MODELING).read_text()
    assert text.count("debias_core.debias(last_layer_attention_avg_last_tok_image)") == 2   # both sites
    assert text.count(".topk(debias_core.keep_cap(ATTENTION_RANK))") == 2
    assert "np.load" not in text


def test_apply_patches_script_applies_reapplies_and_reverses(tmp_path):
    """scripts/apply_patches.sh on a temp superproject whose third_party/FastV is a shared clone at the pin."""
    _require_env()
    support.check_apply_patches_roundtrip(NAME, tmp_path, contains={MODELING: "debias_core.keep_cap"},
                                          files=[MODELING])


# --- the baseline contract (tests/baselines/contract.py) ----------------------------------------------------

def _run(result: dict) -> Run:
    """A probe result in the contract's terms: one ranking at prefill and at every decode step; the fp32 logits
    are compared through their hashes (Run.extra), bit for bit."""
    result = _ok(result)
    return Run(kept=result["kept"], tokens=result["generated"], extra={"logit_hashes": result["logit_hashes"]})


@pytest.fixture(scope="module")
def results(runs):
    """What the contract's hooks receive: every probe result."""
    return runs


LLAMA_OFF = ["off-mask-narrow", "off-inplace-narrow", "off-mask-wide", "off-inplace-wide", "off-mask-nocontext",
             "ramp-off-mask", "ramp-off-inplace"]
SIZES = {"narrow": NARROW, "wide": WIDE}


class TestContract(BaselineContract):
    off_cases = LLAMA_OFF + ["llava-off"]  # FastV's forked LlamaModel, and LLaVA 1.1.3's generate over it
    padded_cases = [f"{debias}-{mode}-{tag}" for debias in ("pad", "full") for mode in ("mask", "inplace")
                    for tag in SIZES]
    pos_cases = ["mask", "inplace"]

    def off_pair(self, runs, case):
        kind, name = ("llava", "off") if case == "llava-off" else ("llama", case)
        return _run(runs["pristine", kind][name]), _run(runs["patched", kind][name])

    def check_off(self, runs, case, up, ours):
        if case != "llava-off":
            assert all(len(k) == RANK for k in ours.kept)

    def padded(self, runs, case):
        debias, mode, tag = case.split("-")
        padding = support.padding_positions(SIZES[tag])
        cap = min(RANK, SPAN - len(padding))
        run = _run(runs["patched", "llama"][case])
        return run, set(range(SPAN)) - padding, [cap] * len(run.kept)

    def check_padded(self, runs, case, run, valid):
        _, mode, tag = case.split("-")
        off = _ok(runs["patched", "llama"][f"off-{mode}-{tag}"])
        assert any(set(k) - valid for k in off["kept"]), "the check is vacuous: upstream kept no padding here"

    def pos_pair(self, runs, mode):
        """Layer K-1's attention is replaced (in the probe) by a flat row with a 1 % recency ramp."""
        return _run(runs["patched", "llama"][f"ramp-off-{mode}"]), _run(runs["patched", "llama"][f"ramp-pos-{mode}"])

    def check_pos(self, runs, mode, off, pos):
        for step in range(len(off.kept)):
            assert off.kept[step] == list(range(SPAN - RANK, SPAN)), "upstream should keep the latest tokens"
            assert pos.kept[step] == list(range(RANK)), "the FastV trend should keep the earliest tokens"

    def entry(self, runs):
        """LlavaLlamaForCausalLM.generate(use_cache=True, output_attentions=True) on a real padded image
        (process_images pad, CLIPVisionTower from a tiny local checkpoint), DEBIAS=full from the environment,
        inside debias_core.sample(image_size, span_start=<image token position>): every step debiased."""
        return _run(runs["patched", "llava"]["env"])

    def check_entry(self, runs, run):
        res = runs["patched", "llava"]["env"]
        off = runs["patched", "llava"]["off"]
        padding = support.padding_positions(NARROW)
        assert res["span_start"] == 35
        pixels = set(res["pixel_padding"])
        assert pixels and pixels <= padding, "the geometry's padding does not cover the fill-colour patches"
        for step, kept in enumerate(res["kept"]):
            assert len(kept) == SPAN - len(padding) == 48
            assert not set(kept) & padding and not set(kept) & pixels
        assert len(res["generated"]) == 1 + BASE["steps"]
        assert res["kept"] != off["kept"]


# --- FastV's own -----------------------------------------------------------------------------------------------

def test_debias_without_sample_context_names_the_fix(runs):
    res = runs["patched", "llama"]["full-mask-nocontext"]
    assert "sample context" in res.get("error", ""), res.get("error")
