"""Parity of our SparseVLMs `full` mode with the authors' official SparseVLMs code, at the first pruning layer.

The same tiny random sparse LLaVA-1.5 (sparsevlm_probe.py: LlavaLlamaDynamicForCausalLM.generate, 16 layers,
retained_tokens 128 → 303 kept at layer 2, CPU stand-ins for flash-attn) runs through the pin with the official
patch applied — its ``process_images`` builds the padding mask (a 0/1 image resized by Pillow's bilinear filter,
thresholded at 0.5), and ``weights = np.load(F) * mask`` with F written from our paper preset goes to
``generate`` as the official eval scripts do — and through the pin with our series in DEBIAS=full,
DEBIAS_TREND=paper:sparsevlm/gqa, DEBIAS_METHOD=sparsevlm, DEBIAS_GEOMETRY=official, same span and prompt.
Layer 2 must keep the same tokens among those the official mask calls content; the official extras are padding
only (×0 without a cap; ours −inf and capped). Sizes include 1147×1095, where the official mask calls every patch
content (the box rule would suppress a border of 48), and 204×375, where it agrees with the exact geometry.

Both runs use the SparseVLMs CPU environment (.venv-SparseVLMs) in subprocesses; skips without it,
third_party/SparseVLMs or third_party/attention-bias, and until the ranking site passes DEBIAS_METHOD to the
geometry (debias_core.tables.valid_host(..., method)).
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest

from tests import support
from tests.baselines import parity_support as parity

pytestmark = pytest.mark.baseline

NAME = "SparseVLMs"
HERE = Path(__file__).parent
TREND = "paper:sparsevlm/gqa"
K0 = 303
SIZES = {s: s for s in ("336x336", "640x480", "480x640", "1147x1095", "204x375", "375x204", "1000x101")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from debias_core import tables
    if "method" not in inspect.signature(tables.valid_host).parameters:
        pytest.skip("debias_core's ranking site does not pass DEBIAS_METHOD to the geometry yet "
                    "(tables.valid_host has no method), so SparseVLMs' official rule cannot reach it; end-to-end "
                    "parity with the official SparseVLMs code was not tested (the rule itself is, in "
                    "test_parity_geometry.py)")
    python = parity.require_env_python(NAME, "4.37")
    parity.require_official()
    tmp = tmp_path_factory.mktemp("parity-sparsevlm")
    official_tree = parity.official_tree(NAME, tmp / "official")
    ours_tree = support.patched_tree(NAME, tmp / "ours")
    model = support.run_probe(HERE / "sparsevlm_probe.py", [official_tree], ["init", str(tmp / "weights")],
                              python=python, env={"DEBIAS": "off"})["model"]
    weight_file = parity.write_weight_file(TREND, 576, tmp / "gqa.npy")
    sizes = json.dumps(SIZES)
    official = support.run_probe(HERE / "parity_sparsevlm_probe.py", [official_tree], [
        "official", model, "--sizes", sizes, "--weight-file", str(weight_file)], python=python, env={"DEBIAS": "off"})
    ours = support.run_probe(HERE / "parity_sparsevlm_probe.py", [ours_tree], [
        "ours", model, "--sizes", sizes, "--trend", TREND], python=python,
        env={"DEBIAS": "off", "DEBIAS_METHOD": "sparsevlm", "DEBIAS_GEOMETRY": "official"})
    return {key: {"official": official[key], "ours": ours[key]} for key in SIZES}


@pytest.mark.parametrize("size", list(SIZES))
def test_first_pruning_layer_keeps_the_official_non_padding_tokens(runs, size):
    official_run, ours_run = runs[size]["official"], runs[size]["ours"]
    valid = {i for i, m in enumerate(official_run["pad_mask"]) if m}
    first_official, first_ours = official_run["stages"][0], ours_run["stages"][0]
    assert first_official["layer"] == first_ours["layer"] == 2
    official, ours = set(first_official["kept"]), set(first_ours["kept"])
    assert len(official) == K0
    assert ours == official & valid, f"{size}: official only {sorted(official & valid - ours)[:8]}, ours only {sorted(ours - official)[:8]}"
    assert len(ours) == min(K0, len(valid))
    assert official - ours <= set(range(576)) - valid
    if len(valid) >= K0:
        assert ours == official


def test_sizes_tell_the_official_rule_apart(runs):
    """The official masks of 1147×1095 and 204×375 are the ones neither other geometry gives."""
    assert sum(runs["1147x1095"]["official"]["pad_mask"]) == 576
    assert sum(runs["204x375"]["official"]["pad_mask"]) == 312
