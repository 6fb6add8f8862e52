"""Recording mode (debias_core.recording): raw score rows for calibration."""
import numpy as np
import pytest
import torch

import debias_core as dc

pytestmark = pytest.mark.usefixtures("clean_debias")


@pytest.mark.parametrize("mode", ["off", "full"])
def test_records_the_raw_scores_in_any_mode(mode):
    dc.configure(mode=mode, trend="paper:himap/gqa")
    s = torch.linspace(1.0, 2.0, 576, dtype=torch.float16)
    with dc.sample(image_size=(400, 200)):
        with dc.recording() as rec:
            out = dc.debias(s)
    assert rec.stages == [0] and rec.count(0) == 1
    np.testing.assert_array_equal(rec.matrix(0)[0], s.double().numpy())        # raw, not debiased
    if mode == "off":
        assert out is s
    else:
        assert not np.array_equal(out.double().numpy(), s.double().numpy())


def test_rows_stages_and_positions():
    dc.configure(mode="off")
    with dc.recording() as rec:
        dc.debias(torch.ones(2, 576))                                   # two rows, positions 0..575
        dc.debias(torch.tensor([5.0, 7.0, 9.0]), torch.tensor([3, -1, 10]), stage=1)
        dc.debias(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[0, 1], [1, 2]]), stage=1)
    assert rec.stages == [0, 1] and rec.count(0) == 2 and rec.count(1) == 3
    m = rec.matrix(1, length=12)
    assert m.shape == (3, 12)
    assert m[0, 3] == 5.0 and m[0, 10] == 9.0 and np.isnan(m[0, 0])   # the −1 (merged) token is not placed
    assert m[1, :3].tolist()[:2] == [1.0, 2.0] and m[2, 1:3].tolist() == [3.0, 4.0]
    mean = rec.mean_by_position(1, length=12)
    assert mean[1] == pytest.approx((2.0 + 3.0) / 2) and mean[3] == 5.0 and np.isnan(mean[4])


def test_nothing_is_recorded_outside_the_block():
    with dc.recording() as rec:
        pass
    dc.debias(torch.ones(576))
    assert rec.stages == []
    with pytest.raises(dc.DebiasError, match="nothing was recorded at stage 0"):
        rec.matrix(0)


def test_an_existing_recorder_accumulates():
    rec = dc.Recorder()
    for _ in range(3):
        with dc.recording(rec):
            dc.debias(torch.ones(576))
    assert rec.count(0) == 3


def test_save_load_roundtrip_without_pickle(tmp_path):
    with dc.recording() as rec:
        dc.debias(torch.rand(2, 576))
        dc.debias(torch.rand(100), torch.arange(100) * 5, stage=2)
    path = tmp_path / "scores.npz"
    rec.save(path)
    with np.load(path, allow_pickle=False) as z:                # plain numeric arrays only
        assert all(z[k].dtype != object for k in z.files)
    back = dc.Recorder.load(path)
    assert back.stages == rec.stages
    for st in rec.stages:
        np.testing.assert_array_equal(back.matrix(st, 576), rec.matrix(st, 576))


def test_recorded_means_fit_a_trend():
    """Calibration loop end-to-end: record biased scores, fit, and the fit finds the bias."""
    rng = np.random.default_rng(0)
    i = np.arange(576)
    with dc.recording() as rec:
        for _ in range(32):
            row = 1e-3 * np.exp(0.003 * i) * (1 + 0.1 * rng.standard_normal(576))
            dc.debias(torch.from_numpy(row).float())
    t = dc.fit_exponential(rec.mean_by_position(0, 576))
    assert t.b == pytest.approx(0.003, abs=5e-5)
