"""TokenCarve: patches/TokenCarve apply at the pin, and a tiny random model of TokenCarve's real architecture
(its own Llama files, loaded with importlib under transformers.models.llama; tests/baselines/tokencarve_probe.py,
in subprocesses) behaves as the project requires:

- DEBIAS=off: AV/SV/fused top-k, kept indices, per-layer lengths, decode positions, tokens and logits
  bit-identical to upstream, through LlamaForCausalLM.generate and through LLaVA's LlavaLlamaForCausalLM;
- pad / full: no padding token is in the AV, SV or fused top-R nor among the kept tokens; R is capped to the
  content tokens, and the merge step keeps upstream's count R - min(R//2, M) with the capped R;
- pos: with content-flat scores carrying a recency trend, the kept set moves to the earliest positions;
- the real entry: LlavaLlamaForCausalLM.generate on a padded image, prefill + 3 decode steps, checked
  against the padding visible in the processed pixels.

Settings: work layer 2, nums 64 (R = 96, M = 32) as in TokenCarve's loader, sys length 35 (the real image
position; the official scripts pass 36), SV/AV weight 0.5, mode 0. Model: 4 layers, 4 heads, hidden 640
(TokenCarve's SVD needs hidden >= 576), 35 + 576 + 20 tokens. Environment: .venv-TokenCarve (or any env with
transformers 4.37); the LLaVA tests also need third_party/LLaVA populated.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests import support
from tests.baselines.contract import BaselineContract, Run, pytest_generate_tests  # noqa: F401 (the hook)

pytestmark = pytest.mark.baseline

NAME = "TokenCarve"
PROBE = Path(__file__).with_name("tokencarve_probe.py")
MODELING = "TokenCarve/modeling_llama.py"
S0, IMAGE, TEXT, NEW_TOKENS = 35, 576, 20, 4
TREND = "paper:tokencarve/gqa"
MAX_PATCH_LINES = 120
THRESHOLD = 0.5                # DEBIAS_METHOD=tokencarve


def counts(nums, n_valid):
    """(R, final visual count) as TokenCarve computes them, with R capped to the content tokens."""
    r = min(int(nums / 2 * 3), n_valid)
    return r, r - min(r // 2, int(nums / 2))


def kept_visual(out) -> list:
    return [i - S0 for i in out["keep"] if S0 <= i < S0 + IMAGE]


@pytest.fixture(scope="module")
def env():
    support.require_populated(NAME)
    support.require_transformers("4.37", NAME)
    support.require_module("safetensors", "the TokenCarve probe saves its tiny weights as safetensors")


@pytest.fixture(scope="module")
def trees(env, tmp_path_factory):
    return {"pristine": support.pristine_tree(NAME, tmp_path_factory.mktemp("tc-pristine")),
            "patched": support.patched_tree(NAME, tmp_path_factory.mktemp("tc-patched"))}


@pytest.fixture(scope="module")
def llava_tree(env, tmp_path_factory):
    """Upstream LLaVA's `llava` package at its pin (TokenCarve runs on it), exported to a temp folder."""
    support.require_populated("LLaVA")
    support.require_module("PIL", "the LLaVA entry preprocesses a padded image with Pillow")
    return support.pristine_tree("LLaVA", tmp_path_factory.mktemp("llava"), paths=["llava"])


@pytest.fixture(scope="module")
def probe(trees, tmp_path_factory):
    """probe(tree, debias, size, llava=None, **options) -> the probe's JSON; same saved weights for every run.
    ``llava``: an exported LLaVA tree, to go through LlavaLlamaForCausalLM.generate instead of TokenCarve's own
    LlamaForCausalLM.generate."""
    weights = tmp_path_factory.mktemp("tc-weights")
    support.run_probe(PROBE, [], ["init", str(weights), "--tree", str(trees["pristine"])])
    memo = {}

    def run(tree, debias, size, llava=None, **options):
        key = (tree, debias, tuple(size), llava, tuple(sorted(options.items())))
        if key in memo:
            return memo[key]
        if llava is not None and not (weights / "projector.safetensors").exists():
            support.run_probe(PROBE, [llava], ["init", str(weights), "--tree", str(trees["pristine"]), "--llava"])
        args = ["run", str(weights), "--tree", str(trees[tree]), "--entry", "lm" if llava is None else "llava",
                "--size", *map(str, size), "--sys-length", str(S0), "--new-tokens", str(NEW_TOKENS)]
        for k, v in options.items():
            args += [f"--{k.replace('_', '-')}", str(v)]
        env = {"DEBIAS": debias, "DEBIAS_METHOD": "tokencarve"}
        if debias in ("pos", "full"):
            env["DEBIAS_TREND"] = TREND
        memo[key] = support.run_probe(PROBE, [] if llava is None else [llava], args, env=env)
        return memo[key]

    return run


def assert_consistent(out, final):
    """Sequence lengths, KV caches and decode positions agree with `final` kept visual tokens."""
    seq = S0 + IMAGE + TEXT
    pruned = S0 + final + TEXT
    keep = out["keep"]
    assert len(keep) == pruned and keep == sorted(set(keep))
    assert keep[:S0] == list(range(S0)) and keep[S0 + final:] == list(range(S0 + IMAGE, seq)), \
        "system or text tokens were dropped"
    assert out["layer_len"] == [seq, seq, pruned, pruned]
    assert out["kv_len"] == [pruned + NEW_TOKENS - 1] * 4, "layers 0-1 (pruned after the fact) and 2-3 disagree"
    assert out["keep_end"] == keep + list(range(seq, seq + NEW_TOKENS - 1)), \
        "decoded tokens must keep their original (unpruned) rotary positions"
    assert len(out["logits"]) == NEW_TOKENS


# -- the series ---------------------------------------------------------------------------------------------

def test_series_applies_at_pin_with_git_apply_check(env, tmp_path):
    tree = support.pristine_tree(NAME, tmp_path / "tree")
    support.apply_series(NAME, tree, ["0001"])
    text = (tree / MODELING).read_text()
    assert text.count("debias_core.debias(") == 1 and text.count("debias_core.keep_cap(") == 1
    assert text.count("debias_core.mask_padding(") == 2


def test_series_within_line_budget(env):
    support.check_line_budget(NAME, MAX_PATCH_LINES)


def test_apply_patches_script_applies_reapplies_and_reverses(env, tmp_path):
    support.check_apply_patches_roundtrip(NAME, tmp_path)


# -- the model ----------------------------------------------------------------------------------------------

# -- the baseline contract (tests/baselines/contract.py) -----------------------------------------------------

def _run(out, rankings=(0, 1, 2)) -> Run:
    """A probe result in the contract's terms: the AV, SV and fused top-R (``rankings`` of them), then the kept
    visual tokens after the merge."""
    return Run(kept=[out["topk"][i]["indices"] for i in rankings] + [kept_visual(out)], tokens=out["tokens"],
               logits={"logits": out["logits"]},
               extra={k: out[k] for k in ("topk", "keep", "keep_end", "layer_len", "kv_len")})


PADDED = {  # case -> (size, nums, n_valid)
    "1000x101": ((1000, 101), 64, 48),    # cap bites, merge takes R//2:  R = 48, final 24
    "400x200": ((400, 200), 256, 288),    # cap bites, merge takes M:     R = 288 (of 384), final 160
    "640x200": ((640, 200), 64, 192),     # no cap:                       R = 96, final 64
}


@pytest.fixture(scope="module")
def results(probe, request):
    """What the contract's hooks receive: the probe and LLaVA's tree (or why it cannot be had here)."""
    try:
        llava = request.getfixturevalue("llava_tree")
    except pytest.skip.Exception as e:
        llava = e
    return {"probe": probe, "llava": llava}


def _llava(results):
    if isinstance(results["llava"], BaseException):
        pytest.skip(f"the LLaVA entry was not tested: {results['llava']}")
    return results["llava"]


class TestContract(BaselineContract):
    pytestmark = [pytest.mark.slow]
    off_cases = ["lm", "llava"]  # TokenCarve's own LlamaForCausalLM.generate, and LLaVA's on top of it
    padded_cases = [f"{mode}-{size}" for mode in ("pad", "full") for size in PADDED]
    pos_cases = ["ramp"]

    def off_pair(self, results, entry):
        llava = _llava(results) if entry == "llava" else None
        size = (1000, 101)   # 48 content tokens < R = 96: upstream keeps padding, `off` must too
        probe = results["probe"]
        return _run(probe("pristine", "off", size, llava)), _run(probe("patched", "off", size, llava))

    def check_off(self, results, entry, upstream, ours):
        assert [c["k"] for c in ours.extra["topk"]] == [c["k"] for c in upstream.extra["topk"]] == [96, 96, 96]
        assert len(ours.kept[-1]) == 64 > len(support.valid_positions((1000, 101), THRESHOLD)), \
            "upstream's count is not capped"
        assert_consistent({**ours.extra, "logits": ours.logits["logits"]}, 64)

    def padded(self, results, case):
        mode, key = case.split("-")
        size, nums, n_valid = PADDED[key]
        valid = support.valid_positions(size, THRESHOLD)
        assert len(valid) == n_valid  # exact expand2square geometry (docs/deviations.md), τ = 0.5
        r, final = counts(nums, n_valid)
        return _run(results["probe"]("patched", mode, size, nums=nums)), valid, [r, r, r, final]

    def check_padded(self, results, case, run, valid):
        r = len(run.kept[0])
        assert [c["k"] for c in run.extra["topk"]] == [r, r, r], "AV, SV and fused top-R must all use the capped R"
        assert set(run.kept[-1]) <= set(run.kept[2]), "a kept token is not in the fused top-R"
        assert_consistent({**run.extra, "logits": run.logits["logits"]}, len(run.kept[-1]))

    def pos_pair(self, results, case):
        """The probe sets layer 1's last-row attention over the image to 1 + 5e-4·i: flat content plus a recency
        trend (the bias the paper removes), on an image without padding (only the positional weight acts). With
        attention alone in the Borda fusion (weight 1) the fused top-R is the AV ranking. The rankings compared
        are the AV score, the fused score and the kept set; the SV score is not attention (pos leaves it)."""
        probe = results["probe"]
        up, ours = (probe("patched", m, (500, 500), ramp=5e-4, sv_av_weight=1.0) for m in ("off", "pos"))
        return _run(up, rankings=(0, 2)), _run(ours, rankings=(0, 2))

    def check_pos(self, results, case, up, ours):
        """The TokenCarve GQA weight exp(-1.67e-3·i) reverses the recency trend."""
        probe = results["probe"]
        assert up.kept[1] == list(range(IMAGE - 1, IMAGE - 97, -1)), "the recency trend did not take"
        assert sorted(ours.kept[1]) == list(range(96)), "pos did not rank the earliest positions first"
        assert set(ours.kept[-1]) <= set(range(96))
        assert_consistent({**ours.extra, "logits": ours.logits["logits"]}, 64)
        # The paper's setting (SV/AV weight 0.5): SV still votes, but the kept set moves well towards the start.
        up, ours = (probe("patched", m, (500, 500), ramp=5e-4) for m in ("off", "pos"))
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        assert mean(kept_visual(ours)) < IMAGE / 2 < mean(kept_visual(up)), (
            f"kept mean position: off {mean(kept_visual(up)):.0f}, pos {mean(kept_visual(ours)):.0f}")
        # pos does not suppress padding: on a padded image the count stays upstream's
        padded = probe("patched", "pos", (1000, 101))
        assert len(kept_visual(padded)) == 64

    def entry(self, results):
        """LlavaLlamaForCausalLM.generate on TokenCarve's Llama with a padded image (more sizes below)."""
        return _run(results["probe"]("patched", "full", (1000, 101), _llava(results)))


# -- TokenCarve's own -------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("sv_av_mode, ranking", [(1, 1), (2, 0)])
def test_single_score_modes_never_keep_padding(probe, sv_av_mode, ranking):
    """TokenCarve's SV-only (1) and AV-only (2) modes select from that score's top-R directly."""
    size = (1000, 101)
    valid = support.valid_positions(size, THRESHOLD)
    out = probe("patched", "full", size, sv_av_mode=sv_av_mode)
    r, final = counts(64, len(valid))
    top = out["topk"][ranking]["indices"]
    assert out["topk"][ranking]["k"] == r and set(top) <= valid
    assert set(kept_visual(out)) <= set(top) and len(kept_visual(out)) == final
    assert_consistent(out, final)


@pytest.mark.slow
@pytest.mark.parametrize("weight", [1.5, -0.5])
def test_fused_score_masks_padding_for_any_sv_av_weight(probe, weight):
    """With the loader's weight in [0, 1], ranks alone put padding last in the Borda score; outside it (the
    loader accepts any float) padding outranks content unless the fused score itself is masked. Padding in
    the fused top-R would be merged (averaged) into kept tokens even when it is not kept itself."""
    size = (1000, 101)
    valid = support.valid_positions(size, THRESHOLD)
    out = probe("patched", "full", size, sv_av_weight=weight)
    r, final = counts(64, len(valid))
    assert out["topk"][2]["k"] == r and not sorted(set(out["topk"][2]["indices"]) - valid)
    assert len(kept_visual(out)) == final
    assert_consistent(out, final)


@pytest.mark.slow
@pytest.mark.parametrize("size", [(1000, 101), (200, 400)])
def test_llava_generate_entry_full_mode(probe, llava_tree, size):
    """LlavaLlamaForCausalLM.generate on TokenCarve's Llama (as TokenCarve's loader gets it) with a padded
    random-noise image: the kept tokens are content in the processed pixels themselves."""
    out = probe("patched", "full", size, llava_tree)
    pixel_pad = out["pixel_pad"]
    valid = support.valid_positions(size, THRESHOLD)
    assert {i for i, f in enumerate(pixel_pad) if f <= 0.5} == valid, "pixel padding disagrees with the geometry"
    r, final = counts(64, len(valid))
    assert [c["k"] for c in out["topk"]] == [r, r, r]
    kept = kept_visual(out)
    assert len(kept) == final
    assert max(pixel_pad[i] for i in kept) <= 0.5, "a kept token is mostly padding pixels"
    assert_consistent(out, final)
    assert len(out["tokens"]) >= NEW_TOKENS
