"""TokenCarve: patches/TokenCarve apply at the pin, and a tiny random model of TokenCarve's real architecture
(its own Llama files, loaded with importlib under transformers.models.llama; tests/baselines/tokencarve_probe.py,
in subprocesses) behaves as issue 3 asks:

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

@pytest.mark.slow
@pytest.mark.parametrize("entry", ["lm", "llava"])
def test_off_is_bit_identical_to_upstream(probe, entry, request):
    llava = request.getfixturevalue("llava_tree") if entry == "llava" else None
    size = (1000, 101)   # 48 content tokens < R = 96: upstream keeps padding, `off` must too
    upstream, ours = probe("pristine", "off", size, llava), probe("patched", "off", size, llava)
    assert [c["k"] for c in ours["topk"]] == [c["k"] for c in upstream["topk"]] == [96, 96, 96]
    assert ours["topk"] == upstream["topk"]
    assert ours["keep"] == upstream["keep"] and ours["keep_end"] == upstream["keep_end"]
    assert ours["layer_len"] == upstream["layer_len"] and ours["kv_len"] == upstream["kv_len"]
    assert ours["tokens"] == upstream["tokens"]
    assert torch.equal(torch.tensor(ours["logits"], dtype=torch.float32),
                       torch.tensor(upstream["logits"], dtype=torch.float32))
    assert len(kept_visual(ours)) == 64 > len(support.valid_positions(size, THRESHOLD)), \
        "upstream's count is not capped"
    assert_consistent(ours, 64)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["pad", "full"])
@pytest.mark.parametrize("size, nums, n_valid", [
    ((1000, 101), 64, 48),    # cap bites, merge takes R//2:  R = 48, final 24
    ((400, 200), 256, 288),   # cap bites, merge takes M:     R = 288 (of 384), final 160
    ((640, 200), 64, 192),    # no cap:                       R = 96, final 64
])
def test_padding_never_survives_and_counts_stay_consistent(probe, mode, size, nums, n_valid):
    valid = support.valid_positions(size, THRESHOLD)
    assert len(valid) == n_valid  # UPSTREAM.md §4.5 table, τ = 0.5
    out = probe("patched", mode, size, nums=nums)
    r, final = counts(nums, n_valid)
    assert [c["k"] for c in out["topk"]] == [r, r, r], "AV, SV and fused top-R must all use the capped R"
    for stage, call in zip(("AV", "SV", "fused"), out["topk"]):
        padding = sorted(set(call["indices"]) - valid)
        assert not padding, f"{mode}: padding tokens {padding[:10]} are in the {stage} top-{r} for {size}"
    kept = kept_visual(out)
    assert len(kept) == final
    assert set(kept) <= set(out["topk"][2]["indices"]), "a kept token is not in the fused top-R"
    assert not sorted(set(kept) - valid), f"{mode}: padding survived pruning for {size}"
    assert_consistent(out, final)


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
def test_pos_moves_the_kept_set_to_earlier_positions_when_scores_are_flat(probe):
    """The probe sets layer 1's last-row attention over the image to 1 + 5e-4·i: flat content plus a recency
    trend (the bias the paper removes). The TokenCarve GQA weight exp(-1.67e-3·i) reverses that trend."""
    size = (500, 500)   # no padding: only the positional weight acts
    ramp = 5e-4
    # Attention only in the Borda fusion (weight 1): the fused top-R is exactly the ranking of the AV score.
    up, ours = (probe("patched", m, size, ramp=ramp, sv_av_weight=1.0) for m in ("off", "pos"))
    assert up["topk"][2]["indices"] == list(range(IMAGE - 1, IMAGE - 97, -1)), "the recency trend did not take"
    assert sorted(ours["topk"][2]["indices"]) == list(range(96)), "pos did not rank the earliest positions first"
    assert set(kept_visual(ours)) <= set(range(96))
    assert_consistent(ours, 64)
    # The paper's setting (SV/AV weight 0.5): SV still votes, but the kept set moves well towards the start.
    up, ours = (probe("patched", m, size, ramp=ramp) for m in ("off", "pos"))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert mean(kept_visual(ours)) < IMAGE / 2 < mean(kept_visual(up)), (
        f"kept mean position: off {mean(kept_visual(up)):.0f}, pos {mean(kept_visual(ours)):.0f}")
    # pos does not suppress padding: on a padded image the count stays upstream's
    padded = probe("patched", "pos", (1000, 101))
    assert len(kept_visual(padded)) == 64


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
