"""Parity of ``DEBIAS_GEOMETRY=official`` with the authors' own padding-mask code, per method.

The official code is taken from the pinned official repository (third_party/attention-bias) and run verbatim:
``generate_pad_mask`` as each official patch adds it (FastV, PyramidDrop, HiMAP, TokenCarve), and SparseVLMs'
patched ``process_images`` (its pinned llava/mm_utils.py with the official patch applied), which builds its
mask differently: a 0/1 image resized by Pillow's bilinear filter. Runs in the CI environment (.venv-test:
numpy, torch and Pillow; no model). Skips when third_party/attention-bias (or, for SparseVLMs, third_party/
SparseVLMs) is not populated.
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest

from debias_core import keep_count, pad_fractions, valid_mask
from debias_core.geometry import valid_tokens
from debias_core.presets import pad_threshold
from tests import support
from tests.baselines import parity_support as parity

SPARSEVLM_PROBE = Path(__file__).with_name("parity_sparsevlm_mask.py")

# square, landscape, portrait, near-square, extreme and tiny sizes; boundary sizes where the geometries disagree
NAMED_SIZES = [
    (336, 336), (500, 500), (1, 1), (640, 480), (640, 427), (500, 375), (1024, 512), (640, 360), (1000, 101),
    (333, 500), (375, 500), (480, 640), (204, 375), (375, 204), (1147, 1095), (1095, 1147), (641, 640),
    (640, 200), (200, 1000), (1, 500), (500, 1), (2825, 101), (101, 2825), (5000, 3), (7, 3), (23, 11), (2, 1),
]
_rng = random.Random(20250824)
SIZES = NAMED_SIZES + [(_rng.randint(1, 2500), _rng.randint(1, 2500)) for _ in range(120)] \
    + [(_rng.randint(1, 64), _rng.randint(1, 64)) for _ in range(40)]

# official patch file that defines generate_pad_mask, per baseline; our method key
BOX_METHODS = {
    "PyramidDrop": ("llava/model/modeling_llama_pdrop.py", "pdrop"),
    "HiMAP": ("src/LLaVA/llava/model/language_model/himap.py", "himap"),
    "TokenCarve": ("TokenCarve/modeling_llama.py", "tokencarve"),
    "FastV": ("src/transformers/src/transformers/models/llama/modeling_llama.py", "fastv"),
}


def _ours(size, method, threshold) -> np.ndarray:
    return valid_tokens(size, threshold=threshold, exact=False, method=method).reshape(-1)


def _check_against_official(size, official: np.ndarray, ours: np.ndarray, what: str):
    """Identical where the official mask keeps something. Where it keeps nothing (an extreme aspect ratio: its
    weights all become zero and its ranking arbitrary) ours keeps the patches the official rule finds least
    padded, which lie on or next to the content sliver: checked as non-empty and within one patch of it."""
    if official.any():
        assert (ours == official).all(), (f"{what} {size}: official keeps {int(official.sum())} patches, ours "
                                          f"{int(ours.sum())}; they differ at {np.flatnonzero(ours != official)[:12]}")
        return
    content = pad_fractions(size) < 1.0
    near = content | np.roll(content, 1, 0) | np.roll(content, -1, 0) | np.roll(content, 1, 1) | np.roll(content, -1, 1)
    assert ours.any() and not (ours & ~near.reshape(-1)).any(), f"{what} {size}: fallback kept a patch far from content"


@pytest.mark.parametrize("name", list(BOX_METHODS))
def test_box_rule_matches_the_official_generate_pad_mask(name):
    file, method = BOX_METHODS[name]
    official_mask = parity.official_function(name, file, "generate_pad_mask")
    thresholds = parity.official_thresholds(name, file)
    assert thresholds == {pad_threshold(method)}, f"{name}: official call sites use {thresholds}"
    threshold = pad_threshold(method)
    differs_from_exact = 0
    for size in SIZES:
        official = np.asarray(official_mask(*size, threshold=threshold)).reshape(-1).astype(bool)
        ours = _ours(size, method, threshold)
        _check_against_official(size, official, ours, name)
        differs_from_exact += official.any() and keep_count(size, threshold=threshold) != official.sum()
    assert differs_from_exact, "no size tried tells the official box rule from the exact geometry"


@pytest.fixture(scope="module")
def sparsevlm_masks(tmp_path_factory):
    """{(W, H): bool [576]} from SparseVLMs' official process_images, run in a fresh interpreter."""
    parity.require_official()
    support.require_populated("SparseVLMs")
    pytest.importorskip("PIL", reason="SparseVLMs' official mask is built with Pillow")
    tree = parity.official_tree("SparseVLMs", tmp_path_factory.mktemp("sparsevlm-official"),
                                paths=["llava/mm_utils.py", "llava/constants.py"], include=["llava/mm_utils.py"])
    out = support.run_probe(SPARSEVLM_PROBE, [], [str(tree), json.dumps(SIZES)], python=sys.executable,
                            timeout=600)
    return {tuple(int(v) for v in key.split("x")): np.array(mask, dtype=bool) for key, mask in out.items()}


def test_sparsevlm_rule_matches_the_official_process_images(sparsevlm_masks):
    threshold = pad_threshold("sparsevlm")
    assert threshold == 0.5   # the official code thresholds the resized mask at 0.5
    for size in SIZES:
        _check_against_official(size, sparsevlm_masks[size], _ours(size, "sparsevlm", threshold), "SparseVLMs")


@pytest.mark.parametrize("size, official_count, exact_count, box_count", [
    ((1147, 1095), 576, 528, 528),   # near-square: every patch is content for the official SparseVLMs code
    ((204, 375), 312, 312, 336),     # here it agrees with the exact geometry, not the authors' box rule
])
def test_sparsevlm_official_mask_is_neither_other_geometry(sparsevlm_masks, size, official_count, exact_count,
                                                           box_count):
    assert sparsevlm_masks[size].sum() == official_count
    assert keep_count(size) == exact_count and keep_count(size, exact=False, method="himap") == box_count
    assert keep_count(size, exact=False, method="sparsevlm") == official_count


def test_sparsevlm_float_fractions_give_the_same_mask(sparsevlm_masks):
    """The site's tables threshold ``pad_fractions`` with ``valid_mask``: the same decision, bit for bit."""
    for size in SIZES:
        official = sparsevlm_masks[size]
        if official.any():
            fr = pad_fractions(size, exact=False, method="sparsevlm")
            assert (valid_mask(fr, 0.5).reshape(-1) == official).all(), size


@pytest.mark.parametrize("name, applies", [
    ("PyramidDrop", True), ("SparseVLMs", True), ("HiMAP", True), ("TokenCarve", True), ("FastV", False)])
def test_which_official_patches_apply_to_the_pins(name, applies, tmp_path):
    """docs/parity.md's table: four official patches apply to clean exports of the pins; FastV's names eval files
    (src/FastV/inference/eval/...) that the pinned FastV does not have."""
    parity.require_official()
    ok, message = parity.official_patch_applies(name, tmp_path / name)
    assert ok == applies, message
    if not applies:
        assert "src/FastV/inference/eval/model_vqa_loader.py" in message


def test_the_official_weight_files_are_our_paper_presets():
    """Every published weight vector equals the preset that regenerates it (so the parity runs can write the
    official code's .npy files from our presets or use the published ones interchangeably)."""
    root = parity.require_official() / "playground" / "data" / "weight"
    from debias_core.presets import BENCHMARK_ALIASES, METHOD_ALIASES, resolve_trend
    folders = {"FastV": "fastv", "PyramidDrop": "pdrop", "SparseVLMs": "sparsevlm", "HiMAP": "himap",
               "TokenCarve": "tokencarve"}
    files = sorted(root.glob("*/*.npy"))
    assert len(files) == 41
    for path in files:
        method = folders[path.parent.name]
        bench = path.stem.lower()
        bench = {"mm-vet": "mmvet"}.get(bench, BENCHMARK_ALIASES.get(bench, bench))
        preset = "paper:fastv" if method == "fastv" else f"paper:{METHOD_ALIASES.get(method, method)}/{bench}"
        published = np.load(path, allow_pickle=False)
        ours = np.asarray(resolve_trend(preset).weights(published.size))
        np.testing.assert_allclose(ours, published, rtol=0, atol=1e-12, err_msg=f"{path.name} vs {preset}")


def _site_reads_the_method() -> bool:
    import inspect

    from debias_core import tables
    return "method" in inspect.signature(tables.valid_host).parameters


@pytest.mark.parametrize("method, size, expected", [
    ("sparsevlm", (1147, 1095), 576), ("sparsevlm", (204, 375), 312), ("himap", (1147, 1095), 528),
    ("himap", (204, 375), 336), ("pdrop", (640, 427), 384), (None, (204, 375), 336)])
def test_the_ranking_site_applies_each_methods_official_rule(clean_debias, sparsevlm_masks, method, size, expected):
    """keep_cap and the −inf bias of debias() follow DEBIAS_METHOD's official rule under DEBIAS_GEOMETRY=official;
    for SparseVLMs that is the official process_images mask itself."""
    if not _site_reads_the_method():
        pytest.skip("debias_core.tables.valid_host does not take the method yet, so the ranking site applies the "
                    "box rule to every method; SparseVLMs' official rule was checked in geometry only")
    import torch
    debias_core = clean_debias
    debias_core.configure(mode="pad", method=method, geometry="official")
    threshold = pad_threshold(method)
    with debias_core.sample(image_size=size, span_start=0):
        assert debias_core.keep_cap(576) == expected
        kept = torch.isfinite(debias_core.debias(torch.ones(576), torch.arange(576))).numpy()
    official = sparsevlm_masks[size] if method == "sparsevlm" else _ours(size, method, threshold)
    assert (kept == official).all() and kept.sum() == expected
    debias_core.configure(geometry="exact")
    with debias_core.sample(image_size=size, span_start=0):
        assert debias_core.keep_cap(576) == keep_count(size, threshold=threshold)
