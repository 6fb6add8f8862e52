"""Parity of our TokenCarve `full` mode with the authors' official TokenCarve code, at its pruning step.

The same tiny random model of TokenCarve's real architecture (tokencarve_probe.py: its own Llama files, work layer
2, nums 64 → R = 96) runs through the pin with the official patch applied (``define_attention_map("after", F)``
with F written from our paper preset, ``_cached_image_size``) and through the pin with our series in DEBIAS=full,
DEBIAS_TREND=paper:tokencarve/gqa, DEBIAS_GEOMETRY=official, the same span (35) and prompt.
- The attention (AV) top-R — the ranking the official code debiases — keeps the same non-padding tokens; the
  official extras are padding only (×0 without a cap; ours −inf and R capped).
- The SVD (SV) and fused rankings: ours also masks padding there (documented; the official code masks only
  the attention score). That mask is the only other difference: on images with no padding tokens every top-k
  and the kept set are identical, and with padding ours keeps none in any of them.
Both runs use the TokenCarve CPU environment (.venv-TokenCarve) in subprocesses; skips without it,
third_party/TokenCarve or third_party/attention-bias.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests import support
from tests.baselines import parity_support as parity

pytestmark = pytest.mark.baseline

NAME = "TokenCarve"
HERE = Path(__file__).parent
TREND = "paper:tokencarve/gqa"
S0, R = 35, 96
SIZES = {  # square (no padding), landscape, portrait, near-square, boundary (the geometries disagree), capped
    "336x336": (336, 336), "1147x1095": (1147, 1095), "640x480": (640, 480), "480x640": (480, 640),
    "204x375": (204, 375), "1000x101": (1000, 101), "200x1000": (200, 1000),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    python = parity.require_env_python(NAME, "4.37")
    parity.require_official()
    tmp = tmp_path_factory.mktemp("parity-tokencarve")
    official_tree = parity.official_tree(NAME, tmp / "official")
    ours_tree = support.patched_tree(NAME, tmp / "ours")
    weights = tmp / "weights"
    support.run_probe(HERE / "tokencarve_probe.py", [], ["init", str(weights), "--tree", str(official_tree)],
                      python=python)
    weight_file = parity.write_weight_file(TREND, 576, tmp / "gqa.npy")
    sizes = json.dumps(SIZES)
    official = support.run_probe(HERE / "parity_tokencarve_probe.py", [], [
        str(weights), "--tree", str(official_tree), "--sizes", sizes, "--official-weight-file", str(weight_file)],
        python=python, env={"DEBIAS": "off"})
    ours = support.run_probe(HERE / "parity_tokencarve_probe.py", [], [
        str(weights), "--tree", str(ours_tree), "--sizes", sizes], python=python,
        env={"DEBIAS": "full", "DEBIAS_TREND": TREND, "DEBIAS_METHOD": "tokencarve", "DEBIAS_GEOMETRY": "official"})
    return {key: {"official": official[key], "ours": ours[key]} for key in SIZES}


def _valid(size) -> set:
    box = parity.official_function(NAME, "TokenCarve/modeling_llama.py", "generate_pad_mask")
    return set(np.flatnonzero(np.asarray(box(*size, threshold=0.5)).reshape(-1)).tolist())


@pytest.mark.parametrize("size", list(SIZES))
def test_attention_top_r_keeps_the_official_non_padding_tokens(runs, size):
    valid = _valid(SIZES[size])
    official_av, ours_av = runs[size]["official"]["topk"][0], runs[size]["ours"]["topk"][0]
    official, ours = set(official_av["indices"]), set(ours_av["indices"])
    assert official_av["k"] == R and ours_av["k"] == min(R, len(valid))
    assert ours == official & valid, f"{size}: official only {sorted(official & valid - ours)[:8]}, ours only {sorted(ours - official)[:8]}"
    assert official - ours <= set(range(576)) - valid
    if len(valid) >= R:
        assert ours_av["indices"] == official_av["indices"]   # same order too


@pytest.mark.parametrize("size", list(SIZES))
def test_svd_and_fused_rankings_differ_only_by_the_padding_mask(runs, size):
    valid = _valid(SIZES[size])
    official, ours = runs[size]["official"], runs[size]["ours"]
    assert len(official["topk"]) == len(ours["topk"]) == 3, "expected the AV, SV and fused top-k"
    if len(valid) == 576:   # nothing to mask: identical rankings and kept tokens
        assert ours["topk"] == official["topk"] and ours["keep"] == official["keep"]
    for call in ours["topk"]:
        assert set(call["indices"]) <= valid, f"{size}: ours ranked padding into a top-k"
    kept = {i - S0 for i in ours["keep"] if S0 <= i < S0 + 576}
    assert kept <= valid
