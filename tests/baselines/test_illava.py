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


# -- the model ----------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("flags", [(), ("--no-cache",)], ids=["cache-site", "no-cache-site"])
def test_off_is_bit_identical_to_upstream(probe, flags):
    upstream, ours = probe("pristine", "off", (640, 200), *flags), probe("patched", "off", (640, 200), *flags)
    assert ours["r"] == upstream["r"] == R
    assert ours["kept"] == upstream["kept"]
    assert ours["prefill"] == upstream["prefill"] == [PREFIX + N + 6] * 2 + [PREFIX + N - R + 6]
    assert ours["decode"] == upstream["decode"] and ours["sequences"] == upstream["sequences"]
    assert torch.equal(torch.tensor(ours["logits"], dtype=torch.float32),
                       torch.tensor(upstream["logits"], dtype=torch.float32))


@pytest.mark.slow
def test_off_without_a_sample_context_is_upstream(probe):
    """DEBIAS=off needs no context at all (an unpatched caller keeps working)."""
    upstream, ours = probe("pristine", "off", (640, 200)), probe("patched", "off", (640, 200), "--no-context")
    assert ours["kept"] == upstream["kept"] and ours["logits"] == upstream["logits"]


@pytest.mark.slow
@pytest.mark.parametrize("flags", [(), ("--no-cache",)], ids=["cache-site", "no-cache-site"])
@pytest.mark.parametrize("mode", ["pad", "full"])
@pytest.mark.parametrize("size, n_valid", [((640, 200), 243), ((200, 1000), 135)])
def test_padding_is_never_kept_and_the_count_is_capped(probe, mode, size, n_valid, flags):
    valid = support.valid_positions(size, 0.5, GRID, RESOLUTION)
    assert len(valid) == n_valid
    assert n_valid < N - R, "the cap must bite for this image size"
    out = probe("patched", mode, size, *flags)
    assert out["n_kept"] == n_valid and out["r"] == N - n_valid
    padding = sorted(set(out["kept"]) - valid)
    assert not padding, f"{mode}: padding tokens {padding[:10]} kept for {size}"
    assert out["prefill"][-1] == PREFIX + n_valid + 6
    assert_decode_on_original_positions(out)


@pytest.mark.slow
@pytest.mark.parametrize("flags", [(), ("--no-cache",)], ids=["cache-site", "no-cache-site"])
def test_pos_keeps_the_earliest_positions_when_scores_are_flat(probe, flags):
    tied = probe("patched", "off", (640, 200), "--flat", *flags)
    ours = probe("patched", "pos", (640, 200), "--flat", *flags)
    assert ours["kept"] == list(range(N - R)), f"pos kept {ours['kept'][-10:]} at the end"
    assert sum(tied["kept"]) > sum(ours["kept"]), (
        "with tied scores upstream's ranking already kept the earliest positions, so this check cannot show the change")
    assert_decode_on_original_positions(ours)


@pytest.mark.slow
def test_generate_full_mode_on_a_square_image(probe):
    """forward_illava through generate with DEBIAS=full and no padding: upstream's count, a kept set pulled to
    earlier positions by the positional weight, and decoding that runs on the pruned cache."""
    upstream, ours = probe("pristine", "off", (500, 500)), probe("patched", "full", (500, 500))
    assert ours["r"] == upstream["r"] == R and ours["prefill"] == upstream["prefill"]
    assert sum(ours["kept"]) / len(ours["kept"]) < sum(upstream["kept"]) / len(upstream["kept"])
    assert len(ours["sequences"][0]) == len(upstream["sequences"][0]) == 4
    assert torch.isfinite(torch.tensor(ours["logits"])).all()
    assert_decode_on_original_positions(ours)
