"""iLLaVA on LLaVA-1.5 (the port in patches/LLaVA): the series applies at the pin, and a tiny random LLaVA-1.5
(eval/tiny_llava.py, 3 decoder layers) through upstream LLaVA's loader, preprocessing and
LlavaLlamaForCausalLM.generate (tests/baselines/llava_illava_probe.py, in subprocesses) behaves as the project requires:

- port disabled (the default): tokens and logits bit-identical to unpatched LLaVA;
- port enabled, DEBIAS=off: iLLaVA's procedure at layer K = 2 (128 visual tokens kept: 127 + the merge host),
  original position ids kept, decoding on the shorter cache of layer 2, deterministic; on a text-only prompt
  its forward is bit-identical to upstream's;
- pad / full: no padding token is kept, and the kept count is capped to the valid tokens;
- pos: with exactly tied scores the kept set is the earliest positions.

Environment: the main test env (.venv-test: transformers 4.37.2, llava-torch); the exported LLaVA tree on
PYTHONPATH shadows the installed llava-torch in the probe's interpreter.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests import support
from tests.baselines.contract import BaselineContract, Run, pytest_generate_tests  # noqa: F401 (the hook)

pytestmark = pytest.mark.baseline

NAME = "LLaVA"
PROBE = Path(__file__).with_name("llava_illava_probe.py")
PORT = Path("llava/model/language_model/illava_llama.py")
N, KEEP, LAYERS = 576, 128, 3
TREND = "paper:fastv"  # at K = 2 the port ranks by FastV's K = 2 score (last token, layer 1, head mean)
MAX_PATCH_LINES = 170


@pytest.fixture(scope="module")
def env():
    support.require_populated(NAME)
    support.require_transformers("4.37", NAME)
    support.require_module("sentencepiece", "eval/tiny_llava.py trains the tiny model's tokenizer")
    if not (support.ROOT / "eval" / "tiny_llava.py").exists():
        pytest.skip("eval/tiny_llava.py (build_tiny_llava) is missing, so the iLLaVA port was not run")


@pytest.fixture(scope="module")
def trees(env, tmp_path_factory):
    return {"pristine": support.pristine_tree(NAME, tmp_path_factory.mktemp("llava-pristine")),
            "patched": support.patched_tree(NAME, tmp_path_factory.mktemp("llava-patched"))}


@pytest.fixture(scope="module")
def probe(trees, tmp_path_factory):
    """probe(tree, *flags, debias="off", size=(640, 200)) -> the probe's JSON; one tiny model for every run."""
    out = tmp_path_factory.mktemp("llava-illava")
    support.run_probe(PROBE, [trees["pristine"]], ["init", str(out)])
    memo = {}

    def run(tree, *flags, debias="off", size=(640, 200), again=False):
        key = (tree, flags, debias, tuple(size), again)
        if key not in memo:
            args = ["run", str(out), "--debias", debias, "--image-size", *map(str, size), *flags]
            if debias in ("pos", "full"):
                args += ["--trend", TREND]
            memo[key] = support.run_probe(PROBE, [trees[tree]], args)
        return memo[key]

    return run


def assert_pruned_decoding(out, kept):
    """Prefill: layers before K see the whole prompt, layer K the prompt less the merged tokens. Decode step s:
    every layer's position id is the original one (prompt length + s), layer K's KV cache its prefill + s."""
    full = out["prefill"][0]
    assert out["prefill"] == [full] * 2 + [full - N + kept]
    for step, layers in enumerate(out["decode"]):
        for layer, (pos, kv) in enumerate(layers):
            assert pos == full + step, f"decode step {step + 1}, layer {layer}: position id {pos}"
            assert kv == out["prefill"][layer] + step, f"decode step {step + 1}, layer {layer}: KV length {kv}"


# -- the series ---------------------------------------------------------------------------------------------

def test_series_applies_at_pin_with_git_apply_check(env, tmp_path):
    tree = support.pristine_tree(NAME, tmp_path / "tree")
    support.apply_series(NAME, tree, ["0001", "0002"])
    text = (tree / PORT).read_text()
    assert text.count("debias_core.debias(") == 1 and text.count("debias_core.keep_cap(") == 1


def test_series_within_line_budget(env):
    support.check_line_budget(NAME, MAX_PATCH_LINES)


def test_apply_patches_script_applies_reapplies_and_reverses(env, tmp_path):
    """scripts/apply_patches.sh on a temp superproject whose third_party/LLaVA is a shared clone at the pin."""
    support.check_apply_patches_roundtrip(NAME, tmp_path)


# -- the model ----------------------------------------------------------------------------------------------

MERGE_CHECK = """
import json, torch
from llava.model.language_model.illava_llama import merge
s0, n, r, d = 3, 8, 4, 5
torch.manual_seed(0)
hidden = torch.randn(1, s0 + n + 2, d, dtype=torch.float64)
scores = torch.tensor([0.9, 0.1, 0.8, 0.3, float('-inf'), 0.7, float('-inf'), 0.2], dtype=torch.float64)
low = s0 + scores.topk(n).indices[n - r - 1:]      # the r+1 lowest-ranked, host first
rank_weights = torch.arange(1, r + 2, dtype=torch.float64)
content = scores[low - s0].isfinite()
masked = (rank_weights * content) @ hidden[0, low] / (rank_weights * content).sum()
unmasked = rank_weights @ hidden[0, low] / rank_weights.sum()
kept = merge(hidden, scores, s0, r)
host = hidden[0, low[0]]
print(json.dumps({"padding_in_low": int((~content).sum()), "kept": kept.tolist(),
                  "host_is_content_mean": bool(torch.allclose(host, masked, rtol=0, atol=1e-12)),
                  "masking_matters": bool(not torch.allclose(masked, unmasked, rtol=0, atol=1e-6))}))
"""


def test_merge_gives_suppressed_padding_no_weight(trees, tmp_path):
    """iLLaVA weights the r+1 lowest-ranked tokens 1..r+1 (the lowest gets the most); suppressed padding ranks
    lowest, so without 0002's zero weight the merged token would be mostly padding."""
    script = tmp_path / "merge_check.py"
    script.write_text(MERGE_CHECK + "\n")
    out = support.run_probe(script, [trees["patched"]], [])
    assert out["padding_in_low"] == 2, "the constructed scores must put padding among the merged tokens"
    assert out["masking_matters"], "the constructed case cannot tell a masked merge from iLLaVA's (vacuous)"
    assert out["host_is_content_mean"], "the merge host is not the weighted mean of the non-padding merged tokens"
    assert 4 + 3 not in out["kept"] and 6 + 3 not in out["kept"], "a padding token was kept"


@pytest.mark.slow
def test_enabled_port_on_a_text_only_prompt_is_upstream(probe):
    """Nothing to merge: the port's layer loop computes exactly what LlamaModel.forward does (eager, fp32)."""
    upstream, ours = probe("pristine", "--text-only"), probe("patched", "--text-only", "--illava")
    assert ours["prefill"] == upstream["prefill"] and ours["decode"] == upstream["decode"]
    assert ours["sequences"] == upstream["sequences"]
    assert torch.equal(torch.tensor(ours["logits"]), torch.tensor(upstream["logits"]))


@pytest.mark.slow
def test_enabled_port_merges_keeps_positions_and_decodes(probe):
    upstream, ours = probe("pristine"), probe("patched", "--illava")
    assert len(ours["kept"]) == KEEP and ours["kept"] == sorted(set(ours["kept"]))
    assert set(ours["kept"]) <= set(range(N))
    assert_pruned_decoding(ours, KEEP)
    assert ours["logits"] != upstream["logits"], "merging 449 of 576 visual tokens left the logits unchanged"
    again = probe("patched", "--illava", again=True)
    assert again["kept"] == ours["kept"] and torch.equal(torch.tensor(again["logits"]), torch.tensor(ours["logits"]))


@pytest.mark.slow
def test_enabled_port_ranks_the_same_with_sdpa_and_without_cache(probe):
    """sdpa (LLaVA's default attention) falls back to eager for the ranking layer; use_cache=False re-prunes
    the whole sequence every step, so its first prefill is the cached run's."""
    eager = probe("patched", "--illava")
    sdpa, no_cache = probe("patched", "--illava", "--attn", "sdpa"), probe("patched", "--illava", "--no-cache")
    assert sdpa["kept"] == no_cache["kept"] == eager["kept"]
    assert_pruned_decoding(sdpa, KEEP)
    assert no_cache["prefill"] == eager["prefill"]
    assert torch.equal(torch.tensor(no_cache["logits"][0]), torch.tensor(eager["logits"][0]))


# -- the baseline contract (tests/baselines/contract.py) -----------------------------------------------------

SIZES = {"640x200": ((640, 200), 192), "200x1000": ((200, 1000), 96), "1000x101": ((1000, 101), 48)}


def _run(out) -> Run:
    """A probe result in the contract's terms: the port ranks once, before layer K."""
    return Run(kept=[out["kept"]], tokens=out["sequences"], logits={"logits": out["logits"]},
               extra={k: out[k] for k in ("span_start", "prefill", "decode")})


@pytest.fixture(scope="module")
def results(probe):
    """What the contract's hooks receive: the probe runner."""
    return probe


class TestContract(BaselineContract):
    pytestmark = [pytest.mark.slow]
    off_cases = ["disabled"]  # the port off (its default): upstream LLaVA exactly
    padded_cases = [f"{mode}-{size}" for mode in ("pad", "full") for size in SIZES]
    pos_cases = ["flat"]

    def off_pair(self, probe, case):
        return _run(probe("pristine")), _run(probe("patched"))

    def check_off(self, probe, case, upstream, ours):
        assert ours.kept == upstream.kept == [list(range(N))]

    def padded(self, probe, case):
        mode, key = case.split("-")
        size, n_valid = SIZES[key]
        valid = support.valid_positions(size, 0.5)
        assert len(valid) == n_valid
        return _run(probe("patched", "--illava", debias=mode, size=size)), valid, [min(KEEP, n_valid)]

    def check_padded(self, probe, case, run, valid):
        assert_pruned_decoding(run.extra, len(run.kept[0]))

    def pos_pair(self, probe, case):
        return _run(probe("patched", "--illava", "--flat")), _run(probe("patched", "--illava", "--flat", debias="pos"))

    def check_pos(self, probe, case, tied, ours):
        assert ours.kept[0] == list(range(KEEP)), f"pos kept ... {ours.kept[0][-10:]}"
        assert sum(tied.kept[0]) > sum(ours.kept[0]), (
            "with tied scores the undebiased ranking already kept the earliest positions, so this check cannot "
            "show the change")
        assert_pruned_decoding(ours.extra, KEEP)

    def entry(self, probe):
        """LLaVA's generate end to end with the port and DEBIAS=full (the FastV trend) on an unpadded image."""
        return _run(probe("patched", "--illava", debias="full", size=(500, 500)))

    def check_entry(self, probe, ours):
        """The count is the port's, the kept set moves earlier than without debiasing, and decoding runs."""
        off = _run(probe("patched", "--illava", size=(500, 500)))
        assert len(ours.kept[0]) == len(off.kept[0]) == KEEP
        assert sum(ours.kept[0]) < sum(off.kept[0])
        assert len(ours.tokens[0]) == len(off.tokens[0])
        assert torch.isfinite(torch.tensor(ours.logits["logits"])).all()
        assert_pruned_decoding(ours.extra, KEEP)
