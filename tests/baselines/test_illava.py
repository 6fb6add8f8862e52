"""iLLaVA (native, LLaVA-OneVision's Qwen2 LLM stage): patches/iLLaVA apply at the pin, and a tiny random Qwen2
through the fork's Qwen2ForCausalLM.forward_illava (tests/baselines/illava_probe.py, in subprocesses) behaves as
issues 3 and 5 ask, at both ranking sites (cache branch: generate, prefill + decode; no-cache branch: one forward):

- DEBIAS=off: kept positions, per-layer lengths, decode positions, tokens and logits bit-identical to upstream;
- pad / full (pad-mode context): no padding token is kept, and the kept count is capped to the valid tokens
  (the merge count r is raised); decoding continues at the original positions on the shorter cache;
- pos: with exactly tied scores the kept set is the earliest positions.

Geometry: 14-token prefix, 729 visual tokens (27×27), iLLaVA's image setting keep 0.7 (r = 219), pruned at
layer 2 from layer 1's attention. The pad context uses grid 27 at 378 px (27 SigLIP patches of 14 px).
Environment: .venv-iLLaVA (transformers 4.46.0 wheel for the fork's dependencies; the fork on PYTHONPATH).
"""
from __future__ import annotations

import json
import py_compile
from pathlib import Path

import pytest
import torch

from tests import support
from tests.baselines.contract import BaselineContract, Run, pytest_generate_tests  # noqa: F401 (the hook)

pytestmark = pytest.mark.baseline

NAME = "iLLaVA"
PROBE = Path(__file__).with_name("illava_probe.py")
FORK = Path("src/transformers-4.46.0/src")
QWEN2 = FORK / "transformers/models/qwen2/modeling_qwen2.py"
LMMS = Path("src/lmms_eval-0.2.4/lmms_eval/models/llava_onevision_training_free.py")
PREFIX, N, KEEP, LAYERS = 14, 729, 0.7, 3
R = round(N * (1 - KEEP))  # iLLaVA's merge count for keep ratio 0.7
MAX_PATCH_LINES = 80
GRID, RESOLUTION = 27, 378  # pad geometry: 27 SigLIP patches of 14 px


@pytest.fixture(scope="module")
def env():
    support.require_populated(NAME)
    support.require_transformers("4.46", NAME)
    support.require_module("safetensors", "the iLLaVA probe saves its tiny weights as safetensors", NAME)


@pytest.fixture(scope="module")
def trees(env, tmp_path_factory):
    return {"pristine": support.pristine_tree(NAME, tmp_path_factory.mktemp("illava-pristine")),
            "patched": support.patched_tree(NAME, tmp_path_factory.mktemp("illava-patched"))}


@pytest.fixture(scope="module")
def probe(trees, tmp_path_factory):
    """probe(tree, debias, size, *flags) -> the probe's JSON; same weights for every run, results memoised."""
    tmp = tmp_path_factory.mktemp("illava-weights")
    weights = tmp / "tiny.safetensors"
    trend = tmp / "trend.json"  # a calibrated-trend file as DEBIAS_TREND=<file> takes it (no paper trend for Qwen2)
    trend.write_text(json.dumps({"form": "exponential", "a": 1.0, "b": 3e-3, "n": N}))
    support.run_probe(PROBE, [trees["pristine"] / FORK], ["init", "--weights", str(weights)])
    memo = {}

    def run(tree, debias, size=(640, 200), *flags):
        key = (tree, debias, tuple(size), flags)
        if key not in memo:
            args = ["run", "--weights", str(weights), "--debias", debias, "--image-size", *map(str, size), *flags]
            if debias in ("pos", "full"):
                args += ["--trend", str(trend)]
            memo[key] = support.run_probe(PROBE, [trees[tree] / FORK], args)
        return memo[key]

    return run


def assert_decode_on_original_positions(out):
    """Decode step s: every layer's position id is the unpruned length + s (iLLaVA keeps original positions),
    while a pruned layer's KV cache holds its prefill length + s."""
    for step, layers in enumerate(out["decode"]):
        for layer, (pos, kv) in enumerate(layers):
            assert pos == out["prefill"][0] + step, f"decode step {step + 1}, layer {layer}: position id {pos}"
            assert kv == out["prefill"][layer] + step, f"decode step {step + 1}, layer {layer}: KV length {kv}"


# -- the series ---------------------------------------------------------------------------------------------

def test_series_applies_at_pin_with_git_apply_check(env, tmp_path):
    tree = support.pristine_tree(NAME, tmp_path / "tree")
    support.apply_series(NAME, tree, ["0001", "0002"])
    text = (tree / QWEN2).read_text()
    assert text.count("debias_core.debias(") == 2 and text.count("debias_core.keep_cap(") == 2  # both sites
    # the lmms-eval plumbing is not run here (it needs lmms-eval, accelerate, decord and LLaVA-OneVision's
    # llava 1.7): it is checked to compile and to open the per-request context around generate
    py_compile.compile(str(tree / LMMS), doraise=True, cfile=str(tmp_path / "lmms.pyc"))
    assert "debias_core.sample(" in (tree / LMMS).read_text()


def test_series_within_line_budget(env):
    support.check_line_budget(NAME, MAX_PATCH_LINES)


def test_apply_patches_script_applies_reapplies_and_reverses(env, tmp_path):
    support.check_apply_patches_roundtrip(NAME, tmp_path)


# -- the model: the baseline contract (tests/baselines/contract.py) -------------------------------------------

SIZES = {"640x200": ((640, 200), 243), "200x1000": ((200, 1000), 135)}
SITES = {"cache-site": (), "no-cache-site": ("--no-cache",)}


def _run(out) -> Run:
    """A probe result in the contract's terms: forward_illava ranks once, at layer 2."""
    return Run(kept=[out["kept"]], tokens=out["sequences"], logits={"logits": out["logits"]},
               extra={k: out[k] for k in ("r", "prefill", "decode")})


@pytest.fixture(scope="module")
def results(probe):
    """What the contract's hooks receive: the probe runner."""
    return probe


class TestContract(BaselineContract):
    pytestmark = [pytest.mark.slow]
    span = N
    off_cases = [*SITES, "no-context"]  # no-context: DEBIAS=off needs no context (an unpatched caller works)
    padded_cases = [f"{mode}-{size}-{site}" for mode in ("pad", "full") for size in SIZES for site in SITES]
    pos_cases = list(SITES)

    def off_pair(self, probe, case):
        if case == "no-context":
            return _run(probe("pristine", "off", (640, 200))), _run(probe("patched", "off", (640, 200), "--no-context"))
        flags = SITES[case]
        return _run(probe("pristine", "off", (640, 200), *flags)), _run(probe("patched", "off", (640, 200), *flags))

    def check_off(self, probe, case, upstream, ours):
        assert ours.extra["r"] == upstream.extra["r"] == R
        assert ours.extra["prefill"] == upstream.extra["prefill"] == [PREFIX + N + 6] * 2 + [PREFIX + N - R + 6]

    def padded(self, probe, case):
        mode, key, site = case.split("-", 2)
        size, n_valid = SIZES[key]
        valid = support.valid_positions(size, 0.5, GRID, RESOLUTION)
        assert len(valid) == n_valid
        assert n_valid < N - R, "the cap must bite for this image size"
        return _run(probe("patched", mode, size, *SITES[site])), valid, [n_valid]

    def check_padded(self, probe, case, run, valid):
        mode, key, site = case.split("-", 2)
        out = probe("patched", mode, SIZES[key][0], *SITES[site])
        n_valid = len(valid)
        assert out["n_kept"] == n_valid and out["r"] == N - n_valid
        assert out["prefill"][-1] == PREFIX + n_valid + 6
        assert_decode_on_original_positions(out)

    def pos_pair(self, probe, site):
        tied = probe("patched", "off", (640, 200), "--flat", *SITES[site])
        return _run(tied), _run(probe("patched", "pos", (640, 200), "--flat", *SITES[site]))

    def check_pos(self, probe, site, tied, ours):
        assert ours.kept[0] == list(range(N - R)), f"pos kept {ours.kept[0][-10:]} at the end"
        assert sum(tied.kept[0]) > sum(ours.kept[0]), (
            "with tied scores upstream's ranking already kept the earliest positions, so this check cannot show "
            "the change")
        assert_decode_on_original_positions(ours.extra)

    def entry(self, probe):
        """forward_illava through generate with DEBIAS=full and no padding."""
        return _run(probe("patched", "full", (500, 500)))

    def check_entry(self, probe, ours):
        """Upstream's count, a kept set pulled to earlier positions by the positional weight, and decoding that
        runs on the pruned cache."""
        upstream = _run(probe("pristine", "off", (500, 500)))
        assert ours.extra["r"] == upstream.extra["r"] == R and ours.extra["prefill"] == upstream.extra["prefill"]
        mean = lambda kept: sum(kept) / len(kept)  # noqa: E731
        assert mean(ours.kept[0]) < mean(upstream.kept[0])
        assert len(ours.tokens[0]) == len(upstream.tokens[0]) == 4
        assert torch.isfinite(torch.tensor(ours.logits["logits"])).all()
        assert_decode_on_original_positions(ours.extra)
