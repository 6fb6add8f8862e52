"""Paper presets and trend resolution (debias_core.presets); the parameters recovered from the official weight files.

The comparison with the published weight files is tests/test_presets_reference.py."""
import json

import numpy as np
import pytest

from debias_core import (BENCHMARKS, METHODS, DebiasError, ExponentialTrend, PolynomialTrend, paper_trend,
                         preset_names, resolve_trend, save_trend)
from debias_core.presets import pad_threshold


def test_preset_names_cover_every_method_and_benchmark():
    names = preset_names()
    assert len(names) == 41 and len(set(names)) == 41
    assert "paper:fastv" in names
    for m in ("pdrop", "sparsevlm", "himap", "tokencarve"):
        for b in BENCHMARKS:
            assert f"paper:{m}/{b}" in names
    for name in names:
        assert resolve_trend(name).weights().shape == (576,)


def test_exponential_preset_values():
    # recovered from the official weight files: HiMAP GQA b = 2.172256788986171e-03, amplitude e^{575b} ≈ 3.49
    t = paper_trend("himap", "gqa")
    assert isinstance(t, ExponentialTrend) and t.b == 2.172256788986171e-03 and t.n == 576
    w = t.weights()
    assert w[0] == 1.0 and 1.0 / w[-1] == pytest.approx(3.49, abs=0.005)
    assert paper_trend("pdrop", "mmvet").b == 4.133642007740654e-03


def test_fastv_preset_is_the_cubic():
    t = resolve_trend("paper:fastv")
    assert isinstance(t, PolynomialTrend)
    w = t.weights()
    assert w[0] == 1.0 and w[-1] == pytest.approx(0.3582392188958338, abs=1e-15)   # FastV's published cubic
    x = np.arange(576) / 575
    np.testing.assert_allclose(1 / w, 1 + 1.7337386219241522 * x - 4.826433446361354 * x ** 2
                               + 4.884125654043751 * x ** 3, rtol=1e-14)
    # one FastV vector for every benchmark
    for b in BENCHMARKS:
        np.testing.assert_array_equal(resolve_trend(f"paper:fastv/{b}").weights(), w)


def test_aliases():
    np.testing.assert_array_equal(resolve_trend("paper:PyramidDrop/MM-Vet").weights(),
                                  resolve_trend("paper:pdrop/mmvet").weights())
    np.testing.assert_array_equal(resolve_trend("paper:sparsevlms/MME").weights(),
                                  resolve_trend("paper:sparsevlm/mme").weights())


def test_pad_thresholds_per_method():
    # the official thresholds: PyramidDrop 0.01, the others 0.5
    assert pad_threshold("pdrop") == 0.01 and pad_threshold("pyramiddrop") == 0.01
    for m in ("fastv", "sparsevlm", "himap", "tokencarve"):
        assert pad_threshold(m) == 0.5
    assert pad_threshold(None) == 0.5
    assert set(METHODS) == {"fastv", "pdrop", "sparsevlm", "himap", "tokencarve"}


@pytest.mark.parametrize("spec, word", [
    ("paper:nosuch/gqa", "'nosuch'"),
    ("paper:himap", "needs a benchmark"),
    ("paper:himap/imagenet", "'imagenet'"),
    ("paper:fastv/imagenet", "'imagenet'"),
    ("himap/gqa", "'himap/gqa'"),
    ("", "''"),
    (42, "42"),
    ("calibrated:/no/such/file.json", "does not exist"),
    ("/no/such/trend.json", "does not exist"),
])
def test_unknown_preset_names_the_value(spec, word):
    with pytest.raises(DebiasError, match=word):
        resolve_trend(spec)


def test_file_and_calibrated_specs(tmp_path):
    t = ExponentialTrend(a=1.0, b=0.003, n=576)
    path = tmp_path / "t.json"
    save_trend(t, path)
    assert resolve_trend(str(path)) == t
    assert resolve_trend(path) == t
    assert resolve_trend(f"calibrated:{path}") == t
    assert resolve_trend(t) is t


def test_preset_parameters_are_json_text_in_the_package():
    from importlib import resources
    raw = resources.files("debias_core").joinpath("data/paper_presets.json").read_text()
    data = json.loads(raw)
    assert set(data["exponential_b"]) == {"pdrop", "sparsevlm", "himap", "tokencarve"}
    for table in data["exponential_b"].values():
        assert set(table) == set(BENCHMARKS)
