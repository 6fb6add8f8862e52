"""debias(x, positions, mean_dim=d): the site's own torch.mean(x, dim=d) taken inside the call.

The contract: mode off returns exactly upstream's mean; every other mode equals, bit for bit, debiasing
upstream's mean — for one text query (the inference case, where the mean's kernel is saved) and several,
with long, tracked or no positions — and with one query the call makes no reduction at all."""
import numpy as np
import pytest
import torch

import debias_core as dc
from tests.spy import Spy

pytestmark = pytest.mark.usefixtures("clean_debias")


def _attention(queries, n=576, dtype=torch.float16, seed=0):
    """[queries, n] head-averaged attention rows, with exact zeros and a −0.0 (the mean turns it into +0.0)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(queries, n, generator=g).to(dtype)
    x[:, ::50] = 0.0
    x[0, min(7, n - 1)] = -0.0
    return x


def test_off_mode_returns_upstreams_mean():
    dc.configure(mode="off")
    for queries in (1, 3):
        x = _attention(queries)
        got = dc.debias(x, torch.arange(576), mean_dim=0)
        want = torch.mean(x, dim=0)
        assert got.dtype == want.dtype == torch.float16 and got.shape == (576,)
        assert torch.equal(got, want) and torch.equal(torch.signbit(got), torch.signbit(want))


@pytest.mark.parametrize("mode", ["pad", "pos", "full"])
@pytest.mark.parametrize("queries", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("positions", ["none", "long", "tracked"])
def test_equals_debiasing_upstreams_mean(mode, queries, dtype, positions):
    dc.configure(mode=mode, trend="paper:pdrop/gqa", method="pdrop")
    kept = torch.from_numpy(np.sort(np.random.default_rng(0).choice(576, size=288, replace=False)))
    with dc.sample(image_size=(640, 200), span_start=35):
        p = {"none": None, "long": kept, "tracked": dc.positions(576)[kept]}[positions]
        n = 576 if positions == "none" else 288
        x = _attention(queries, n, dtype)
        got = dc.debias(x, p, stage=1, mean_dim=0)
        want = dc.debias(torch.mean(x, dim=0), p, stage=1)
    assert got.shape == want.shape == (n,) and got.dtype == want.dtype == torch.float32
    assert torch.equal(got, want) and torch.equal(torch.signbit(got), torch.signbit(want))
    assert torch.isneginf(got).any() == (mode != "pos")  # the sample has padding: a vacuous compare would not


def test_one_query_makes_no_reduction_and_several_do():
    dc.configure(mode="full", trend="paper:pdrop/gqa", method="pdrop")
    kept = torch.arange(0, 576, 2)
    with dc.sample(image_size=(640, 200), span_start=35):
        p = dc.positions(576)[kept]
        for queries, reduces in ((1, False), (3, True)):
            x = _attention(queries, 288)
            dc.debias(x, p, stage=1, mean_dim=0)  # warm
            with Spy() as spy:
                dc.debias(x, p, stage=1, mean_dim=0)
            assert ("mean" in spy.ops) == reduces, spy.ops
            assert spy.ops.count("addcmul") == 1 and not spy.tensor_indexing(), spy.ops


def test_other_dims():
    dc.configure(mode="full", trend="paper:pdrop/gqa", method="pdrop")
    with dc.sample(image_size=(640, 200), span_start=35):
        x = _attention(2, 576).reshape(2, 1, 576)   # [B=2, queries=1, N]
        want = dc.debias(x[:, 0])
        assert torch.equal(dc.debias(x, mean_dim=1), want) and torch.equal(dc.debias(x, mean_dim=-2), want)


@pytest.mark.parametrize("mean_dim", [2, -3, "0"])
def test_a_bad_dim_is_named(mean_dim):
    dc.configure(mode="full", trend="paper:pdrop/gqa", method="pdrop")
    with dc.sample(image_size=(640, 200)):
        with pytest.raises(dc.DebiasError, match=rf"mean_dim={mean_dim!r} does not fit scores Tensor \(1, 576\)"):
            dc.debias(_attention(1), mean_dim=mean_dim)


def test_recorder_gets_the_mean():
    dc.configure(mode="off")
    x = _attention(3, 4)
    with dc.sample(image_size=(640, 200)), dc.recording() as rec:
        dc.debias(x, torch.tensor([3, 40, 500, 501]), stage=1, mean_dim=0)
    (pos, scores), = rec.rows[1]
    assert pos.tolist() == [3, 40, 500, 501]
    assert scores.tolist() == pytest.approx(torch.mean(x, dim=0).float().tolist())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: mean_dim checked on CPU only")
@pytest.mark.parametrize("queries", [1, 3])
def test_cuda_never_synchronises_and_equals_debiasing_the_mean(queries):
    dc.configure(mode="full", trend="paper:pdrop/gqa", method="pdrop")
    kept = torch.arange(0, 576, 2)
    x = _attention(queries, 288)
    kept_gpu, x_gpu = kept.cuda(), x.cuda()              # pageable host->device copies sync: not in the check
    with dc.sample(image_size=(640, 200)):
        want = dc.debias(torch.mean(x_gpu, dim=0), kept_gpu, stage=1)  # CUDA's own mean (it may round unlike CPU's)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(2):                               # cold, then warm
                got = dc.debias(x_gpu, dc.positions(576, device="cuda")[kept_gpu], stage=1, mean_dim=0)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(got, want)
