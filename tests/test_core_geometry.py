"""Padding geometry of LLaVA-1.5 `pad` preprocessing (debias_core.geometry): exact expand2square, docs/deviations.md."""
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from debias_core import DebiasError, keep_count, pad_fractions, valid_mask
from debias_core.geometry import check_grid, check_image_size, check_threshold, official_rule, valid_tokens

sizes = st.integers(min_value=1, max_value=6000)
# (grid, resolution) pairs used by the VLMs in scope, plus small ones for variety
grids = st.sampled_from([(24, 336), (16, 224), (12, 336), (4, 8), (1, 14)])
thresholds = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)
prop = settings(max_examples=150, deadline=None)


# ------------------------------------------------------------------------------- property tests

@prop
@given(w=sizes, h=sizes, g=grids, exact=st.booleans())
def test_fractions_in_unit_interval_with_grid_shape(w, h, g, exact):
    grid, res = g
    fr = pad_fractions((w, h), grid=grid, resolution=res, exact=exact)
    assert fr.shape == (grid, grid) and fr.dtype == np.float64
    assert np.all(fr >= 0.0) and np.all(fr <= 1.0)


@prop
@given(w=sizes, h=sizes, g=grids, exact=st.booleans())
def test_transposing_the_image_transposes_the_fractions(w, h, g, exact):
    grid, res = g
    a = pad_fractions((w, h), grid=grid, resolution=res, exact=exact)
    b = pad_fractions((h, w), grid=grid, resolution=res, exact=exact)
    np.testing.assert_allclose(a, b.T, rtol=0, atol=1e-12)


@prop
@given(s=sizes, g=grids, exact=st.booleans(), thr=thresholds)
def test_square_images_have_no_padding(s, g, exact, thr):
    grid, res = g
    assert not pad_fractions((s, s), grid=grid, resolution=res, exact=exact).any()
    assert keep_count((s, s), grid=grid, resolution=res, threshold=thr, exact=exact) == grid * grid


@prop
@given(w=sizes, h=sizes, g=grids, exact=st.booleans(), thr=thresholds)
def test_keep_count_between_one_and_grid_squared(w, h, g, exact, thr):
    grid, res = g
    n = keep_count((w, h), grid=grid, resolution=res, threshold=thr, exact=exact)
    assert 1 <= n <= grid * grid


@prop
@given(w=sizes, h=sizes, exact=st.booleans())
def test_padding_is_whole_rows_or_columns_on_the_short_axis(w, h, exact):
    fr = pad_fractions((w, h), exact=exact)
    if w >= h:   # landscape: rows padded, every column of a row alike
        assert np.all(fr == fr[:, :1])
    else:
        assert np.all(fr == fr[:1, :])


@prop
@given(w=sizes, h=sizes, exact=st.booleans())
def test_content_area_matches_the_image_aspect(w, h, exact):
    """Σ(1 − fraction)·patch area = area the content covers after the resize = R²·m/S (exact offsets
    move the band but do not change its width)."""
    fr = pad_fractions((w, h), exact=exact)
    content = (1.0 - fr).sum() / fr.size
    assert content == pytest.approx(min(w, h) / max(w, h), abs=1e-9)


@prop
@given(w=sizes, h=sizes, thr_lo=thresholds, thr_hi=thresholds)
def test_keep_count_grows_with_the_threshold(w, h, thr_lo, thr_hi):
    lo, hi = sorted((thr_lo, thr_hi))
    assert keep_count((w, h), threshold=lo) <= keep_count((w, h), threshold=hi)


# ------------------------------------------------------------------------------- exact values

# valid-patch counts: W×H -> (τ=0.5, τ=0.01 exact, τ=0.01 official)
VALID_COUNTS = {
    (640, 480): (432, 432, 432),
    (640, 427): (384, 360, 384),
    (500, 375): (432, 408, 432),
    (640, 360): (336, 288, 288),
    (1024, 512): (288, 288, 288),
    (400, 200): (288, 288, 288),
    (200, 400): (288, 288, 288),
    (333, 500): (384, 360, 384),
    (640, 200): (192, 144, 144),
    (1024, 256): (144, 144, 144),
    (1000, 101): (48, 48, 48),
    (500, 500): (576, 576, 576),
    (336, 336): (576, 576, 576),
    (1, 1): (576, 576, 576),
}


@pytest.mark.parametrize("size", list(VALID_COUNTS), ids=lambda s: f"{s[0]}x{s[1]}")
def test_upstream_valid_count_table(size):
    half, exact01, official01 = VALID_COUNTS[size]
    assert keep_count(size, threshold=0.5, exact=True) == half
    assert keep_count(size, threshold=0.5, exact=False) == half
    assert keep_count(size, threshold=0.01, exact=True) == exact01
    assert keep_count(size, threshold=0.01, exact=False) == official01


def test_640x480_keeps_rows_3_to_20():
    valid = valid_mask(pad_fractions((640, 480)), 0.5)
    rows = np.flatnonzero(valid.all(axis=1))
    assert rows.tolist() == list(range(3, 21)) and valid.sum() == 18 * 24


def test_exact_fraction_by_hand_640x427():
    """S = 640, m = 427, o = ⌊213/2⌋ = 106, σ = 336/640: band [55.65, 279.825).
    Row 3 covers [42, 56): content 0.35 px of 14 -> pad 1 − 0.35/14 = 0.975."""
    fr = pad_fractions((640, 427))
    assert fr[3, 0] == pytest.approx(1 - (56 - 106 * 336 / 640) / 14, abs=1e-12)
    assert fr[4, 0] == 0.0 and fr[0, 5] == 1.0
    # official geometry: unfloored offset 106.5 -> band [55.9125, 280.0875)
    off = pad_fractions((640, 427), exact=False)
    assert off[3, 0] == pytest.approx(1 - (56 - 106.5 * 336 / 640) / 14, abs=1e-12)


def test_exact_and_official_differ_only_by_the_offset_floor():
    # even S − m: the two agree exactly
    np.testing.assert_array_equal(pad_fractions((640, 480)), pad_fractions((640, 480), exact=False))
    assert not np.array_equal(pad_fractions((640, 427)), pad_fractions((640, 427), exact=False))


def test_video_llava_image_grid_16_at_224():
    fr = pad_fractions((400, 200), grid=16, resolution=224)
    assert fr.shape == (16, 16)
    assert keep_count((400, 200), grid=16, resolution=224) == 8 * 16


@pytest.mark.parametrize("preprocess", ["none", "anyres"])
def test_unpadded_preprocessing_has_no_padding(preprocess):
    fr = pad_fractions((1000, 101), preprocess=preprocess)
    assert fr.shape == (24, 24) and not fr.any()
    assert keep_count((1000, 101), preprocess=preprocess) == 576
    assert not pad_fractions(None, preprocess=preprocess).any()   # video frames: no image size


@pytest.mark.parametrize("size", [(1, 5000), (5000, 1), (1, 100000), (100000, 1)])
@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("thr", [0.0, 0.01, 0.5])
def test_extreme_aspect_keeps_the_content_sliver(size, exact, thr):
    fr = pad_fractions(size, exact=exact)
    valid = valid_mask(fr, thr)
    n = keep_count(size, threshold=thr, exact=exact)
    assert n >= 1 and n == valid.sum()
    # the kept patches are exactly the ones holding the least padding (the content sliver)
    assert np.all(fr[valid] == fr.min()) and fr.min() < 1.0


def test_valid_mask_threshold_is_inclusive():
    fr = np.array([[0.0, 0.5, 0.51, 1.0]])
    assert valid_mask(fr, 0.5).tolist() == [[True, True, False, False]]


# ------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("size, word", [
    ((0, 480), "0"), ((640, -3), "-3"), ((640.5, 480), "640.5"), (("640", 480), "'640'"),
    ((640, float("nan")), "nan"), ((True, 480), "True"),
])
def test_bad_image_size_names_the_value(size, word):
    with pytest.raises(DebiasError, match=word):
        pad_fractions(size)
    with pytest.raises(DebiasError, match=word):
        keep_count(size)


@pytest.mark.parametrize("size", [640, (640,), (1, 2, 3), None, "640x480"])
def test_image_size_not_a_pair(size):
    with pytest.raises(DebiasError, match="width, height"):
        check_image_size(size)


def test_integral_floats_and_numpy_ints_are_accepted():
    assert check_image_size((640.0, np.int64(480))) == (640, 480)


@pytest.mark.parametrize("grid, res, word", [(25, 336, "25"), (24, 300, "300"), (0, 336, "0"), (24, -336, "-336"),
                                             (24.0, 336, "24.0")])
def test_bad_grid_names_the_value(grid, res, word):
    with pytest.raises(DebiasError, match=word):
        check_grid(grid, res)
    with pytest.raises(DebiasError, match=word):
        pad_fractions((640, 480), grid=grid, resolution=res)


def test_grid_not_dividing_resolution_says_so():
    with pytest.raises(DebiasError, match="grid 25 does not divide resolution 336"):
        pad_fractions((640, 480), grid=25)


@pytest.mark.parametrize("thr", [-0.1, 1.5, float("nan"), "0.5", None])
def test_bad_threshold(thr):
    with pytest.raises(DebiasError, match="threshold"):
        check_threshold(thr)


def test_unknown_preprocess():
    with pytest.raises(DebiasError, match="'crop'"):
        pad_fractions((640, 480), preprocess="crop")


# ------------------------------------------------------------------------------- absurd sizes, exact integers

@pytest.mark.parametrize("long_side", [10**17, 10**30, 3 * 10**20])
@pytest.mark.parametrize("landscape", [True, False])
def test_absurd_aspect_ratios_keep_only_the_content_sliver(long_side, landscape):
    """A 10¹⁷×1 image: the band [o·g, (o+1)·g) (units of 1/S patch) lies in patch 11 only. Float arithmetic
    rounded the band to zero width, every patch read pure padding, and the fallback kept all 576."""
    size = (long_side, 1) if landscape else (1, long_side)
    valid = valid_tokens(size)
    line = valid.any(axis=1) if landscape else valid.any(axis=0)   # the padded (short) axis
    assert np.flatnonzero(line).tolist() == [11]
    assert keep_count(size) == 24 == valid.sum()
    fr = pad_fractions(size)
    assert valid_mask(fr, 0.5).sum() == 24 and fr.min() < 1.0     # the float path agrees
    assert keep_count(size, exact=False) == 24                      # official rules: same sliver


@pytest.mark.parametrize("size", [(10**17, 1), (1, 10**17), (2 * 10**17 + 1, 2)])
def test_the_ranking_site_caps_absurd_sizes_to_the_sliver(clean_debias, size):
    debias_core = clean_debias
    debias_core.configure(mode="pad")
    with debias_core.sample(image_size=size, span_start=0):
        assert debias_core.keep_cap(576) == 24


@prop
@given(w=sizes, h=sizes, g=grids, thr=thresholds)
def test_exact_integer_validity_agrees_with_the_float_fractions(w, h, g, thr):
    grid, res = g
    fr = pad_fractions((w, h), grid=grid, resolution=res)
    exact = valid_tokens((w, h), grid=grid, resolution=res, threshold=thr)
    floats = valid_mask(fr, thr)
    # they can only differ where a fraction lies within rounding of the threshold
    assert np.all((exact == floats) | (np.abs(fr - thr) < 1e-12))


def test_exact_comparison_at_the_threshold_is_exact():
    """9×8 on a 3×3 grid: S = 9, o = 0, band [0, 24) in units of 1/9 patch; patch 2 spans [18, 27): overlap 6,
    pad fraction exactly 1/3. The threshold 1/3 as a float is just below the true third, so the patch is
    padding; its float fraction rounds onto the threshold and the float comparison calls it content."""
    thr = 1 / 3
    assert Fraction(thr) < Fraction(1, 3)
    fr = pad_fractions((9, 8), grid=3, resolution=9)
    assert fr[2, 0] == thr and valid_mask(fr, thr)[2].all()          # float path: rounded onto the threshold
    assert not valid_tokens((9, 8), grid=3, resolution=9, threshold=thr)[2].any()
    assert keep_count((9, 8), grid=3, resolution=9, threshold=thr) == 6
    assert valid_tokens((9, 8), grid=3, resolution=9, threshold=0.34)[2].all()


# ------------------------------------------------------------------------------- size limits

@pytest.mark.parametrize("grid, res, words", [
    (2048, 4096, ["grid 2048", "1024"]), (1025, 1025, ["grid 1025", "1024"]),
    (24, 24 * 4096, ["resolution 98304", "65536"]),
])
def test_absurd_grids_and_resolutions_are_refused_naming_the_limit(grid, res, words):
    for call in (lambda: check_grid(grid, res), lambda: pad_fractions((640, 480), grid=grid, resolution=res),
                 lambda: keep_count((640, 480), grid=grid, resolution=res)):
        with pytest.raises(DebiasError) as err:
            call()
        message = str(err.value)
        assert "\n" not in message and all(w in message for w in words), message


def test_the_sample_context_refuses_an_absurd_grid(clean_debias):
    with pytest.raises(DebiasError, match="grid 4096 is too large"):
        with clean_debias.sample(image_size=(640, 480), grid=4096, resolution=4096, span_start=0):
            pass


def test_the_largest_grid_still_works():
    assert keep_count((2, 1), grid=1024, resolution=1024 * 64) == 1024 * 512


# ------------------------------------------------------------------------------- official rules per method

def test_official_rule_is_chosen_per_method():
    assert official_rule("sparsevlm") == official_rule("SparseVLMs") == "bilinear"
    assert {official_rule(m) for m in (None, "fastv", "pdrop", "himap", "tokencarve")} == {"box"}


@pytest.mark.parametrize("size, exact, official_box, official_sparsevlm", [
    ((1147, 1095), 528, 528, 576),   # near-square: SparseVLMs' bilinear mask reads the 26 px border as content
    ((204, 375), 312, 336, 312),     # here SparseVLMs agrees with the exact geometry, not the authors' box rule
    ((640, 480), 432, 432, 432),
])
def test_sparsevlm_official_rule_differs_from_the_box_rule(size, exact, official_box, official_sparsevlm):
    assert keep_count(size) == exact
    assert keep_count(size, exact=False) == keep_count(size, exact=False, method="himap") == official_box
    assert keep_count(size, exact=False, method="sparsevlm") == official_sparsevlm


def test_sparsevlm_official_rule_beyond_its_mask_size_uses_the_exact_geometry():
    from debias_core.geometry import OFFICIAL_MASK_MAX_SIDE
    size = (OFFICIAL_MASK_MAX_SIDE + 2, OFFICIAL_MASK_MAX_SIDE // 2)
    np.testing.assert_array_equal(pad_fractions(size, exact=False, method="sparsevlm"), pad_fractions(size))
