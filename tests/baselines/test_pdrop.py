"""PyramidDrop: patches/PyramidDrop apply at the pin, and a tiny random LLaVA-1.5 run through PDrop's own
LlavaLlamaForCausalLM_PDrop.generate (tests/baselines/pdrop_probe.py, in subprocesses) behaves as issue 3 asks:

- DEBIAS=off: kept indices, per-layer lengths, decode positions, tokens and logits bit-identical to upstream;
- pad / full: no padding token survives any of the three stages; keep counts capped, and the capped counts
  drive the later stages and the decode position shift (position id == that layer's KV length);
- pos: with exactly tied scores the kept set moves to the earliest positions.

Schedule: layer_list [1, 2, 3] (every stage reachable in 4 layers), ratios [1.0, 0.32, 0.16, 0.08] (the paper's),
pad threshold 0.01 (DEBIAS_METHOD=pdrop). Environment: .venv-PyramidDrop (or any env with transformers 4.37).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests import support

pytestmark = pytest.mark.baseline

NAME = "PyramidDrop"
PROBE = Path(__file__).with_name("pdrop_probe.py")
RATIOS = [0.32, 0.16, 0.08]
TEXT_TOKENS = 35 + 4
TREND = "paper:pdrop/gqa"
MAX_PATCH_LINES = 120
THRESHOLD = 0.01               # DEBIAS_METHOD=pdrop: the paper's pad threshold


@pytest.fixture(scope="module")
def env():
    support.require_populated(NAME)
    support.require_transformers("4.37", NAME)
    support.require_module("safetensors", "the PyramidDrop probe saves its tiny weights as safetensors")


@pytest.fixture(scope="module")
def trees(env, tmp_path_factory):
    return {"pristine": support.pristine_tree(NAME, tmp_path_factory.mktemp("pdrop-pristine")),
            "patched": support.patched_tree(NAME, tmp_path_factory.mktemp("pdrop-patched"))}


@pytest.fixture(scope="module")
def probe(trees, tmp_path_factory):
    """probe(tree, debias, size, flat=False) -> the probe's JSON; same weights for every run, results memoised."""
    weights = tmp_path_factory.mktemp("pdrop-weights") / "tiny.safetensors"
    support.run_probe(PROBE, [trees["pristine"]], ["init", "--weights", str(weights)])
    memo = {}

    def run(tree, debias, size, flat=False):
        key = (tree, debias, tuple(size), flat)
        if key not in memo:
            args = ["run", "--weights", str(weights), "--debias", debias, "--image-size", *map(str, size)]
            if debias in ("pos", "full"):
                args += ["--trend", TREND]
            memo[key] = support.run_probe(PROBE, [trees[tree]], args + (["--flat"] if flat else []))
        return memo[key]

    return run


def assert_decode_consistent(out):
    """At every decode step, each layer's position id equals its KV-cache length (the rotary position the
    next token really has), and that length is the prefill length this layer kept plus the steps so far."""
    for step, layers in enumerate(out["decode"]):
        for layer, (pos, kv) in enumerate(layers):
            assert pos == kv == out["prefill"][layer] + step, (
                f"decode step {step + 1}, layer {layer}: position id {pos}, KV length {kv}, "
                f"prefill length {out['prefill'][layer]}")


# -- the series ---------------------------------------------------------------------------------------------

def test_series_applies_at_pin_with_git_apply_check(env, tmp_path):
    tree = support.pristine_tree(NAME, tmp_path / "tree")
    support.apply_series(NAME, tree, ["0001", "0002", "0003"])
    text = (tree / "llava/model/modeling_llama_pdrop.py").read_text()
    assert text.count("debias_core.debias(") == 1 and text.count("debias_core.keep_cap(") == 1


def test_series_within_line_budget(env):
    support.check_line_budget(NAME, MAX_PATCH_LINES)


def test_apply_patches_script_applies_reapplies_and_reverses(env, tmp_path):
    support.check_apply_patches_roundtrip(NAME, tmp_path)


# -- the model ----------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("size", [(640, 200), (1000, 101)])
def test_off_is_bit_identical_to_upstream(probe, size):
    upstream, ours = probe("pristine", "off", size), probe("patched", "off", size)
    assert ours["k"] == upstream["k"] == [int(576 * r) for r in RATIOS]
    assert ours["kept"] == upstream["kept"]
    assert ours["prefill"] == upstream["prefill"] and ours["decode"] == upstream["decode"]
    assert ours["sequences"] == upstream["sequences"]
    assert torch.equal(torch.tensor(ours["logits"], dtype=torch.float32),
                       torch.tensor(upstream["logits"], dtype=torch.float32))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["pad", "full"])
@pytest.mark.parametrize("size, n_valid", [((640, 200), 144), ((1000, 101), 48)])
def test_padding_never_survives_and_counts_stay_consistent(probe, mode, size, n_valid):
    valid = support.valid_positions(size, THRESHOLD)
    assert len(valid) == n_valid  # UPSTREAM.md §4.5 table, τ = 0.01
    out = probe("patched", mode, size)
    expected_k = [min(int(576 * r), n_valid) for r in RATIOS]
    assert expected_k != [int(576 * r) for r in RATIOS], "the cap must bite for this image size"
    assert out["k"] == expected_k
    for stage, kept in enumerate(out["kept"]):
        assert len(kept) == expected_k[stage]
        padding = sorted(set(kept) - valid)
        assert not padding, f"{mode}: padding tokens {padding[:10]} survived stage {stage} of {size}"
        if stage:
            assert set(kept) <= set(out["kept"][stage - 1]), f"stage {stage} kept a token dropped earlier"
    assert out["prefill"] == [TEXT_TOKENS + 576] + [TEXT_TOKENS + k for k in expected_k]
    assert_decode_consistent(out)


@pytest.mark.slow
def test_pos_moves_the_kept_set_to_earlier_positions_when_scores_are_flat(probe):
    size = (640, 200)  # pos does not suppress padding; the geometry is irrelevant here
    tied, ours = probe("patched", "off", size, flat=True), probe("patched", "pos", size, flat=True)
    for stage, k in enumerate(int(576 * r) for r in RATIOS):
        assert ours["kept"][stage] == list(range(k)), f"pos stage {stage}: {ours['kept'][stage][:10]}..."
        assert sum(tied["kept"][stage]) > sum(ours["kept"][stage]), (
            f"stage {stage}: with tied scores upstream's top-k already kept the earliest {k} positions, "
            f"so this check cannot show the change")
    assert_decode_consistent(ours)


@pytest.mark.slow
def test_generate_entry_full_mode_on_a_square_image(probe):
    """LlavaLlamaForCausalLM_PDrop.generate end to end with DEBIAS=full and no padding: the counts are
    upstream's, the positional weight pulls the kept set earlier than upstream's, and decoding runs."""
    size = (500, 500)
    assert len(support.valid_positions(size, THRESHOLD)) == 576
    upstream, ours = probe("pristine", "off", size), probe("patched", "full", size)
    assert ours["k"] == upstream["k"] == [int(576 * r) for r in RATIOS]
    assert ours["prefill"] == upstream["prefill"]
    for stage in range(len(RATIOS)):
        mean = lambda kept: sum(kept) / len(kept)  # noqa: E731
        assert mean(ours["kept"][stage]) < mean(upstream["kept"][stage]), f"stage {stage}"
    assert len(ours["sequences"][0]) == len(upstream["sequences"][0])
    assert torch.isfinite(torch.tensor(ours["logits"])).all()
    assert_decode_consistent(ours)
