"""Video-LLaVA patch series (patches/Video-LLaVA): FastV pruning of the 8 x 257 video tokens with debias_core,
correct under KV-cache decoding, and the video QA eval script's fixes.

Runs in .venv-Video-LLaVA (envs/cpu/Video-LLaVA.txt: stock transformers 4.31.0, decord, opencv, peft).
An export of third_party/Video-LLaVA, pristine or patched, goes on PYTHONPATH of a subprocess
(tests/baselines/video_probe.py) that builds a tiny random Video-LLaVA (3-layer Llama, tiny LanguageBind video
tower saved locally) and feeds it real mp4 files written with cv2, read by decord through Video-LLaVA's own video
processor. torchvision and pytorchvideo are test stand-ins (video_stubs.py): neither installs against the local
CPU torch. Prefill + 3 decode steps; K = 2, R = 300 of the 2,056 video tokens.
Elsewhere (CI's .venv-test, empty third_party) every test skips, saying what was not tested.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests import support
from tests.baselines.contract import BaselineContract, Run, pytest_generate_tests  # noqa: F401 (the hook)

pytestmark = pytest.mark.baseline

NAME = "Video-LLaVA"
PROBE = Path(__file__).with_name("video_probe.py")
SPAN, K, RANK, STEPS = 2056, 2, 300, 3
MODEL = "videollava/model/language_model/llava_llama.py"
ARCH = "videollava/model/llava_arch.py"
EVAL = "videollava/eval/video/run_inference_video_qa.py"
EVAL_ACT = "videollava/eval/video/run_inference_video_qa_act.py"
BASE = dict(k=K, rank=RANK, steps=STEPS)
PATCHED_SPECS = {
    "disabled": dict(k=None, steps=STEPS),
    "keepall": dict(BASE, rank=SPAN),
    "off": dict(BASE),
    "off-again": dict(BASE),
    "pad": dict(BASE, debias="pad"),
    "ramp-off": dict(BASE, variant="ramp", steps=1),
    "ramp-pos": dict(BASE, variant="ramp", steps=1, debias="pos"),
    "ramp-full": dict(BASE, variant="ramp", steps=1, debias="full"),
    "fixed-cache": dict(BASE, variant="fixed"),
    "fixed-nocache": dict(BASE, variant="fixed", cache=False),
    "fixed-stale": dict(BASE, variant="fixed", stale_positions=True),
    "full-nocontext": dict(BASE, debias="full", context=False, steps=0),
    "full-576-trend": dict(BASE, debias="full", trend="paper:fastv", steps=0),
    "bad-k": dict(BASE, k=3, steps=0),
}


def _require_env():
    support.require_populated(NAME)
    support.require_transformers("4.31", NAME)
    support.require_module("debias_core", "the Video-LLaVA patches import debias_core")
    for module, why in (("decord", "Video-LLaVA's video processor reads frames with decord"),
                        ("cv2", "the LanguageBind processors import cv2 (and the tests write videos with it)"),
                        ("peft", "the LanguageBind towers import peft"), ("einops", "the LanguageBind towers import einops")):
        support.require_module(module, why, env=NAME)


def _probe(tree: Path, *args, env=None) -> dict:
    return support.run_probe(PROBE, [tree], [str(a) for a in args], env=env, timeout=900)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Pristine and patched exports and the tiny model/videos/QA files (built once, with the pristine tree)."""
    _require_env()
    base = tmp_path_factory.mktemp("video")
    trees = {"pristine": support.pristine_tree(NAME, base / "pristine"),
             "patched": support.patched_tree(NAME, base / "patched")}
    _probe(trees["pristine"], "init", base / "data")
    return base, trees


@pytest.fixture(scope="module")
def runs(work):
    base, trees = work
    out = {"pristine": _probe(trees["pristine"], "run", base / "data", json.dumps({"disabled": PATCHED_SPECS["disabled"]})),
           "patched": _probe(trees["patched"], "run", base / "data", json.dumps(PATCHED_SPECS))}
    for t, res in out.items():
        assert res["_env"]["videollava"].startswith(str(trees[t])), res["_env"]
    return out


def _eval(work, tree: str, name: str, env=None, **spec) -> dict:
    base, trees = work
    spec["out"] = str(base / f"eval-{tree}-{name}")
    return _probe(trees[tree], "eval", base / "data", json.dumps(spec), env=env)


@pytest.fixture(scope="module")
def evals(work):
    return {
        "pristine": _eval(work, "pristine", "as-is", chunks=2),
        "pristine-bypass": _eval(work, "pristine", "bypass", chunks=2, greedy_bypass=True),
        "patched-2": _eval(work, "patched", "two", chunks=2, seed=0),
        "patched-1": _eval(work, "patched", "one", chunks=1, seed=1),
    }


def _ok(res: dict, steps=STEPS) -> dict:
    assert "error" not in res, res["error"]
    assert len(res["generated"]) == steps + 1
    return res


# --- the series applies -----------------------------------------------------------------------------------

def test_series_applies_at_the_pin(tmp_path):
    _require_env()
    tree = support.pristine_tree(NAME, tmp_path / "tree")
    support.apply_series(NAME, tree)
    model = (tree / MODEL).read_text()
    assert model.count("debias_core.debias(") == 1 and model.count("debias_core.keep_cap(") == 1
    assert "np.load" not in model and "open(" not in model
    for script in (EVAL, EVAL_ACT):
        text = (tree / script).read_text()
        assert "temperature=0.0" not in text and "do_sample=False" in text
        assert "\n    gt_answers = get_chunk(gt_answers" in text
        assert "debias_core.sample(" in text and "random.seed(" in text


def test_apply_patches_script_applies_reapplies_and_reverses(tmp_path):
    """scripts/apply_patches.sh on a temp superproject whose third_party/Video-LLaVA is a shared clone at the pin."""
    _require_env()
    support.check_apply_patches_roundtrip(NAME, tmp_path, contains={MODEL: "debias_core"},
                                          files=[ARCH, MODEL, EVAL, EVAL_ACT])


# --- disabled: upstream, bit for bit ----------------------------------------------------------------------

def test_disabled_is_upstream_exactly(runs):
    up, ours = _ok(runs["pristine"]["disabled"]), _ok(runs["patched"]["disabled"])
    assert ours["logit_hashes"] == up["logit_hashes"], "logits differ from unpatched Video-LLaVA (fp32, CPU)"
    assert ours["generated"] == up["generated"]
    assert up["spans"][0]["span"] == "absent"


# --- the visual span is found at run time -----------------------------------------------------------------

def test_video_span_is_found_at_run_time(runs):
    """A real mp4 (cv2) read by decord through Video-LLaVA's processor: 8 frames -> 8 x 257 tokens at the first
    of the 8 placeholders of the llava_v1 prompt."""
    assert runs["patched"]["_video_shape"] == [3, 8, 224, 224]
    res = _ok(runs["patched"]["disabled"])
    span = res["spans"][0]
    assert res["n_placeholders"] == 8
    assert span["span"] == [res["s0_input_ids"], 8 * 257]
    assert span["embeds_len"] == res["ids_len"] - 8 + SPAN
    assert span["span_holds_video_features"], "the recorded span does not hold the video tower's features"
    assert span["prefix_is_text"]


def test_cached_decoding_matches_recomputation(runs):
    """With a query-independent ranking (layer K-1's map replaced in the probe), generate(use_cache=True) on the
    pruned cache must match use_cache=False, where every step re-prefills and re-prunes the whole sequence."""
    import numpy as np
    cached, recomputed = _ok(runs["patched"]["fixed-cache"]), _ok(runs["patched"]["fixed-nocache"])
    assert cached["kept"][0] == recomputed["kept"][0] and all(k == recomputed["kept"][0] for k in recomputed["kept"])
    assert np.allclose(cached["logits"], recomputed["logits"], atol=1e-4, rtol=0)
    assert cached["generated"] == recomputed["generated"]
    stale = _ok(runs["patched"]["fixed-stale"])   # upstream's decode position (last layer's cache length)
    assert np.abs(np.array(stale["logits"][1:]) - np.array(recomputed["logits"][1:])).max() > 1e-3, \
        "the check is vacuous: decode positions do not affect the logits"


def test_debias_errors_name_the_fix(runs):
    assert "sample context" in runs["patched"]["full-nocontext"].get("error", "")
    assert "covers 576 positions" in runs["patched"]["full-576-trend"].get("error", "")
    assert "video_fastv_k=3" in runs["patched"]["bad-k"].get("error", "")


# --- the baseline contract (tests/baselines/contract.py) ----------------------------------------------------

def _run(res: dict, steps=STEPS) -> Run:
    """A probe result in the contract's terms: the patch ranks once, at prefill (layer K); the logits are compared
    through their hashes (Run.extra), bit for bit."""
    res = _ok(res, steps)
    return Run(kept=[res["kept"][0]], tokens=res["generated"], extra={"logit_hashes": res["logit_hashes"]})


@pytest.fixture(scope="module")
def results(runs):
    """What the contract's hooks receive: every probe result."""
    return runs


class TestContract(BaselineContract):
    span = SPAN
    has_padding = False  # video is centre-cropped (preprocess="none"): nothing is padding
    off_cases = ["keepall"]
    padded_cases = ["pad"]
    pos_cases = ["pos", "full"]

    def off_pair(self, runs, case):
        """K = 2, R = 2,056: the patched decoder loop, its masks, rotary wrapper and decode positions run, keep every
        token, and must give upstream's logits bit for bit at prefill and at every decode step. Upstream ranks
        nothing: it keeps every token."""
        up = _ok(runs["pristine"]["disabled"])
        upstream = Run(kept=[list(range(SPAN))], tokens=up["generated"], extra={"logit_hashes": up["logit_hashes"]})
        return upstream, _run(runs["patched"]["keepall"])

    def padded(self, runs, case):
        """Nothing is padding, so pad keeps FastV's R tokens."""
        return _run(runs["patched"]["pad"]), set(range(SPAN)), [RANK]

    def check_padded(self, runs, case, run, valid):
        off, pad = _ok(runs["patched"]["off"]), _ok(runs["patched"]["pad"])
        assert (pad["kept"], pad["logit_hashes"]) == (off["kept"], off["logit_hashes"]), "pad changed the video run"

    def pos_pair(self, runs, mode):
        """Layer K-1's map is replaced (in the probe) by a flat row with a 1 % recency ramp over the 2,056 tokens;
        the trend is exponential over 2,056 positions (weight e^-0.001 i)."""
        return _run(runs["patched"]["ramp-off"], steps=1), _run(runs["patched"][f"ramp-{mode}"], steps=1)

    def check_pos(self, runs, mode, off, res):
        assert off.kept[0] == list(range(SPAN - RANK, SPAN)), "FastV should keep the latest tokens"
        assert res.kept[0] == list(range(RANK)), f"{mode} should keep the earliest tokens (no cap: no padding)"

    def entry(self, runs):
        """FastV at K = 2, R = 300 through generate: prefill, then decoding on the pruned cache."""
        return _run(runs["patched"]["off"])

    def check_entry(self, runs, run):
        res = _ok(runs["patched"]["off"])
        assert res["kept"][0] == res["expected_off"], "kept set is not the top-R of layer K-1's last-token head mean"
        assert len(res["kept"][0]) == RANK
        assert res["attention_maps"] == [K - 1], "only layer K-1 should compute a returned attention map, once"
        full = res["spans"][0]["embeds_len"]
        s0 = res["s0_input_ids"]
        for step, entry in enumerate(res["at_k"][1:]):
            assert entry["positions"] == [full + step], "decode steps must keep original position ids"
            assert entry["past"] == full - SPAN + RANK + step, "layer K's cache should hold only the kept tokens"
        assert res["at_k"][0]["positions"][:s0] == list(range(s0))
        again = _ok(runs["patched"]["off-again"])
        assert (again["kept"], again["logit_hashes"]) == (res["kept"], res["logit_hashes"])


# --- the eval script ------------------------------------------------------------------------------------------

def test_eval_upstream_crashes_on_sampling_at_temperature_0(evals):
    res = evals["pristine"]
    assert res["calls"] and all(c == {"do_sample": True, "temperature": 0.0, "max_new_tokens": 1024}
                                for c in res["calls"])
    assert all("temperature" in c.get("error", "") for c in res["chunks"])


def test_eval_decodes_greedily(evals):
    res = evals["patched-2"]
    assert res["calls"] and all(c == {"do_sample": False, "max_new_tokens": 1024} for c in res["calls"])
    lines = [line for c in res["chunks"] for line in c["lines"]]
    assert all("error" not in c for c in res["chunks"])
    assert all(isinstance(line["pred"], str) for line in lines) and any(line["pred"] for line in lines)


def test_eval_answers_stay_with_their_questions_across_chunks(evals):
    res = evals["patched-2"]
    chunks = [[line["id"] for line in c["lines"]] for c in res["chunks"]]
    assert chunks == [["q0", "q1", "q2", "q3"], ["q4", "q5", "q6"]]
    for c in res["chunks"]:
        for line in c["lines"]:
            assert line["answer"] == f"answer-to-{line['id']}", line
    up = evals["pristine-bypass"]["chunks"][1]["lines"]
    assert any(line["answer"] != f"answer-to-{line['id']}" for line in up), \
        "the check is vacuous: upstream's second chunk was aligned"


def test_eval_flip_and_answers_are_fixed_per_question(evals):
    """Two chunks with Python's random seeded 0 vs one chunk seeded 1: same flip and same answer per question."""
    def by_id(res):
        lines = [line for c in res["chunks"] for line in c["lines"]]
        flips = [f for c in res["chunks"] for f in c["flips"]]
        assert len(flips) == len(lines)
        return {line["id"]: (flip, line["pred"]) for line, flip in zip(lines, flips)}
    two, one = by_id(evals["patched-2"]), by_id(evals["patched-1"])
    assert len(one) == 7 and two == one
    up = evals["pristine-bypass"]["chunks"]
    assert up[1]["flips"] == up[0]["flips"][:len(up[1]["flips"])], \
        "upstream's flips follow the global random state (each chunk here starts from seed 0), not the question"


def test_eval_runs_fastv_with_debias_from_the_environment(work, evals, tmp_path):
    """The eval entry with --fastv_k/--fastv_rank and DEBIAS=full + a 2,056-position trend file, as run_video.sh
    will call it: the prompt reaching layer K is cut to s0 + R + text tokens."""
    import debias_core
    trend = tmp_path / "trend.json"
    debias_core.save_trend(debias_core.ExponentialTrend(a=1.0, b=1e-3, n=SPAN), trend)
    env = {"DEBIAS": "full", "DEBIAS_TREND": str(trend), "DEBIAS_METHOD": "fastv"}
    res = _eval(work, "patched", "fastv", env=env, chunks=1, seed=0,
                extra_args=["--fastv_k", str(K), "--fastv_rank", str(RANK)])
    assert "error" not in res["chunks"][0], res["chunks"][0]["error"]
    assert [line["answer"] for line in res["chunks"][0]["lines"]] == [f"answer-to-q{i}" for i in range(7)]
    full = evals["patched-1"]["layer2_prefill_lengths"]   # the same seven prompts, unpruned
    assert len(full) == 7 and res["layer2_prefill_lengths"] == [n - SPAN + RANK for n in full]
