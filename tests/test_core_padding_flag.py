"""debias(..., padding=False): a later stage ranking the survivors of a padding-suppressed, capped stage.

The contract: with positions that hold no padding, the result equals ``debias(...)`` bit for bit in every mode,
dtype and position form (mode pad returns ``scores`` itself); a warm call at long positions is one take and one
addcmul (not two takes); where values are checked, a padding position is a named error; the fast path is keyed
on the flag. Also: a plan without any padding to suppress (a square image, mode pos) gathers no bias either."""
import numpy as np
import pytest
import torch

import debias_core as dc
from debias_core import site
from tests.spy import Spy

pytestmark = pytest.mark.usefixtures("clean_debias")

S0 = 35
SIZE = (640, 200)  # a wide image: a third of the span is padding
COMPUTING = {"take", "addcmul", "mul", "add", "index_select", "gather", "sub", "__getitem__", "where", "stack", "cat"}


def _survivors(k=200, size=SIZE, seed=0):
    """Sorted original positions of the tokens a padding-suppressed, capped stage 0 keeps (mode full)."""
    previous = dc.settings()
    dc.configure(mode="full", trend="paper:himap/gqa", method="himap")
    with dc.sample(image_size=size, span_start=S0):
        s = torch.rand(576, generator=torch.Generator().manual_seed(seed))
        kept = dc.debias(s, stage=0).topk(dc.keep_cap(k)).indices.sort().values
    dc.configure(mode=previous.mode, trend=previous.trend, method=previous.method)
    return kept


def _padding_positions(size=SIZE):
    valid = dc.valid_mask(dc.pad_fractions(size), 0.5).reshape(-1)
    return np.flatnonzero(~valid)


def _scores(shape, dtype=torch.float32, seed=1):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("mode", ["pad", "pos", "full"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("form", ["long", "start", "tracked", "[B, N] two images", "mean_dim"])
def test_equals_debias_when_no_position_is_padding(mode, dtype, form):
    dc.configure(mode=mode, trend="paper:himap/gqa", method="himap")
    kept = _survivors()
    n = len(kept)
    sizes, kwargs, s = SIZE, {}, _scores(n, dtype)
    with dc.sample(image_size=sizes, span_start=S0):
        p = {"long": kept, "start": kept + S0, "tracked": None, "mean_dim": kept}.get(form)
        if form == "start":
            kwargs["start"] = S0
        if form == "tracked":
            p = dc.positions(576)[kept]
        if form == "mean_dim":
            s, kwargs["mean_dim"] = _scores((1, n), dtype), 0
    if form.startswith("[B, N]"):
        other = (300, 500)  # tall: padding left and right
        kept2 = _survivors(size=other, seed=2)[:n]
        p, s, sizes = torch.stack([kept, kept2]), _scores((2, n), dtype), [SIZE, other]
    with dc.sample(image_size=sizes, span_start=S0):
        for _ in range(2):  # cold (full path), then warm (fast path)
            got = dc.debias(s, p, stage=1, padding=False, **kwargs)
            want = dc.debias(s, p, stage=1, **kwargs)
            assert got.shape == want.shape and torch.equal(got, want)
            assert torch.equal(torch.signbit(got), torch.signbit(want))
    raw = s[0] if form == "mean_dim" else s
    if mode == "pad":
        # nothing to apply: scores itself (with mean_dim: the singleton mean as a view of them)
        assert got is raw if form != "mean_dim" else (got.data_ptr() == raw.data_ptr() and got.dtype == raw.dtype)
    else:
        assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert not torch.equal(got, raw.to(got.dtype))  # the weight was applied: not a vacuous compare


@pytest.mark.parametrize("case", ["padding=False", "square image", "mode pos"])
def test_a_warm_call_without_padding_to_suppress_is_one_take_and_one_addcmul(case):
    """At long positions the bias gather is dropped whenever there is nothing to suppress: the caller says
    so (padding=False), the image has no padding, or the mode suppresses none."""
    mode = "pos" if case == "mode pos" else "full"
    size = (336, 336) if case == "square image" else SIZE
    dc.configure(mode=mode, trend="paper:himap/gqa", method="himap")
    kept = _survivors(size=size) + S0
    s = _scores(len(kept), torch.float16)
    flag = {"padding": False} if case == "padding=False" else {}
    raster = kept - S0
    with dc.sample(image_size=size, span_start=S0):
        dc.debias(s, kept, stage=1, start=S0, **flag)
        dc.debias(s, raster, stage=1)
        with Spy() as spy:
            dc.debias(s, kept, stage=1, start=S0, **flag)
        with Spy() as biased:
            dc.debias(s, raster, stage=1)  # padding=True, no start: the general plan
    computing = [op for op in spy.ops if op in COMPUTING]
    assert computing == ["take", "addcmul"], spy.ops
    expected = ["take", "addcmul"] if case != "padding=False" else ["take", "take", "addcmul"]
    assert [op for op in biased.ops if op in COMPUTING] == expected, biased.ops


def test_pad_mode_with_padding_false_makes_no_tensor_operation():
    dc.configure(mode="pad")
    kept = _survivors()
    s = _scores(len(kept))
    with dc.sample(image_size=SIZE, span_start=S0):
        with Spy() as spy:
            out = dc.debias(s, kept, stage=1, padding=False)
    assert out is s and spy.ops == [], spy.ops


@pytest.mark.parametrize("start", [None, S0])
def test_a_padding_position_is_named_on_both_paths(start):
    dc.configure(mode="full", trend="paper:himap/gqa", method="himap")
    kept = _survivors()
    bad = kept.clone()
    bad[5] = int(_padding_positions()[3])
    shift = 0 if start is None else S0
    s = _scores(len(kept))
    with dc.sample(image_size=SIZE, span_start=S0):
        with pytest.raises(dc.DebiasError, match=rf"position {int(bad[5])} is padding.*padding=False"):
            dc.debias(s, bad + shift, stage=1, start=start, padding=False)          # full path
        dc.debias(s, kept + shift, stage=1, start=start, padding=False)              # fills the fast path
        assert any(k[4] is False for k in site._fast)
        with pytest.raises(dc.DebiasError, match=rf"position {int(bad[5])} is padding"):
            dc.debias(s, bad + shift, stage=1, start=start, padding=False)          # fast path
        merged = kept.clone()
        merged[0] = -1
        if start is None:  # −1 marks a merged token: neutral, never padding
            dc.debias(s, merged, stage=1, padding=False)
    dc.configure(mode="pos", trend="paper:himap/gqa", method="himap")
    with dc.sample(image_size=SIZE, span_start=S0):  # pos suppresses nothing: survivors may be padding
        dc.debias(s, bad + shift, stage=1, start=start, padding=False)


def test_the_fast_path_is_keyed_on_padding():
    """A weight-only operation stored for padding=False must not serve padding=True (or the reverse)."""
    dc.configure(mode="full", trend="paper:himap/gqa", method="himap")
    kept = _survivors()
    with_padding = kept.clone()
    with_padding[:3] = torch.from_numpy(_padding_positions()[:3])
    s = _scores(len(kept))
    with dc.sample(image_size=SIZE, span_start=S0):
        dc.debias(s, kept, stage=1, padding=False)
        assert torch.isneginf(dc.debias(s, with_padding, stage=1)).sum() == 3
        assert torch.isfinite(dc.debias(s, kept, stage=1, padding=False)).all()


@pytest.mark.parametrize("value", [None, 0, 1, "no"])
def test_a_bad_padding_value_is_named(value):
    dc.configure(mode="full", trend="paper:himap/gqa", method="himap")
    kept = _survivors()
    with dc.sample(image_size=SIZE, span_start=S0):
        with pytest.raises(dc.DebiasError, match=rf"padding={value!r} must be True or False"):
            dc.debias(_scores(len(kept)), kept, stage=1, padding=value)


def test_the_recorder_gets_raw_scores():
    dc.configure(mode="full", trend="paper:himap/gqa", method="himap")
    kept = _survivors()
    s = _scores(len(kept))
    with dc.sample(image_size=SIZE, span_start=S0), dc.recording() as rec:
        dc.debias(s, kept + S0, stage=1, start=S0, padding=False)
    (positions, scores), = rec.rows[1]
    assert np.array_equal(positions, kept.numpy()) and np.array_equal(scores, s.numpy())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here: the GPU path of padding=False "
                                                          "(sync-free, equal to CPU) is tested on a GPU machine")
def test_cuda_equals_cpu_and_never_synchronises():
    dc.configure(mode="full", trend="paper:himap/gqa", method="himap")
    kept = _survivors() + S0
    s = _scores(len(kept), torch.float16)
    with dc.sample(image_size=SIZE, span_start=S0):
        want = dc.debias(s, kept, stage=1, start=S0, padding=False)
        sc, kc = s.cuda(), kept.cuda()
        dc.debias(sc, kc, stage=1, start=S0, padding=False)  # cold: builds and uploads the tables
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = dc.debias(sc, kc, stage=1, start=S0, padding=False)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(got.cpu(), want)


def test_tracked_positions_stay_one_addcmul():
    """Tracked positions carry their (zero) bias: padding=False keeps their one-kernel path, no long() gather."""
    dc.configure(mode="full", trend="paper:himap/gqa", method="himap")
    kept = _survivors()
    s = _scores(len(kept), torch.float16)
    with dc.sample(image_size=SIZE, span_start=S0):
        p = dc.positions(576)[kept]
        dc.debias(s, p, stage=1, padding=False)
        with Spy() as spy:
            out = dc.debias(s, p, stage=1, padding=False)
    assert [op for op in spy.ops if op in COMPUTING | {"long", "to"}] == ["__getitem__", "__getitem__", "addcmul"], spy.ops
    assert torch.isfinite(out).all()
