"""Issue 2 §2 "Bad input → clear error naming the value", one case per item of the issue's list.

Each case is a DebiasError (a ValueError) whose message contains the offending value and says what to
do instead. The per-concept files test more variants; this file is the checklist."""
import json

import pytest
import torch

import debias_core as dc
from debias_core import DebiasError

pytestmark = pytest.mark.usefixtures("clean_debias")


def full():
    dc.configure(mode="full", trend="paper:himap/gqa")


def in_sample(fn, **ctx):
    with dc.sample(**{"image_size": (640, 480), **ctx}):
        return fn()


def malformed_trend_file(tmp_path):
    p = tmp_path / "trend.json"
    p.write_text("{'form': 'exponential'")                   # not JSON
    return dc.load_trend_file(p)


def wrong_form_trend_file(tmp_path):
    p = tmp_path / "trend.json"
    p.write_text(json.dumps({"form": "spline", "knots": [1, 2]}))
    return dc.load_trend_file(p)


def nan_scores():
    full()
    s = torch.ones(576)
    s[100] = float("nan")
    return in_sample(lambda: dc.debias(s))


CASES = {
    "non-positive image size": (lambda tmp: dc.sample(image_size=(640, 0)).__enter__(), "height 0"),
    "negative image size": (lambda tmp: dc.keep_count((-640, 480)), "width -640"),
    "non-integer image size": (lambda tmp: dc.pad_fractions((640.5, 480)), "width 640.5"),
    "grid does not divide resolution": (lambda tmp: dc.pad_fractions((640, 480), grid=23),
                                        "grid 23 does not divide resolution 336"),
    "scores/positions length mismatch": (lambda tmp: (full(), in_sample(
        lambda: dc.debias(torch.ones(10), torch.arange(11))))[1], r"positions shape (11,) does not match scores shape (10,)"),
    "position outside the trend length": (lambda tmp: (full(), in_sample(
        lambda: dc.debias(torch.ones(2), torch.tensor([3, 999]))))[1], "position 999 is outside the visual span 0..575"),
    "span longer than the trend": (lambda tmp: (dc.configure(mode="pos", trend=dc.ExponentialTrend(a=1, b=0.1, n=64)),
                                                in_sample(lambda: dc.debias(torch.ones(576))))[1],
                                   "576 tokens but the trend covers 64"),
    "NaN scores": (lambda tmp: nan_scores(), "nan at index 100"),
    "inf scores": (lambda tmp: (dc.configure(mode="pad"), in_sample(
        lambda: dc.debias(torch.tensor([1.0, float("inf")]))))[1], "inf at index 1"),
    "k = 0": (lambda tmp: dc.keep_cap(0), "k=0"),
    "k < 0": (lambda tmp: dc.keep_cap(-3), "k=-3"),
    "unknown mode": (lambda tmp: dc.configure(mode="strong"), "'strong' is unknown; use one of off, pad, pos, full"),
    "unknown preset": (lambda tmp: dc.resolve_trend("paper:himap/coco"), "'coco' has no paper preset"),
    "unknown preset method": (lambda tmp: dc.resolve_trend("paper:fastvid"), "'fastvid' is unknown"),
    "malformed trend file": (malformed_trend_file, "is not JSON"),
    "wrong-form trend file": (wrong_form_trend_file, "unknown form 'spline'"),
    "context missing (debias)": (lambda tmp: (full(), dc.debias(torch.ones(576)))[1], "needs a sample context"),
    "context missing (keep_cap)": (lambda tmp: (full(), dc.keep_cap(100))[1], "needs a sample context"),
    "mode needs a trend": (lambda tmp: dc.configure(mode="full"), "needs a positional trend"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_a_clear_error(case, tmp_path):
    fn, text = CASES[case]
    with pytest.raises(DebiasError) as e:
        fn(tmp_path)
    assert text in str(e.value), f"{case}: {e.value}"
    assert isinstance(e.value, ValueError)


def test_failed_sample_leaves_no_context():
    with pytest.raises(DebiasError):
        with dc.sample(image_size=(0, 1)):
            pass
    assert dc.current_samples() is None
