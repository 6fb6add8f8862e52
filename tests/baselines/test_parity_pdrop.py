"""Parity of our PyramidDrop `full` mode with the authors' official PyramidDrop code, at the first pruning stage.

The same tiny random LLaVA-1.5 (pdrop_probe.py: PyramidDrop's own LlavaLlamaForCausalLM_PDrop.generate, layers
1/2/3, ratios 0.32/0.16/0.08) runs through the pin with the official patch applied (tag "after", a weight file
written from our paper preset, ``_cached_image_size``) and through the pin with our series in DEBIAS=full,
DEBIAS_TREND=paper:pdrop/gqa, DEBIAS_METHOD=pdrop (threshold 0.01), DEBIAS_GEOMETRY=official, same span. Stage 1
must keep the same non-padding tokens; the only difference allowed is the documented one: the official code
multiplies padding by 0 and keeps int(576·0.32) = 184 tokens, so where fewer are content its extras are padding,
which ours suppresses (−inf) and caps away. Later stages are not compared: the official code debiases the first
stage only and its later stages rank what the uncapped first stage left.

Both runs use the PyramidDrop CPU environment (.venv-PyramidDrop) in subprocesses; skips without it,
third_party/PyramidDrop or third_party/attention-bias.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests import support
from tests.baselines import parity_support as parity

pytestmark = pytest.mark.baseline

NAME = "PyramidDrop"
HERE = Path(__file__).parent
TREND = "paper:pdrop/gqa"
K0 = int(576 * 0.32)
SIZES = {  # square, landscape, portrait, near-square, boundary sizes where the geometries disagree at 0.01, capped
    "336x336": (336, 336), "640x480": (640, 480), "480x640": (480, 640), "1147x1095": (1147, 1095),
    "640x427": (640, 427), "500x375": (500, 375), "333x500": (333, 500), "640x200": (640, 200),
    "1000x101": (1000, 101),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    python = parity.require_env_python(NAME, "4.37")
    parity.require_official()
    tmp = tmp_path_factory.mktemp("parity-pdrop")
    official_tree = parity.official_tree(NAME, tmp / "official")
    ours_tree = support.patched_tree(NAME, tmp / "ours")
    weights = tmp / "tiny.safetensors"
    support.run_probe(HERE / "pdrop_probe.py", [official_tree], ["init", "--weights", str(weights)], python=python)
    weight_file = parity.write_weight_file(TREND, 576, tmp / "gqa.npy")
    common = ["--weights", str(weights), "--sizes", json.dumps(SIZES)]
    official = support.run_probe(HERE / "parity_pdrop_probe.py", [official_tree],
                                 ["official", *common, "--weight-file", str(weight_file)], python=python)
    ours = support.run_probe(HERE / "parity_pdrop_probe.py", [ours_tree], ["ours", *common, "--trend", TREND],
                             python=python)
    return {key: {"official": official[key], "ours": ours[key]} for key in SIZES}


@pytest.mark.parametrize("size", list(SIZES))
def test_first_stage_keeps_the_official_non_padding_tokens(runs, size):
    box = parity.official_function(NAME, "llava/model/modeling_llama_pdrop.py", "generate_pad_mask")
    valid = set(np.flatnonzero(np.asarray(box(*SIZES[size], threshold=0.01)).reshape(-1)).tolist())
    official, ours = set(runs[size]["official"]["kept"][0]), set(runs[size]["ours"]["kept"][0])
    assert runs[size]["official"]["k"][0] == K0 == len(official)
    assert ours == official & valid, f"{size}: official only {sorted(official & valid - ours)[:8]}, ours only {sorted(ours - official)[:8]}"
    assert len(ours) == min(K0, len(valid))
    assert official - ours <= set(range(576)) - valid
    if len(valid) >= K0:
        assert ours == official
