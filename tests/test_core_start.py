"""debias(scores, indices, start=s0): positions given as sequence indices, counted from the span's start.

The contract: the result equals, bit for bit, ``debias(scores, indices − s0)`` (and likewise mask_padding) in
every mode, dtype and layout; mode off makes no tensor operation at all (a patch that subtracted s0 itself
would launch a kernel in every mode, off included); a warm call is two takes and one addcmul; bad values
are named."""
import numpy as np
import pytest
import torch

import debias_core as dc
from debias_core import site
from tests.spy import Spy

pytestmark = pytest.mark.usefixtures("clean_debias")

S0 = 35
SIZE = (640, 200)  # a wide image: a third of the span is padding, so suppression shows


def _kept(n=288, seed=0):
    """Sorted original positions of n survivors, and their sequence indices."""
    p = torch.from_numpy(np.sort(np.random.default_rng(seed).choice(576, size=n, replace=False)))
    return p, p + S0


def _scores(shape, dtype=torch.float32, seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def test_off_makes_no_tensor_operation():
    dc.configure(mode="off")
    _, idx = _kept()
    s = _scores(288)
    with dc.sample(image_size=SIZE, span_start=S0):
        with Spy() as spy:
            out = dc.debias(s, idx[:], stage=1, start=S0)
            masked = dc.mask_padding(s, idx, start=S0)
    assert out is s and masked is s
    assert spy.ops == ["__getitem__"], spy.ops          # only the test's own idx[:] view


@pytest.mark.parametrize("mode", ["pad", "pos", "full"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["[N]", "[1, N] positions, [2, N] scores", "[B, N] two images"])
def test_equals_debiasing_at_indices_minus_start(mode, dtype, layout):
    dc.configure(mode=mode, trend="paper:himap/gqa", method="himap")
    pos, idx = _kept()
    sizes = SIZE
    if layout == "[N]":
        s = _scores(288, dtype)
    elif layout.startswith("[1, N]"):
        s, pos, idx = _scores((2, 288), dtype), pos[None], idx[None]
        sizes = [SIZE, SIZE]
    else:
        s, sizes = _scores((2, 288), dtype), [SIZE, (300, 500)]
        pos2, idx2 = _kept(seed=1)
        pos, idx = torch.stack([pos, pos2]), torch.stack([idx, idx2])
    with dc.sample(image_size=sizes, span_start=S0):
        for _ in range(2):  # cold (full path), then warm (fast path)
            got, want = dc.debias(s, idx, stage=1, start=S0), dc.debias(s, pos, stage=1)
            got_mask, want_mask = dc.mask_padding(s, idx, start=S0), dc.mask_padding(s, pos)
            assert got.dtype == want.dtype and got.shape == want.shape == s.shape
            assert torch.equal(got, want) and torch.equal(got_mask, want_mask)
    assert torch.isneginf(got).any() == (mode != "pos")  # padding is there: a vacuous compare would not tell


@pytest.mark.parametrize("start", [None, S0])
def test_a_warm_call_is_two_takes_and_one_addcmul(start):
    """Long positions (with or without start): the weight and bias at each position by ``take`` and one
    multiply-add; no subtraction, no 2-row gather (``take`` costs the host less: see site.py)."""
    dc.configure(mode="full", trend="paper:himap/gqa", method="himap")
    pos, idx = _kept()
    p = pos if start is None else idx
    s = _scores(288, torch.float16)
    with dc.sample(image_size=SIZE, span_start=S0):
        dc.debias(s, p, stage=1, start=start)
        with Spy() as spy:
            dc.debias(s, p, stage=1, start=start)
    computing = [op for op in spy.ops if op in {"take", "addcmul", "index_select", "__getitem__", "gather", "sub",
                                                "__sub__", "__rsub__", "add", "__add__", "mul", "remainder", "cat"}]
    assert sorted(computing) == ["addcmul", "take", "take"], spy.ops   # (the rest: CPU value checks)


def test_warm_call_takes_the_fast_path_and_a_new_start_does_not(monkeypatch):
    dc.configure(mode="full", trend="paper:himap/gqa", method="himap")
    idx = torch.arange(100, 388) + S0                 # positions 100..387
    s = _scores(288)
    with dc.sample(image_size=SIZE, span_start=S0):
        first = dc.debias(s, idx, stage=1, start=S0)
        with monkeypatch.context() as m:
            def refuse(*a, **k):
                raise AssertionError("the call took the full path")
            m.setattr(site, "_apply", refuse)
            assert torch.equal(dc.debias(s, idx, stage=1, start=S0), first)
        moved = dc.debias(s, idx, stage=1, start=S0 - 10)      # positions 110..397: a stale entry would not show it
        assert torch.equal(moved, dc.debias(s, idx - (S0 - 10), stage=1))
    assert not torch.equal(moved, first)


@pytest.mark.parametrize("start, message", [
    (-1, r"start=-1 must be a non-negative host integer"),
    (True, r"start=True must be a non-negative host integer"),
    (3.0, r"start=3.0 must be a non-negative host integer"),
    (torch.tensor(35), r"start=tensor\(35\) must be a non-negative host integer"),
])
def test_a_bad_start_is_named(start, message):
    dc.configure(mode="full", trend="paper:himap/gqa", method="himap")
    _, idx = _kept()
    with dc.sample(image_size=SIZE):
        with pytest.raises(dc.DebiasError, match=message):
            dc.debias(_scores(288), idx, start=start)


def test_start_needs_index_positions():
    dc.configure(mode="full", trend="paper:himap/gqa", method="himap")
    with dc.sample(image_size=SIZE):
        with pytest.raises(dc.DebiasError, match="start=35 counts index positions from start.*none given"):
            dc.debias(_scores(576), start=S0)
        tracked = dc.positions(576)[torch.arange(0, 576, 2)]
        with pytest.raises(dc.DebiasError, match="tracked positions are already original positions: drop start"):
            dc.debias(_scores(288), tracked, start=S0)


@pytest.mark.parametrize("bad, value", [("below the span", S0 - 1), ("past the span", S0 + 576), ("-1", -1)])
def test_indices_outside_the_span_are_named_on_both_paths(bad, value):
    dc.configure(mode="full", trend="paper:himap/gqa", method="himap")
    _, idx = _kept()
    s = _scores(288)
    with dc.sample(image_size=SIZE):
        dc.debias(s, idx, start=S0)                          # warm: the next call takes the fast path
        for fresh in (False, True):
            if fresh:
                dc.clear_cache()
            wrong = idx.clone()
            wrong[3] = value
            with pytest.raises(dc.DebiasError, match=rf"position {value} is outside the visual span 35\.\.610 "
                                                     rf"\(positions counted from start=35\)"):
                dc.debias(s, wrong, start=S0)


@pytest.mark.parametrize("mode", ["off", "full"])
def test_the_recorder_gets_raster_positions(mode):
    dc.configure(mode=mode, trend="paper:himap/gqa", method="himap")
    pos, idx = _kept()
    s = _scores(288)
    with dc.sample(image_size=SIZE), dc.recording() as rec:
        dc.debias(s, idx, stage=1, start=S0)
    (row_pos, row_scores), = rec.rows[1]
    assert np.array_equal(row_pos, pos.numpy()) and np.array_equal(row_scores, s.double().numpy())


def test_meta_tensors_read_nothing():
    """No value is read (meta tensors have none), cold or warm; the warm call builds no table."""
    dc.configure(mode="full", trend="paper:himap/gqa", method="himap")
    s = torch.empty(288, dtype=torch.float16, device="meta")
    idx = torch.empty(288, dtype=torch.long, device="meta")
    with dc.sample(image_size=SIZE):
        assert dc.debias(s, idx, start=S0).shape == (288,)
        with Spy() as spy:
            dc.debias(s, idx, start=S0)
    assert not {"cat", "from_numpy", "tensor", "item", "cpu", "tolist"} & set(spy.ops), spy.ops


cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                          reason="no CUDA device: start= was checked on CPU and meta tensors only")


@cuda
def test_cuda_equals_cpu_and_never_synchronises():
    """Also long positions with −1 (merged tokens): ``take`` must wrap them onto the neutral slot on CUDA too."""
    dc.configure(mode="full", trend="paper:himap/gqa", method="himap")
    pos, idx = _kept()
    merged = pos.clone()
    merged[::7] = -1
    s = _scores(288, torch.float16)
    with dc.sample(image_size=SIZE):
        cpu = [dc.debias(s, idx, stage=1, start=S0), dc.debias(s, merged, stage=1), dc.mask_padding(s, merged)]
        sc, ic, mc = s.cuda(), idx.cuda(), merged.cuda()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            runs = [[dc.debias(sc, ic, stage=1, start=S0), dc.debias(sc, mc, stage=1), dc.mask_padding(sc, mc)]
                    for _ in range(2)]                        # cold, then warm
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for run in runs:
        for got, want in zip(run, cpu):
            assert torch.equal(got.cpu(), want)
    assert torch.equal(cpu[1][::7], s[::7].float())            # −1: weight 1, bias 0
