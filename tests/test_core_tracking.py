"""Tracked positions (debias_core.positions): a multi-stage method's survivors carry their debias rows.

The contract: mode off gives upstream's ``torch.arange``; otherwise debiasing with tracked positions equals,
bit for bit, debiasing with the same positions as a long tensor — through any chain of stage selections,
in every mode, with per-stage trends — while the call itself makes no gather (one multiply-add), and any
call the rows were not built for (other settings, another sample, float64, a shape mismatch) still gets
the right answer from the general path."""
import numpy as np
import pytest
import torch

import debias_core as dc
from tests.spy import Spy

pytestmark = pytest.mark.usefixtures("clean_debias")

STAGED = dc.StagedTrend({0: dc.ExponentialTrend(a=1.0, b=0.004, n=576),
                         1: dc.ExponentialTrend(a=1.0, b=0.0015, n=576)})  # stage 2 falls back to stage 0's


def _kept(rng, n, k):
    return torch.from_numpy(np.sort(rng.choice(n, size=k, replace=False)))


def test_off_mode_gives_upstreams_arange():
    dc.configure(mode="off")
    p = dc.positions(576)
    assert type(p) is torch.Tensor and p.dtype == torch.long and torch.equal(p, torch.arange(576))


def test_a_sample_without_image_tracks_nothing():
    """PyramidDrop builds positions for every row, also a text-only one (0 visual tokens) it never ranks."""
    dc.configure(mode="full", trend="paper:pdrop/gqa", method="pdrop")
    with dc.sample(image_size=None, preprocess="none"):
        p = dc.positions(0)
    assert type(p) is torch.Tensor and p.shape == (0,)


@pytest.mark.parametrize("mode", ["pad", "pos", "full"])
@pytest.mark.parametrize("trend", ["paper:pdrop/gqa", STAGED])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_equals_long_positions_through_three_stages(mode, trend, dtype):
    """PyramidDrop's pattern: rank all 576, keep 50 %, rank those, keep 25 %, rank those."""
    dc.configure(mode=mode, trend=trend, method="pdrop")
    rng = np.random.default_rng(0)
    with dc.sample(image_size=(640, 200), span_start=35):
        tracked, plain = dc.positions(576), torch.arange(576)
        for stage, keep in ((0, 288), (1, 144), (2, 72)):
            scores = torch.rand(len(plain), dtype=dtype)
            got = dc.debias(scores, tracked, stage=stage)
            want = dc.debias(scores, plain, stage=stage)
            assert got.dtype == want.dtype == torch.float32
            torch.testing.assert_close(got, want, rtol=0, atol=0)          # -inf == -inf included
            torch.testing.assert_close(dc.mask_padding(scores, tracked), dc.mask_padding(scores, plain), rtol=0, atol=0)
            assert torch.equal(tracked.long(), plain)
            kept = _kept(rng, len(plain), keep)
            tracked, plain = tracked[kept], plain[kept]


def test_stage_trends_are_really_different_rows():
    """Guard against a vacuous equality above: with a staged trend, stage 1 weights differ from stage 0's."""
    dc.configure(mode="pos", trend=STAGED)
    with dc.sample(image_size=(640, 480)):
        p = dc.positions(576)
        s = torch.ones(576)
        w0, w1, w2 = (dc.debias(s, p, stage=k) for k in (0, 1, 2))
    assert not torch.equal(w0, w1) and torch.equal(w0, w2)
    assert p.table.shape == (4, 576)                     # positions, bias, two distinct stage trends


def test_the_call_is_one_multiply_add_without_a_gather():
    dc.configure(mode="full", trend="paper:pdrop/gqa", method="pdrop")
    with dc.sample(image_size=(640, 480), span_start=35):
        p = dc.positions(576)[_kept(np.random.default_rng(1), 576, 144)]
        s = torch.rand(144, dtype=torch.float16)
        dc.debias(s, p, stage=1)
        with Spy() as spy:
            dc.debias(s, p, stage=1)
        with Spy() as plain_spy:
            dc.debias(s, p.long(), stage=1)
    assert spy.ops.count("addcmul") == 1 and not spy.tensor_indexing(), spy.calls
    assert plain_spy.tensor_indexing(), "the spy should see the long-positions path gather (else this test proves nothing)"


def test_reindexing_is_one_gather_and_indexes_like_a_long_tensor():
    """p[kept] gathers every row in one indexing call; any index (negative, int32, a mask, a slice) gives
    what indexing the long positions gives."""
    dc.configure(mode="full", trend="paper:pdrop/gqa", method="pdrop")
    with dc.sample(image_size=(640, 200), span_start=35):
        p, plain = dc.positions(576), torch.arange(576)
        kept = _kept(np.random.default_rng(4), 576, 288)
        with Spy() as spy:
            p[kept]
        assert [op for op in spy.ops if op != "dim"] == ["__getitem__"] and len(spy.tensor_indexing()) == 1, spy.calls
        mask = torch.zeros(576, dtype=torch.bool)
        mask[::3] = True
        for index in (kept, torch.tensor([-1, 0, -576]), kept.int(), mask, slice(100, 400)):
            assert torch.equal(p[index].long(), plain[index]), index
            s = torch.rand(len(plain[index]))
            torch.testing.assert_close(dc.debias(s, p[index]), dc.debias(s, plain[index]), rtol=0, atol=0)


def test_created_once_per_sample_geometry():
    dc.configure(mode="full", trend="paper:pdrop/gqa", method="pdrop")
    with dc.sample(image_size=(640, 480)):
        first = dc.positions(576)
    with dc.sample(image_size=(640, 480)):
        again = dc.positions(576)
    with dc.sample(image_size=(480, 640)):
        other = dc.positions(576)
    assert again is first and other is not first
    assert not torch.equal(other.table[1], first.table[1])  # padding on other sides


def test_rows_built_for_other_settings_or_samples_are_not_used():
    dc.configure(mode="full", trend="paper:pdrop/gqa", method="pdrop")
    kept = _kept(np.random.default_rng(2), 576, 200)
    s = torch.rand(200)
    with dc.sample(image_size=(640, 200)):
        p = dc.positions(576)[kept]
    dc.configure(trend=STAGED)                               # settings changed after the table was built
    with dc.sample(image_size=(640, 200)):
        torch.testing.assert_close(dc.debias(s, p, stage=1), dc.debias(s, kept, stage=1), rtol=0, atol=0)
    with dc.sample(image_size=(200, 640)):                   # another sample's geometry
        got = dc.debias(s, p, stage=1)
        torch.testing.assert_close(got, dc.debias(s, kept, stage=1), rtol=0, atol=0)
    dc.configure(mode="off")
    assert dc.debias(s, p) is s


def test_float64_scores_take_the_general_path():
    dc.configure(mode="full", trend="paper:pdrop/gqa", method="pdrop")
    with dc.sample(image_size=(640, 200)):
        p = dc.positions(576)[100:400]
        s = torch.rand(300, dtype=torch.float64)
        got = dc.debias(s, p)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, dc.debias(s, torch.arange(100, 400)), rtol=0, atol=0)


def test_batch_rows_broadcast_over_one_samples_rows():
    dc.configure(mode="full", trend="paper:pdrop/gqa", method="pdrop")
    with dc.sample(image_size=(640, 200)):
        p = dc.positions(576)
        s = torch.rand(3, 576)
        torch.testing.assert_close(dc.debias(s, p), dc.debias(s, torch.arange(576)), rtol=0, atol=0)


def test_values_are_still_checked_on_cpu():
    dc.configure(mode="full", trend="paper:pdrop/gqa", method="pdrop")
    with dc.sample(image_size=(640, 200)):
        p = dc.positions(576)
        s = torch.rand(576)
        s[7] = float("nan")
        with pytest.raises(dc.DebiasError, match="index 7"):
            dc.debias(s, p)


def test_a_mismatched_shape_is_reported_as_for_long_positions():
    dc.configure(mode="full", trend="paper:pdrop/gqa", method="pdrop")
    with dc.sample(image_size=(640, 200)):
        with pytest.raises(dc.DebiasError, match=r"positions shape \(576,\) does not match scores shape \(300,\)"):
            dc.debias(torch.rand(300), dc.positions(576))


def test_recorder_gets_plain_positions():
    dc.configure(mode="full", trend="paper:pdrop/gqa", method="pdrop")
    with dc.sample(image_size=(640, 200)), dc.recording() as rec:
        p = dc.positions(576)[torch.tensor([3, 40, 500])]
        dc.debias(torch.tensor([0.1, 0.2, 0.3]), p, stage=1)
    (pos, scores), = rec.rows[1]
    assert pos.tolist() == [3, 40, 500] and scores.tolist() == pytest.approx([0.1, 0.2, 0.3])


@pytest.mark.parametrize("call, message", [
    (lambda: dc.positions(-1), r"n=-1\): n must be a non-negative integer"),
    (lambda: dc.positions(5.0), r"n=5.0\): n must be a non-negative integer"),
    (lambda: dc.positions(600), r"n=600\) exceeds the visual span of 576"),
    (lambda: dc.positions(576)[3], r"index with a 1-D index tensor"),
])
def test_bad_use_is_named(call, message):
    dc.configure(mode="full", trend="paper:pdrop/gqa", method="pdrop")
    with dc.sample(image_size=(640, 200)):
        with pytest.raises(dc.DebiasError, match=message):
            call()


def test_needs_one_sample_context():
    dc.configure(mode="pad")
    with pytest.raises(dc.DebiasError, match="needs a sample context"):
        dc.positions(576)
    with dc.sample(image_size=[(640, 200), (200, 640)]):
        with pytest.raises(dc.DebiasError, match="2 sample contexts are active"):
            dc.positions(576)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: tracked positions checked on CPU only")
def test_cuda_tracking_never_synchronises_and_equals_cpu():
    dc.configure(mode="full", trend="paper:pdrop/gqa", method="pdrop")
    kept = _kept(np.random.default_rng(3), 576, 144)
    s = torch.rand(144, dtype=torch.float16)
    kept_gpu, s_gpu = kept.cuda(), s.cuda()                  # pageable host->device copies sync: not in the check
    with dc.sample(image_size=(640, 200)):
        want = dc.debias(s, kept, stage=1)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(2):                                   # cold (table built and uploaded), then warm
                p = dc.positions(576, device="cuda")[kept_gpu]
                got = dc.debias(s_gpu, p, stage=1)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0)
