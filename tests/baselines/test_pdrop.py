"""PyramidDrop: patches/PyramidDrop apply at the pin, and a tiny random LLaVA-1.5 run through PDrop's own
LlavaLlamaForCausalLM_PDrop.generate (tests/baselines/pdrop_probe.py, in subprocesses) behaves as the project requires:

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
from tests.baselines.contract import BaselineContract, Run, pytest_generate_tests  # noqa: F401 (the hook)

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


# -- the model: the baseline contract (tests/baselines/contract.py) -------------------------------------------

SIZES = {"640x200": ((640, 200), 144), "1000x101": ((1000, 101), 48)}  # (W, H), valid tokens at τ = 0.01
SQUARE = (500, 500)


def _run(out) -> Run:
    """The probe's result in the contract's terms: one ranking per stage (prefill; PDrop ranks once)."""
    return Run(kept=out["kept"], tokens=out["sequences"], logits={"logits": out["logits"]},
               extra={"k": out["k"], "prefill": out["prefill"], "decode": out["decode"]})


@pytest.fixture(scope="module")
def results(probe):
    """What the contract's hooks receive: the probe runner."""
    return probe


class TestContract(BaselineContract):
    pytestmark = [pytest.mark.slow]
    off_cases = list(SIZES)
    padded_cases = [f"{mode}-{size}" for mode in ("pad", "full") for size in SIZES]
    pos_cases = ["flat-640x200"]  # pos does not suppress padding; the geometry is irrelevant here

    def off_pair(self, probe, case):
        size = SIZES[case][0]
        return _run(probe("pristine", "off", size)), _run(probe("patched", "off", size))

    def check_off(self, probe, case, upstream, ours):
        assert ours.extra["k"] == upstream.extra["k"] == [int(576 * r) for r in RATIOS]

    def padded(self, probe, case):
        mode, size_key = case.split("-")
        (size, n_valid), valid = SIZES[size_key], support.valid_positions(SIZES[size_key][0], THRESHOLD)
        assert len(valid) == n_valid  # exact expand2square geometry (docs/deviations.md), τ = 0.01
        expected_k = [min(int(576 * r), n_valid) for r in RATIOS]
        assert expected_k != [int(576 * r) for r in RATIOS], "the cap must bite for this image size"
        return _run(probe("patched", mode, size)), valid, expected_k

    def check_padded(self, probe, case, run, valid):
        expected_k = [len(kept) for kept in run.kept]
        assert run.extra["k"] == expected_k
        for stage in range(1, len(run.kept)):
            assert set(run.kept[stage]) <= set(run.kept[stage - 1]), f"stage {stage} kept a token dropped earlier"
        assert run.extra["prefill"] == [TEXT_TOKENS + 576] + [TEXT_TOKENS + k for k in expected_k]
        assert_decode_consistent(run.extra)

    def pos_pair(self, probe, case):
        size = SIZES[case.split("-")[1]][0]
        return _run(probe("patched", "off", size, flat=True)), _run(probe("patched", "pos", size, flat=True))

    def check_pos(self, probe, case, tied, ours):
        for stage, k in enumerate(int(576 * r) for r in RATIOS):
            assert ours.kept[stage] == list(range(k)), f"pos stage {stage}: {ours.kept[stage][:10]}..."
            assert sum(tied.kept[stage]) > sum(ours.kept[stage]), (
                f"stage {stage}: with tied scores upstream's top-k already kept the earliest {k} positions, "
                f"so this check cannot show the change")
        assert_decode_consistent(ours.extra)

    def entry(self, probe):
        """LlavaLlamaForCausalLM_PDrop.generate end to end with DEBIAS=full and no padding."""
        assert len(support.valid_positions(SQUARE, THRESHOLD)) == 576
        return _run(probe("patched", "full", SQUARE))

    def check_entry(self, probe, ours):
        """The counts are upstream's, the positional weight pulls the kept set earlier than upstream's, and
        decoding runs."""
        upstream = _run(probe("pristine", "off", SQUARE))
        assert ours.extra["k"] == upstream.extra["k"] == [int(576 * r) for r in RATIOS]
        assert ours.extra["prefill"] == upstream.extra["prefill"]
        for stage in range(len(RATIOS)):
            mean = lambda kept: sum(kept) / len(kept)  # noqa: E731
            assert mean(ours.kept[stage]) < mean(upstream.kept[stage]), f"stage {stage}"
        assert len(ours.tokens[0]) == len(upstream.tokens[0])
        assert torch.isfinite(torch.tensor(ours.logits["logits"])).all()
        assert_decode_consistent(ours.extra)
