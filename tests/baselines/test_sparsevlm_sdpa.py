"""SparseVLMs without flash-attn (patches/SparseVLMs/0003): the pruning layers' attention falls back to PyTorch
SDPA, so the sparse model runs where flash-attn does not build, and it prunes exactly as the same attention
written out (eager, fp32) does: same kept visual tokens at layers 2, 6 and 15, same generated tokens, in every
debias mode. The pristine tree, run the same way, fails for want of flash-attn.

Models run in subprocesses (sparsevlm_sdpa_probe.py over sparsevlm_probe.py) in .venv-SparseVLMs, which has no
flash_attn (a CPU environment).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests import support

pytestmark = pytest.mark.baseline

NAME = "SparseVLMs"
PROBE = Path(__file__).with_name("sparsevlm_sdpa_probe.py")
INIT_PROBE = Path(__file__).with_name("sparsevlm_probe.py")
TREND = "paper:sparsevlm/gqa"
_ENV = {"DEBIAS": "off", "DEBIAS_TREND": "", "DEBIAS_METHOD": "sparsevlm", "DEBIAS_GEOMETRY": "exact"}


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    support.require_populated(NAME)
    support.require_transformers("4.37", NAME)
    support.require_module("einops", "SparseVLMs' llava/model/language_model/utils.py imports einops")
    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash_attn is installed in this environment, so the SDPA fallback path was not exercised")
    root = tmp_path_factory.mktemp("sparsevlm_sdpa")
    pristine = support.pristine_tree(NAME, root / "pristine")
    patched = support.patched_tree(NAME, root / "patched")
    model = support.run_probe(INIT_PROBE, [pristine], ["init", str(root / "weights")], env=_ENV)["model"]
    return {"pristine": pristine, "patched": patched, "model": model}


def probe(trees, attention: str, mode: str, tree: str = "patched", image: str = "400x200") -> dict:
    args = [attention, "run", trees["model"], "--mode", mode, "--image", image]
    args += ["--trend", TREND] if mode in ("pos", "full") else []
    return support.run_probe(PROBE, [trees[tree]], args, env=_ENV)


@pytest.mark.parametrize("mode", ["off", "full"])
def test_sdpa_fallback_keeps_what_eager_attention_keeps(trees, mode):
    fallback, eager = probe(trees, "fallback", mode), probe(trees, "eager", mode)
    assert fallback["flash_attn_importable"] is False and fallback["attention"] == "fallback"
    assert [s["kept"] for s in fallback["stages"]] == [s["kept"] for s in eager["stages"]]
    assert len(fallback["stages"]) == 3 and all(s["kept"] for s in fallback["stages"])
    assert fallback["generated"] == eager["generated"]
    assert fallback["logits_finite"] and fallback["cache_lengths"] == eager["cache_lengths"]


def test_pristine_tree_needs_flash_attn(trees):
    """Without the fallback, the same run fails inside transformers' flash-attn path (flash_attn_func undefined)."""
    with pytest.raises(AssertionError, match="flash_attn"):
        probe(trees, "fallback", "off", tree="pristine")
