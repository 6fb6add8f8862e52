"""The ranking-site call: debias / keep_cap / mask_padding (debias_core.site)."""
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings as hyp_settings, strategies as st

import debias_core as dc
from debias_core import DebiasError

pytestmark = pytest.mark.usefixtures("clean_debias")

N = 576
HIMAP_GQA = "paper:himap/gqa"


def weights(spec=HIMAP_GQA, n=N):
    return torch.from_numpy(dc.resolve_trend(spec).weights(n))


def padding(size, thr=0.5, exact=True):
    """bool [576]: True where the patch is padding, from the geometry."""
    return torch.from_numpy(~dc.valid_mask(dc.pad_fractions(size, exact=exact), thr).reshape(-1))


def ramp(n=N, dtype=torch.float32):
    """Distinct positive scores rising with position (the recency bias, exaggerated)."""
    return torch.linspace(0.5, 2.0, n, dtype=torch.float64).to(dtype)


# ------------------------------------------------------------------------------- mode off

def test_off_returns_the_same_object_and_k_unchanged():
    dc.configure(mode="off")
    s = torch.rand(N)
    assert dc.debias(s) is s
    assert dc.debias(s, torch.arange(N), stage=3) is s
    assert dc.mask_padding(s) is s
    assert dc.keep_cap(10_000) == 10_000
    with dc.sample(image_size=(1000, 101)):           # even with a heavily padded image
        assert dc.debias(s) is s and dc.keep_cap(10_000) == 10_000


def test_off_is_the_default_and_needs_no_context():
    s = torch.rand(3, N)
    assert dc.settings().mode == "off"
    assert dc.debias(s) is s and dc.keep_cap(7) == 7


# ------------------------------------------------------------------------------- pos / pad / full

def test_pos_multiplies_by_the_trend_weight():
    dc.configure(mode="pos", trend=HIMAP_GQA)
    s = ramp()
    with dc.sample(image_size=(400, 200)):
        out = dc.debias(s)
    assert out.dtype == torch.float32 and out.shape == (N,)
    torch.testing.assert_close(out.double(), s.double() * weights(), rtol=1e-6, atol=0)
    assert torch.isfinite(out).all()                  # pos never masks padding
    assert dc.keep_cap(500) == 500                    # nor caps k


def test_pad_sets_padding_to_minus_inf_and_keeps_the_rest():
    dc.configure(mode="pad")
    s = ramp()
    with dc.sample(image_size=(400, 200)):
        out = dc.debias(s)
        cap = dc.keep_cap(500)
    pad = padding((400, 200))
    assert pad.sum() == 288
    assert torch.isneginf(out[pad]).all()
    torch.testing.assert_close(out[~pad], s[~pad], rtol=0, atol=0)
    assert cap == 288
    assert not torch.isinf(s).any()                    # input untouched


def test_full_combines_weight_and_mask():
    dc.configure(mode="full", trend=HIMAP_GQA)
    s = ramp()
    with dc.sample(image_size=(200, 400)):            # portrait: padded columns
        out = dc.debias(s)
    pad = padding((200, 400))
    assert torch.isneginf(out[pad]).all()
    torch.testing.assert_close(out[~pad].double(), (s.double() * weights())[~pad], rtol=1e-6, atol=0)


def test_full_changes_the_selection_the_way_the_paper_intends():
    """Raw ramp scores pick the last (bottom, padded) tokens; debiased scores pick content only."""
    dc.configure(mode="full", trend=HIMAP_GQA)
    s = torch.ones(N) * torch.from_numpy(dc.resolve_trend(HIMAP_GQA).values(np.arange(N))).float()  # pure bias
    with dc.sample(image_size=(400, 200)):
        k = dc.keep_cap(300)
        top = torch.topk(dc.debias(s), k).indices
    pad = padding((400, 200))
    assert k == 288 and not pad[top].any()
    assert pad[torch.topk(s, 300).indices].any()      # raw selection does take padding


def test_square_image_has_nothing_to_suppress():
    dc.configure(mode="pad")
    s = ramp()
    with dc.sample(image_size=(336, 336)):
        assert torch.equal(dc.debias(s), s) and dc.keep_cap(600) == 576


@pytest.mark.parametrize("preprocess", ["none", "anyres"])
def test_unpadded_preprocessing(preprocess):
    dc.configure(mode="full", trend=HIMAP_GQA)
    s = ramp()
    with dc.sample(image_size=(1000, 101), preprocess=preprocess):
        out = dc.debias(s)
        assert dc.keep_cap(100) == 100
    assert torch.isfinite(out).all()


def test_text_only_sample_has_no_padding():
    dc.configure(mode="full", trend=HIMAP_GQA)
    with dc.sample(image_size=None):
        assert torch.isfinite(dc.debias(ramp())).all() and dc.keep_cap(50) == 50


def test_method_threshold_pdrop():
    """PyramidDrop's threshold 0.01 suppresses boundary patches that 0.5 keeps (640×427: 360 vs 384)."""
    s = ramp()
    for method, kept in [("himap", 384), ("pdrop", 360)]:
        dc.configure(mode="pad", method=method)
        with dc.sample(image_size=(640, 427)):
            assert dc.keep_cap(1000) == kept
            assert int(torch.isfinite(dc.debias(s)).sum()) == kept


def test_official_geometry_option():
    dc.configure(mode="pad", method="pdrop", geometry="official")
    with dc.sample(image_size=(640, 427)):
        assert dc.keep_cap(1000) == 384


def test_mask_padding_suppresses_without_weighting():
    dc.configure(mode="full", trend=HIMAP_GQA)
    s = ramp()
    with dc.sample(image_size=(400, 200)):
        out = dc.mask_padding(s)
    pad = padding((400, 200))
    assert torch.isneginf(out[pad]).all() and torch.equal(out[~pad], s[~pad])
    dc.configure(mode="pos")
    with dc.sample(image_size=(400, 200)):
        assert dc.mask_padding(s) is s


# ------------------------------------------------------------------------------- positions

def test_positions_pick_weights_and_padding_of_the_original_raster():
    """After an earlier pruning stage the scores cover a subset; positions say which."""
    dc.configure(mode="full", trend=HIMAP_GQA)
    pos = torch.tensor([575, 0, 300, 10, 250])           # 0, 10 padding rows at 400×200; 250, 300 content
    s = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    with dc.sample(image_size=(400, 200)):
        out = dc.debias(s, pos)
    w, pad = weights(), padding((400, 200))
    for j, p in enumerate(pos.tolist()):
        if pad[p]:
            assert out[j] == float("-inf")
        else:
            assert out[j].item() == pytest.approx(s[j].item() * w[p].item(), rel=1e-6)
    assert pad[575] and pad[0] and not pad[300] and not pad[250]


def test_minus_one_positions_are_neutral():
    dc.configure(mode="full", trend=HIMAP_GQA)
    s = torch.tensor([1.0, 2.0, 3.0])
    with dc.sample(image_size=(400, 200)):
        out = dc.debias(s, torch.tensor([-1, 300, -1]))
    assert out[0] == 1.0 and out[2] == 3.0               # weight 1, never padding
    assert out[1].item() == pytest.approx(2.0 * weights()[300].item(), rel=1e-6)


def test_positions_as_list_or_int32():
    dc.configure(mode="full", trend=HIMAP_GQA)
    s = torch.tensor([1.0, 2.0])
    with dc.sample(image_size=(400, 200)):
        a = dc.debias(s, [300, 301])
        b = dc.debias(s, torch.tensor([300, 301], dtype=torch.int32))
        c = dc.debias(s, np.array([300, 301]))
    assert torch.equal(a, b) and torch.equal(a, c)


def test_stage_picks_the_staged_trend():
    staged = dc.StagedTrend({0: dc.ExponentialTrend(a=1.0, b=0.001, n=N), 1: dc.ExponentialTrend(a=1.0, b=0.004, n=N)})
    dc.configure(mode="pos", trend=staged)
    s = torch.ones(N)
    with dc.sample(image_size=(640, 480)):
        o0, o1, o5 = dc.debias(s, stage=0), dc.debias(s, stage=1), dc.debias(s, stage=5)
    torch.testing.assert_close(o0.double(), torch.exp(-0.001 * torch.arange(N, dtype=torch.float64)), rtol=1e-6, atol=0)
    torch.testing.assert_close(o1.double(), torch.exp(-0.004 * torch.arange(N, dtype=torch.float64)), rtol=1e-6, atol=0)
    assert torch.equal(o5, o0)


# ------------------------------------------------------------------------------- batches

def test_batch_with_per_sample_contexts():
    dc.configure(mode="full", trend=HIMAP_GQA)
    sizes = [(400, 200), (200, 400), (500, 500), None]
    s = ramp().repeat(4, 1) * torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    with dc.sample(image_size=sizes, span_start=[35, 35, 40, 35]):
        out = dc.debias(s)
        caps = [dc.keep_cap(400, sample=b) for b in range(4)]
        batch_cap = dc.keep_cap(400)
    assert out.shape == (4, N)
    w = weights()
    for b, size in enumerate(sizes):
        pad = padding(size) if size else torch.zeros(N, dtype=torch.bool)
        assert torch.isneginf(out[b][pad]).all()
        torch.testing.assert_close(out[b][~pad].double(), (s[b].double() * w)[~pad], rtol=1e-6, atol=0)
    assert caps == [288, 288, 400, 400] and batch_cap == 288   # one k for a batched top-k: the smallest


def test_batch_positions_per_row_and_shared():
    dc.configure(mode="pad")
    s = torch.ones(2, 3)
    with dc.sample(image_size=[(400, 200), (200, 400)]):
        per_row = dc.debias(s, torch.tensor([[0, 300, -1], [0, 300, 23]]))
        shared = dc.debias(s, torch.tensor([0, 300, -1]))
        shared_1n = dc.debias(s, torch.tensor([[0, 300, -1]]))
    # 400×200: row 0 of the grid is padding; 200×400: column 0 and column 23 are padding
    assert per_row.tolist() == [[-np.inf, 1.0, 1.0], [-np.inf, 1.0, -np.inf]]
    assert shared.tolist() == [[-np.inf, 1.0, 1.0], [-np.inf, 1.0, 1.0]]
    assert torch.equal(shared, shared_1n)


def test_one_context_applies_to_every_row():
    dc.configure(mode="pad")
    with dc.sample(image_size=(400, 200)):
        out = dc.debias(torch.ones(3, N))
    assert (torch.isneginf(out).sum(dim=1) == 288).all()


# ------------------------------------------------------------------------------- dtypes

@pytest.mark.parametrize("dtype, out_dtype", [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                                              (torch.float32, torch.float32), (torch.float64, torch.float64)])
def test_dtypes(dtype, out_dtype):
    dc.configure(mode="full", trend=HIMAP_GQA)
    s = ramp(dtype=dtype)
    with dc.sample(image_size=(400, 200)):
        out = dc.debias(s)
    assert out.dtype == out_dtype and s.dtype == dtype
    pad = padding((400, 200))
    expected = s.double() * weights()                 # from the values the caller actually passed
    tol = 1e-14 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(out[~pad].double(), expected[~pad], rtol=tol, atol=0)
    assert torch.isneginf(out[pad]).all()


def test_integer_scores_are_rejected():
    dc.configure(mode="pad")
    with dc.sample(image_size=(400, 200)):
        with pytest.raises(DebiasError, match="float tensor"):
            dc.debias(torch.ones(N, dtype=torch.long))
        with pytest.raises(DebiasError, match=r"\(2, 2, 144\)"):
            dc.debias(torch.ones(2, 2, 144))
        with pytest.raises(DebiasError, match="list"):
            dc.debias([1.0, 2.0])


# ------------------------------------------------------------------------------- bad input

def test_length_mismatch_names_both_shapes():
    dc.configure(mode="pad")
    with dc.sample(image_size=(400, 200)):
        with pytest.raises(DebiasError, match=r"positions shape \(9,\) does not match scores shape \(10,\)"):
            dc.debias(torch.ones(10), torch.arange(9))
        with pytest.raises(DebiasError, match=r"\(3, 10\).*\(2, 10\)"):
            dc.debias(torch.ones(2, 10), torch.zeros(3, 10, dtype=torch.long))
        with pytest.raises(DebiasError, match="integer tensor"):
            dc.debias(torch.ones(3), torch.tensor([0.0, 1.0, 2.0]))
        with pytest.raises(DebiasError, match="600 scores but the visual span has 576"):
            dc.debias(torch.ones(600))


@pytest.mark.parametrize("bad", [576, 10_000, -2])
def test_position_outside_the_span_names_it(bad):
    dc.configure(mode="full", trend=HIMAP_GQA)
    with dc.sample(image_size=(400, 200)):
        with pytest.raises(DebiasError, match=f"position {bad} is outside the visual span 0..575"):
            dc.debias(torch.ones(3), torch.tensor([0, bad, 5]))


def test_trend_shorter_than_the_span():
    dc.configure(mode="pos", trend=dc.ExponentialTrend(a=1.0, b=0.01, n=100))
    with dc.sample(image_size=(400, 200)):
        with pytest.raises(DebiasError, match="576 tokens but the trend covers 100 positions"):
            dc.debias(torch.ones(50))
    with dc.sample(image_size=(400, 200), preprocess="none", span_length=2056):   # Video-LLaVA span, 576 trend
        dc.configure(trend=HIMAP_GQA)
        with pytest.raises(DebiasError, match="2056 tokens but the trend covers 576"):
            dc.debias(torch.ones(2056))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_scores_name_the_value_and_index(value):
    dc.configure(mode="pad")
    s = torch.ones(N)
    s[17] = value
    with dc.sample(image_size=(400, 200)):
        with pytest.raises(DebiasError, match=f"{value} at index 17"):
            dc.debias(s)
        b = torch.ones(2, N)
        b[1, 3] = value
        with pytest.raises(DebiasError, match=rf"{value} at index \(1, 3\)"):
            dc.debias(b)


@pytest.mark.parametrize("k, word", [(0, "k=0"), (-5, "k=-5"), (2.5, "2.5"), (True, "True"), ("8", "'8'"),
                                     (torch.tensor(8), "tensor")])
def test_bad_k(k, word):
    for mode in ("off", "pad"):
        dc.configure(mode=mode)
        with dc.sample(image_size=(400, 200)):
            with pytest.raises(DebiasError, match=word):
                dc.keep_cap(k)


def test_numpy_integer_k_is_fine():
    dc.configure(mode="pad")
    with dc.sample(image_size=(400, 200)):
        assert dc.keep_cap(np.int64(300)) == 288


def test_keep_cap_bad_sample_row():
    dc.configure(mode="pad")
    with dc.sample(image_size=[(400, 200), (500, 500)]):
        with pytest.raises(DebiasError, match="sample 2 is not a row of this batch of 2"):
            dc.keep_cap(10, sample=2)


@pytest.mark.parametrize("mode", ["pad", "pos", "full"])
def test_context_missing_when_the_mode_needs_it(mode):
    dc.configure(mode=mode, trend=HIMAP_GQA)
    with pytest.raises(DebiasError, match=f"debias with DEBIAS={mode} needs a sample context"):
        dc.debias(torch.ones(N))
    if mode != "pos":
        with pytest.raises(DebiasError, match="keep_cap.*needs a sample context"):
            dc.keep_cap(10)
        with pytest.raises(DebiasError, match="mask_padding.*needs a sample context"):
            dc.mask_padding(torch.ones(N))
    else:
        assert dc.keep_cap(10) == 10                  # pos never caps, so needs no context for k


def test_context_count_must_match_the_batch():
    dc.configure(mode="pad")
    with dc.sample(image_size=[(400, 200), (500, 500)]):
        with pytest.raises(DebiasError, match=r"2 sample contexts for scores of shape \(3, 576\)"):
            dc.debias(torch.ones(3, N))
        with pytest.raises(DebiasError, match=r"2 sample contexts for scores of shape \(576,\)"):
            dc.debias(torch.ones(N))


def test_batch_with_different_span_lengths():
    dc.configure(mode="pad")
    with dc.sample(image_size=[None, None], preprocess="none", span_length=[576, 256]):
        with pytest.raises(DebiasError, match=r"different visual span lengths \[576, 256\]"):
            dc.debias(torch.ones(2, 256))


# ------------------------------------------------------------------------------- property


@hyp_settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(w=st.integers(1, 6000), h=st.integers(1, 6000), k=st.integers(1, 2000),
       method=st.sampled_from(["fastv", "pdrop", "himap"]), geometry=st.sampled_from(["exact", "official"]))
def test_keep_cap_is_between_one_and_k_and_matches_the_debiased_count(w, h, k, method, geometry):
    dc.configure(mode="pad", method=method, geometry=geometry)
    with dc.sample(image_size=(w, h)):
        cap = dc.keep_cap(k)
        kept = int(torch.isfinite(dc.debias(torch.ones(N))).sum())
    assert 1 <= cap <= k and cap == min(k, kept) and kept >= 1
