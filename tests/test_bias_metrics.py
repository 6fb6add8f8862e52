"""debias_core.bias_metrics: Spearman with ties, positional and padding bias strength, before/after debiasing."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import debias_core as dc
from debias_core.bias_metrics import (analyze, bias_report, debias_rows, pad_fraction_rows, padding_rows,
                                      padding_strength, positional_strength, rankdata, spearman, topk_rows)

pytestmark = pytest.mark.usefixtures("clean_debias")


def _brute_ranks(x):
    """Average rank by definition: #smaller + (#equal + 1)/2."""
    x = np.asarray(x, float)
    return np.array([(x < v).sum() + ((x == v).sum() + 1) / 2 for v in x])


def _pearson(a, b):
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / math.sqrt((a * a).sum() * (b * b).sum()))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-3, 3), min_size=1, max_size=30))
def test_rankdata_averages_ties(xs):
    np.testing.assert_allclose(rankdata(xs), _brute_ranks(xs))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 5)), min_size=3, max_size=40))
def test_spearman_is_pearson_of_average_ranks(pairs):
    x, y = np.array(pairs, float).T
    rx, ry = _brute_ranks(x), _brute_ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        assert math.isnan(spearman(x, y))
    else:
        assert spearman(x, y) == pytest.approx(_pearson(rx, ry), abs=1e-12)


def test_spearman_known_values_and_invariances():
    x = np.arange(50.0)
    assert spearman(x, x ** 3) == pytest.approx(1.0)
    assert spearman(x, -np.exp(x / 10)) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4], [1, 1, 2, 2]) == pytest.approx(2 / math.sqrt(5))   # textbook tie example
    rng = np.random.default_rng(0)
    y = rng.normal(size=50)
    assert spearman(x, y) == pytest.approx(spearman(x, np.exp(y)))                     # monotone transform
    assert spearman(x, np.r_[y[:-1], np.nan]) == pytest.approx(spearman(x[:-1], y[:-1]))  # NaN pairs dropped
    assert math.isnan(spearman([1, 2], [3, 4]))


def test_positional_strength_of_an_exponential_and_a_flat_vector():
    b = 0.002
    mean = 3.0 * np.exp(b * np.arange(576))
    s = positional_strength(mean)
    assert s["spearman"] == pytest.approx(1.0)
    assert s["end_start_ratio"] == pytest.approx(math.exp(b * 575), rel=1e-6)
    flat = positional_strength(np.ones(576))
    assert math.isnan(flat["spearman"]) and flat["end_start_ratio"] == pytest.approx(1.0)


def test_padding_ratio_definition():
    phi = np.zeros((2, 8))
    phi[0, :4] = 1.0                                   # row 0: half the area is padding
    only_pad = np.zeros((2, 8), bool)
    only_pad[0, :2] = only_pad[1, :2] = True
    r = padding_strength(only_pad, phi)
    assert r["rows_with_padding"] == 1                  # row 1 (no padding) does not count
    assert r["kept_padding_share"] == 1.0 and r["area_padding_share"] == 0.5 and r["ratio"] == 2.0
    no_pad = np.zeros((2, 8), bool)
    no_pad[0, 4:6] = True
    assert padding_strength(no_pad, phi)["ratio"] == 0.0
    assert padding_strength(no_pad, np.zeros((2, 8)))["ratio"] is None


def test_random_selection_gives_padding_ratio_near_one():
    rng = np.random.default_rng(1)
    ctx = [{"image_size": [640, 360]}] * 400
    phi = pad_fraction_rows(ctx, 576)
    kept = topk_rows(rng.random((400, 576)), 144)
    assert padding_strength(kept, phi)["ratio"] == pytest.approx(1.0, abs=0.03)


def test_topk_rows_matches_torch_topk_and_skips_missing():
    rng = np.random.default_rng(2)
    s = rng.random((5, 40))
    kept = topk_rows(s, 7)
    ref = torch.topk(torch.tensor(s), 7, dim=1).indices.numpy()
    for r in range(5):
        assert set(np.flatnonzero(kept[r])) == set(ref[r])
    s[:, :35] = np.nan                                   # only 5 tokens present
    s[0, 36] = -np.inf
    kept = topk_rows(s, 7)
    assert kept.sum(1).tolist() == [4, 5, 5, 5, 5] and not kept[:, :35].any()


@pytest.mark.parametrize("mode", ["pos", "pad", "full"])
def test_numpy_debias_equals_debias_core_debias(mode):
    rng = np.random.default_rng(3)
    sizes = [(640, 480), (333, 500), (500, 500)]
    scores = rng.random((3, 576)) + 0.1
    ctx = [{"image_size": list(s)} for s in sizes]
    pad = padding_rows(pad_fraction_rows(ctx, 576), 0.5)
    mine = debias_rows(scores, mode=mode, trend="paper:himap/gqa", padding=pad)
    dc.configure(mode=mode, trend="paper:himap/gqa", method="himap")
    with dc.sample(image_size=sizes):
        ref = dc.debias(torch.tensor(scores)).numpy()
    np.testing.assert_array_equal(np.isinf(mine), np.isinf(ref))
    np.testing.assert_allclose(mine[np.isfinite(mine)], ref[np.isfinite(ref)], rtol=1e-12)


def test_debias_rows_needs_a_trend_for_positional_modes():
    with pytest.raises(dc.DebiasError, match="needs a trend"):
        debias_rows(np.ones((1, 4)), mode="pos")
    with pytest.raises(dc.DebiasError, match="unknown"):
        debias_rows(np.ones((1, 4)), mode="weird")


def _synthetic(rows=120, b=0.003, boost=3.0, seed=0):
    rng = np.random.default_rng(seed)
    sizes = [(640, 480), (480, 640), (500, 500)]
    ctx = [{"image_size": list(sizes[r % 3])} for r in range(rows)]
    phi = pad_fraction_rows(ctx, 576)
    s = np.exp(b * np.arange(576))[None] * rng.lognormal(0, 0.2, (rows, 576)) * np.where(phi > 0.5, boost, 1.0)
    return s, ctx


def test_before_after_with_the_true_trend():
    b = 0.003
    s, ctx = _synthetic(b=b)
    true = dc.ExponentialTrend(a=1.0, b=b, n=576)
    rep = bias_report(s, ctx, mode="full", trend=true, keep=192, threshold=0.5)
    before, after = rep["before"], rep["after"]
    assert before["positional"]["spearman"] > 0.9
    assert before["positional"]["end_start_ratio"] == pytest.approx(math.exp(b * 575), rel=0.05)
    assert abs(after["positional"]["spearman"]) < 0.15
    assert after["positional"]["end_start_ratio"] == pytest.approx(1.0, abs=0.05)
    assert before["padding"]["ratio"] > 1.5                        # boosted padding is over-selected
    assert after["padding"]["ratio"] < 0.05                        # full mode: only sliver patches (≤ τ) remain
    assert rep["settings"]["mode"] == "full" and rep["settings"]["keep"] == 192


def test_pos_mode_leaves_padding_and_off_changes_nothing():
    s, ctx = _synthetic()
    pos = analyze(s, ctx, mode="pos", trend="paper:himap/gqa", keep=192)
    assert pos.report["after"]["padding"]["ratio"] > 1.0          # positional weights alone keep padding in play
    off = analyze(s, ctx, mode="off", keep=192)
    assert off.report["after"] == off.report["before"]
    np.testing.assert_array_equal(off.kept_after, off.kept_before)


def test_analyze_rejects_bad_input():
    with pytest.raises(dc.DebiasError, match="contexts"):
        analyze(np.ones((2, 576)), [None], mode="off", keep=10)
    with pytest.raises(dc.DebiasError, match="keep budget"):
        analyze(np.ones((2, 576)), None, mode="off", keep=0)
    with pytest.raises(dc.DebiasError, match="rows, n"):
        analyze(np.ones(576), None, mode="off", keep=5)
