"""Parity of our HiMAP `full` mode with the authors' official HiMAP code, at the first pruning stage.

The same tiny random model (HiMAP's own LLaVA-1.1.3 class, 24×24 visual tokens, himap_probe.py) runs twice on the
same images and prompt: through the pin with the official patch applied (``tag="after"``, a weight file written
from our paper preset, ``_cached_image_size`` set as the official eval does), and through the pin with our series
in DEBIAS=full, DEBIAS_TREND=paper:himap/gqa, DEBIAS_GEOMETRY=official, the same span. Stage 1 must keep the
same non-padding tokens; the only difference allowed is the documented one: the official code multiplies padding
by 0 and keeps its budget of R_t, so where fewer than R_t tokens are content its extra tokens are padding, which
ours suppresses (−inf) and caps away.

Both runs use the HiMAP CPU environment (.venv-HiMAP, built by `bash setup.sh --test-env HiMAP`) in
subprocesses, so this test itself runs in any environment; it skips when that environment, third_party/HiMAP
or third_party/attention-bias is absent.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests import support
from tests.baselines import parity_support as parity

pytestmark = pytest.mark.baseline

NAME = "HiMAP"
HERE = Path(__file__).parent
LLAVA = Path("src/LLaVA")
R_T, R_I = 115, 90
TREND = "paper:himap/gqa"
SIZES = {  # square, landscape, portrait, near-square, a boundary size where the geometries disagree, capped ones
    "336x336": (336, 336), "640x480": (640, 480), "480x640": (480, 640), "1147x1095": (1147, 1095),
    "204x375": (204, 375), "375x204": (375, 204), "1000x101": (1000, 101), "200x1000": (200, 1000),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    python = parity.require_env_python(NAME, "4.31")
    parity.require_official()
    tmp = tmp_path_factory.mktemp("parity-himap")
    official_tree = parity.official_tree(NAME, tmp / "official")
    ours_tree = support.patched_tree(NAME, tmp / "ours")
    models = tmp / "models"
    support.run_probe(HERE / "himap_probe.py", [official_tree / LLAVA], ["init", str(models), json.dumps(
        {"random": {"seed": 0, "R_t": R_T, "R_i": R_I}})], python=python)
    weight_file = parity.write_weight_file(TREND, 576, tmp / "gqa.npy")
    cases = tmp / "official-cases.json"
    cases.write_text(json.dumps([{"name": s, "model": "random", "image_size": wh, "weight_file": str(weight_file)}
                                 for s, wh in SIZES.items()]))
    official = support.run_probe(HERE / "parity_himap_probe.py", [official_tree / LLAVA],
                                 ["official", str(models), str(cases)], python=python)
    ours_cases = tmp / "ours-cases.json"
    ours_cases.write_text(json.dumps([{"name": s, "model": "random", "mode": "full", "trend": TREND,
                                       "image_size": wh, "new_tokens": 1} for s, wh in SIZES.items()]))
    ours = support.run_probe(HERE / "himap_probe.py", [ours_tree / LLAVA],
                             ["run", str(models), str(tmp / "out-ours"), str(ours_cases)], python=python,
                             env={"DEBIAS_GEOMETRY": "official"})
    return {"official": official, "ours": ours}


@pytest.mark.parametrize("size", list(SIZES))
def test_first_stage_keeps_the_official_non_padding_tokens(runs, size):
    box = parity.official_function(NAME, "src/LLaVA/llava/model/language_model/himap.py", "generate_pad_mask")
    valid = set(np.flatnonzero(np.asarray(box(*SIZES[size], threshold=0.5)).reshape(-1)).tolist())
    official = set(runs["official"][size]["stage1"])
    ours = set(runs["ours"][size]["forwards"][0]["stage1"])
    assert runs["official"][size]["rank"] == R_T and len(official) == R_T
    assert ours == official & valid, f"{size}: non-padding kept sets differ: official only {sorted(official & valid - ours)[:8]}, ours only {sorted(ours - official)[:8]}"
    assert len(ours) == min(R_T, len(valid))                  # the cap: ours keeps no padding
    assert official - ours <= set(range(576)) - valid          # every extra official token is padding
    if len(valid) >= R_T:
        assert ours == official
