"""Parity of our FastV `full` mode with the authors' official FastV code, at its ranking site.

The official FastV patch does not apply to the pin as a whole: its eval-script hunks name
src/FastV/inference/eval/model_vqa_{loader,mmbench,science}.py, which the pinned FastV does not have. Its
modelling hunk (transformers fork, LlamaModel.forward, mask mode) applies on its own, and that is what runs
here: the same tiny random Llama of the fork (fastv_probe.py; K = 2, rank 128, s0 = 35, prefill + 3 decode
steps, mask mode) through the pin with that hunk (``define_attention_map("after", F)`` with F written from our
paper preset, ``_cached_image_size``) and through the pin with our series in DEBIAS=full, DEBIAS_TREND=paper:fastv,
DEBIAS_GEOMETRY=official. The official FastV code caps its rank to the content tokens as we do, so the kept
sets must be identical at every ranking, prefill and decode.

Both runs use the FastV CPU environment (.venv-FastV) in subprocesses; skips without it, third_party/FastV or
third_party/attention-bias.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests import support
from tests.baselines import parity_support as parity

pytestmark = pytest.mark.baseline

NAME = "FastV"
HERE = Path(__file__).parent
TREE_PATHS = ["src/transformers/src", "src/LLaVA"]
TREND = "paper:fastv"
RANK = 128
SIZES = {  # square, landscape, portrait, near-square, boundary (the geometries disagree), capped
    "336x336": (336, 336), "640x480": (640, 480), "480x640": (480, 640), "1147x1095": (1147, 1095),
    "204x375": (204, 375), "640x200": (640, 200), "1000x101": (1000, 101),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    python = parity.require_env_python(NAME, "4.31")
    parity.require_official()
    tmp = tmp_path_factory.mktemp("parity-fastv")
    official_tree = parity.official_tree(NAME, tmp / "official", paths=TREE_PATHS, include=["src/transformers/*"])
    ours_tree = support.patched_tree(NAME, tmp / "ours", paths=TREE_PATHS)
    weights = tmp / "weights"
    weights.mkdir()

    def path(tree):
        return [tree / p for p in TREE_PATHS]
    support.run_probe(HERE / "fastv_probe.py", path(official_tree), ["init", "llama", str(weights)], python=python)
    weight_file = parity.write_weight_file(TREND, 576, tmp / "weight.npy")
    official = support.run_probe(HERE / "parity_fastv_probe.py", path(official_tree), [
        str(weights), json.dumps({s: dict(mode="mask", debias="off", image=list(wh), rank=RANK, agg=2, steps=3)
                                  for s, wh in SIZES.items()}), "--official-weight-file", str(weight_file)],
        python=python)
    ours = support.run_probe(HERE / "parity_fastv_probe.py", path(ours_tree), [
        str(weights), json.dumps({s: dict(mode="mask", debias="full", image=list(wh), rank=RANK, agg=2, steps=3)
                                  for s, wh in SIZES.items()})], python=python, env={"DEBIAS_GEOMETRY": "official"})
    return {key: {"official": official[key], "ours": ours[key]} for key in SIZES}


@pytest.mark.parametrize("size", list(SIZES))
def test_every_ranking_keeps_the_official_tokens(runs, size):
    box = parity.official_function(NAME, "src/transformers/src/transformers/models/llama/modeling_llama.py",
                                   "generate_pad_mask")
    valid = set(np.flatnonzero(np.asarray(box(*SIZES[size], threshold=0.5)).reshape(-1)).tolist())
    official, ours = runs[size]["official"], runs[size]["ours"]
    assert "error" not in official and "error" not in ours, (official.get("error"), ours.get("error"))
    assert len(official["kept"]) == len(ours["kept"]) == 4, "expected a ranking at prefill and 3 decode steps"
    for step, (a, b) in enumerate(zip(official["kept"], ours["kept"])):
        assert len(a) == min(RANK, len(valid)) and set(a) <= valid, f"{size} step {step}: official kept padding"
        assert b == a, f"{size} step {step}: official only {sorted(set(a) - set(b))[:8]}, ours only {sorted(set(b) - set(a))[:8]}"
