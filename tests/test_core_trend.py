"""Positional trends: fitting, weights, JSON round-trip, staged trends (debias_core.trend)."""
import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from debias_core import (DebiasError, ExponentialTrend, PolynomialTrend, StagedTrend, TableTrend, fit_exponential,
                         load_trend_file, save_trend, table_trend, trend_from_json)
from debias_core.trend import mean_scores


def synthetic(a, b, n=576, rows=64, noise=0.05, seed=0):
    """rows × n scores: a·exp(b·i) times lognormal-ish noise (positive, like attention)."""
    rng = np.random.default_rng(seed)
    i = np.arange(n)
    return a * np.exp(b * i) * (1.0 + noise * rng.standard_normal((rows, n)))


@pytest.mark.parametrize("a, b", [(1.7e-3, 2.17e-3), (0.02, 4.1e-3), (5.0, -1.0e-3), (1e-4, 1.2e-3)])
def test_fit_recovers_known_parameters_from_noisy_rows(a, b):
    scores = synthetic(a, b)
    t = fit_exponential(scores)
    assert isinstance(t, ExponentialTrend) and t.n == 576
    assert t.a == pytest.approx(a, rel=0.01)
    assert t.b == pytest.approx(b, abs=3e-5)
    assert 0.0 < t.r2 <= 1.0


def test_fit_on_exact_data_is_exact_and_r2_is_one():
    i = np.arange(576)
    t = fit_exponential(0.3 * np.exp(0.002 * i))
    assert t.a == pytest.approx(0.3, rel=1e-9) and t.b == pytest.approx(0.002, rel=1e-9)
    assert t.r2 == pytest.approx(1.0, abs=1e-12)


def test_r2_reports_goodness_of_fit():
    clean = fit_exponential(synthetic(1.0, 0.002, rows=64, noise=0.01))
    noisy = fit_exponential(synthetic(1.0, 0.002, rows=1, noise=0.25))  # still positive, as attention is
    assert clean.r2 > 0.95 and noisy.r2 < clean.r2


def test_fit_is_least_squares_not_log_linear():
    """Residuals of the returned fit beat the log-linear start on the original scale (LM refinement)."""
    rng = np.random.default_rng(3)
    i = np.arange(200)
    y = 2.0 * np.exp(0.01 * i) + rng.uniform(0, 1.5, 200)   # additive noise: log-linear is biased
    t = fit_exponential(y)
    beta, log_a = np.polyfit(i, np.log(y), 1)
    sse_fit = ((y - t.values(i)) ** 2).sum()
    sse_log = ((y - np.exp(log_a) * np.exp(beta * i)) ** 2).sum()
    assert sse_fit < sse_log
    # local optimum: nudging either parameter only makes it worse
    for da, db in [(1e-4, 0), (-1e-4, 0), (0, 1e-7), (0, -1e-7)]:
        assert sse_fit <= ((y - (t.a + da) * np.exp((t.b + db) * i)) ** 2).sum()


def test_two_d_rows_are_averaged():
    rows = synthetic(1.0, 0.002, rows=8)
    np.testing.assert_array_equal(mean_scores(rows), rows.mean(axis=0))
    a, b = fit_exponential(rows), fit_exponential(rows.mean(axis=0))
    assert (a.a, a.b) == (b.a, b.b)


@pytest.mark.parametrize("bad, word", [
    (np.ones(1), "≥ 2 positions"), (np.ones((0, 5)), "no rows"), (np.ones((2, 2, 2)), r"shape \(2, 2, 2\)"),
    (np.array([1.0, np.nan, 2.0]), "position 1"), (np.array([1.0, 2.0, np.inf]), "position 2"),
    (-np.ones(10), "positive"),
])
def test_fit_rejects_bad_scores(bad, word):
    with pytest.raises(DebiasError, match=word):
        fit_exponential(bad)


def test_weights_are_f0_over_f():
    t = ExponentialTrend(a=3.0, b=0.002, n=576)
    w = t.weights()
    np.testing.assert_allclose(w, t.values(np.zeros(1))[0] / t.values(np.arange(576)), rtol=1e-14)
    assert w[0] == 1.0 and np.all(np.diff(w) < 0)
    assert len(t.weights(100)) == 100
    with pytest.raises(DebiasError, match="576 positions, asked for 577"):
        t.weights(577)


@settings(max_examples=50, deadline=None)
@given(b=st.floats(-0.01, 0.01), a=st.floats(1e-6, 1e3))
def test_debiased_trend_is_flat(a, b):
    """score · w_i turns the trend itself into a constant f(0): the bias is removed exactly."""
    t = ExponentialTrend(a=a, b=b, n=576)
    flat = t.values(np.arange(576)) * t.weights()
    np.testing.assert_allclose(flat, a, rtol=1e-9)


def test_polynomial_and_table_weights():
    p = PolynomialTrend(coef=[1.0, 1.0], x_scale=9.0, n=10)          # f = 1 + i/9
    np.testing.assert_allclose(p.weights(), 1.0 / (1.0 + np.arange(10) / 9.0), rtol=1e-15)
    tt = table_trend(np.array([[2.0, 4.0, 8.0], [2.0, 4.0, 8.0]]))
    assert isinstance(tt, TableTrend) and tt.n == 3
    np.testing.assert_array_equal(tt.weights(), [1.0, 0.5, 0.25])
    with pytest.raises(DebiasError, match="> 0"):
        table_trend(np.array([1.0, 0.0, 2.0]))


# ------------------------------------------------------------------------------- JSON

def roundtrip(trend, tmp_path):
    path = tmp_path / "trend.json"
    save_trend(trend, path)
    json.loads(path.read_text())        # plain JSON text
    return load_trend_file(path)


def test_exponential_roundtrip(tmp_path):
    t = fit_exponential(synthetic(0.01, 0.003))
    t.provenance = {"scores": "x.npy", "rows": 64}
    back = roundtrip(t, tmp_path)
    assert back == t
    np.testing.assert_array_equal(back.weights(), t.weights())


def test_polynomial_table_staged_roundtrip(tmp_path):
    p = PolynomialTrend(coef=[1.0, 0.5, -0.1], x_scale=575.0, n=576)
    tt = TableTrend(np.linspace(1, 2, 50))
    staged = StagedTrend({0: ExponentialTrend(a=1.0, b=0.002, n=576), 2: p})
    for t in (p, tt, staged):
        back = roundtrip(t, tmp_path)
        assert type(back) is type(t)
        np.testing.assert_array_equal(back.weights(), t.weights())
    back = roundtrip(staged, tmp_path)
    assert sorted(back.stages) == [0, 2]
    np.testing.assert_array_equal(back.for_stage(2).weights(), p.weights())


def test_staged_trend_picks_per_stage_and_falls_back_to_the_first():
    e0, e1 = ExponentialTrend(a=1.0, b=0.001, n=576), ExponentialTrend(a=1.0, b=0.004, n=300)
    s = StagedTrend({0: e0, 1: e1})
    assert s.for_stage(0) is e0 and s.for_stage(1) is e1 and s.for_stage(7) is e0
    assert s.n == 300


@pytest.mark.parametrize("doc, word", [
    ([1, 2], "JSON object"),
    ({"form": "cubic"}, "unknown form 'cubic'"),
    ({"a": 1.0, "b": 0.1, "n": 576}, "unknown form None"),
    ({"form": "exponential", "b": 0.1, "n": 576}, "'a'"),
    ({"form": "exponential", "a": "1", "b": 0.1, "n": 576}, "'a'"),
    ({"form": "exponential", "a": 0.0, "b": 0.1, "n": 576}, "'a' must be > 0"),
    ({"form": "exponential", "a": 1.0, "b": None, "n": 576}, "'b'"),
    ({"form": "exponential", "a": 1.0, "b": 0.1, "n": 1}, "'n'"),
    ({"form": "exponential", "a": 1.0, "b": 0.1, "n": 576.5}, "'n'"),
    ({"form": "exponential", "a": 1.0, "b": 0.1, "n": 576, "r2": "good"}, "'r2'"),
    ({"form": "polynomial", "coef": [], "x_scale": 1.0, "n": 5}, "'coef'"),
    ({"form": "polynomial", "coef": [1.0, -1.0], "x_scale": 1.0, "n": 5}, "not positive"),
    ({"form": "table", "values": [1.0, -2.0]}, "> 0"),
    ({"form": "table", "values": "1,2"}, "'values'"),
    ({"form": "staged", "stages": {}}, "'stages'"),
    ({"form": "staged", "stages": {"x": {"form": "table", "values": [1, 2]}}}, "stage keys must be integers"),
    ({"form": "staged", "stages": {"0": {"form": "table", "values": [1, 0]}}}, "stage 0"),
])
def test_wrong_form_trend_is_a_clear_error(doc, word, tmp_path):
    with pytest.raises(DebiasError, match=word):
        trend_from_json(doc)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(DebiasError, match="bad.json"):   # the message names the file
        load_trend_file(path)


@pytest.mark.parametrize("content", [b"{not json", b"\x80\x04\x95pickle", b""])
def test_malformed_trend_file(content, tmp_path):
    path = tmp_path / "trend.json"
    path.write_bytes(content)
    with pytest.raises(DebiasError, match="is not JSON"):
        load_trend_file(path)


def test_missing_trend_file(tmp_path):
    with pytest.raises(DebiasError, match="does not exist"):
        load_trend_file(tmp_path / "nope.json")
