"""debias_core.calibrate: recording sessions, trend fits, provenance, JSON round trips, the no-transductive-fit rule."""
import json
import math
import re

import numpy as np
import pytest
import torch

import debias_core as dc
from debias_core import calibrate as cal
from debias_core.geometry import pad_fractions

pytestmark = pytest.mark.usefixtures("clean_debias")

SIZES = ((640, 480), (480, 640), (500, 500))


def _session(rows=40, b=0.003, boost=1.0, stages=1, seed=0, meta=None, noise=0.25):
    """Scores e^{b·i}·noise (×boost on padding) through the real debias() call, mode off."""
    rng = np.random.default_rng(seed)
    dc.configure(mode="off")
    session = cal.RecordingSession(meta=meta or {"question_file": "calib.jsonl"})
    with session:
        for r in range(rows):
            size = SIZES[r % 3]
            pad = pad_fractions(size).reshape(-1) > 0.5
            s = np.exp(b * np.arange(576)) * rng.lognormal(0, noise, 576) * np.where(pad, boost, 1.0)
            with session.sample(image_size=size, span_start=35, info={"question_id": r}):
                scores, pos = torch.tensor(s), torch.arange(576)
                for st in range(stages):
                    dc.debias(scores, pos, stage=st)
                    keep = torch.randperm(scores.numel(), generator=torch.Generator().manual_seed(r))[: scores.numel() // 2]
                    keep = keep.sort().values
                    scores, pos = scores[keep], pos[keep]
    return session


def test_session_maps_rows_to_samples_and_survives_save_load(tmp_path):
    s = _session(rows=6, stages=2)
    npz, side = s.save(tmp_path / "rec.npz")
    assert side.name == "rec.samples.json" and side.is_file()
    rec = cal.Recording.load(npz)
    assert rec.recorder.stages == [0, 1] and rec.recorder.count(0) == 6 and rec.recorder.count(1) == 6
    assert rec.has_contexts and rec.n_samples(0) == 6
    assert [c["image_size"] for c in rec.contexts(1)] == [list(SIZES[r % 3]) for r in range(6)]
    assert rec.contexts(0)[4]["question_id"] == 4 and rec.meta == {"question_file": "calib.jsonl"}
    np.testing.assert_array_equal(rec.recorder.matrix(1, 576), s.recorder.matrix(1, 576))


def test_batched_sample_rows_map_in_order():
    dc.configure(mode="off")
    s = cal.RecordingSession()
    with s:
        with s.sample([(640, 480), (500, 500)], span_start=35):
            dc.debias(torch.rand(2, 576))
    rec = cal.as_recording(s)
    assert [c["image_size"] for c in rec.contexts(0)] == [[640, 480], [500, 500]]


def test_rows_outside_a_sample_have_no_context(tmp_path):
    dc.configure(mode="off")
    s = cal.RecordingSession()
    with s:
        dc.debias(torch.rand(576))
        with s.sample((640, 480)):
            dc.debias(torch.rand(576))
        dc.debias(torch.rand(576))
        with s.sample((500, 500)):
            dc.debias(torch.rand(576))
    assert [c and c["image_size"] for c in cal.as_recording(s).contexts(0)] == [None, [640, 480], None, [500, 500]]
    s.save(tmp_path / "r.npz")
    rec = cal.Recording.load(tmp_path / "r.npz")
    assert [c and c["image_size"] for c in rec.contexts(0)] == [None, [640, 480], None, [500, 500]]


def test_sample_outside_the_session_is_an_error():
    with pytest.raises(dc.DebiasError, match="inside `with session:`"):
        with cal.RecordingSession().sample((640, 480)):
            pass


def test_merging_recordings_and_a_mismatched_sidecar(tmp_path):
    _session(rows=4, seed=1).save(tmp_path / "a.npz")
    _session(rows=5, seed=2).save(tmp_path / "b.npz")
    rec = cal.Recording.load([tmp_path / "a.npz", tmp_path / "b.npz"])
    assert rec.recorder.count(0) == 9 and rec.n_samples(0) == 9
    assert rec.contexts(0)[4]["question_id"] == 0                     # b's first sample, offset after a's four
    (tmp_path / "b.samples.json").write_text((tmp_path / "a.samples.json").read_text())
    with pytest.raises(dc.DebiasError, match="do not belong together"):
        cal.Recording.load(tmp_path / "b.npz")
    with pytest.raises(dc.DebiasError, match="does not exist"):
        cal.Recording.load(tmp_path / "missing.npz")


def test_calibrate_recovers_the_trend_and_records_provenance(tmp_path):
    b = 0.0025
    s = _session(rows=60, b=b)
    s.save(tmp_path / "rec.npz")
    report = {}
    t = cal.calibrate(tmp_path / "rec.npz", model="llava-v1.5-7b", method="himap", report=report)
    assert isinstance(t, dc.ExponentialTrend) and t.n == 576
    assert t.b == pytest.approx(b, rel=0.05)
    p = t.provenance
    for key in ("model", "method", "stage", "n_samples", "n_rows", "date", "git_sha", "end_start_ratio",
                "held_out_r2", "calibration_set", "recordings"):
        assert key in p, key
    assert p["model"] == "llava-v1.5-7b" and p["method"] == "himap" and p["stage"] == 0 and p["n_samples"] == 60
    assert p["git_sha"] == "unknown" or re.fullmatch(r"[0-9a-f]{40}", p["git_sha"])
    assert re.match(r"\d{4}-\d\d-\d\dT", p["date"]) and p["calibration_set"] == "calib.jsonl"
    assert p["recordings"][0]["file"] == "rec.npz" and len(p["recordings"][0]["sha256"]) == 64
    d = report["stages"][0]
    assert d["a"] == t.a and d["b"] == t.b and d["r2"] == t.r2 and 0.5 < t.r2 <= 1
    assert d["held_out_r2"]["exponential"] > d["held_out_r2"]["table"]   # smooth truth: the fit generalises better
    assert d["table_trend"]["available"]


def test_trend_file_round_trip_through_resolve_trend_and_the_env(tmp_path, monkeypatch):
    t = cal.calibrate(_session(rows=30), model="m", method="pdrop")
    path = cal.write_trend(t, tmp_path / "trend.json")
    back = dc.resolve_trend(f"calibrated:{path}")
    assert back.b == t.b and back.a == t.a and back.provenance["method"] == "pdrop"
    monkeypatch.setenv("DEBIAS", "pos")
    monkeypatch.setenv("DEBIAS_TREND", f"calibrated:{path}")
    dc.reset()
    with dc.sample(image_size=(500, 500)):
        out = dc.debias(torch.ones(576))
    np.testing.assert_allclose(out.numpy(), np.exp(-t.b * np.arange(576)), rtol=1e-6)


def test_multi_stage_gives_a_staged_trend(tmp_path):
    s = _session(rows=40, stages=3, b=0.003)
    t = cal.calibrate(s, model="m", method="pdrop", stages="all", length=576)
    assert isinstance(t, dc.StagedTrend) and sorted(t.stages) == [0, 1, 2]
    for st, sub in t.stages.items():                                  # random halving keeps the trend
        assert sub.b == pytest.approx(0.003, rel=0.15), st
        assert sub.provenance["stage"] == st
    path = cal.write_trend(t, tmp_path / "staged.json")
    data = json.loads(path.read_text())
    assert data["form"] == "staged" and data["provenance"]["model"] == "m"
    back = dc.resolve_trend(f"calibrated:{path}")
    assert back.for_stage(2).b == t.stages[2].b
    only = cal.calibrate(s, model="m", method="pdrop", stages=[1], length=576)
    assert isinstance(only, dc.ExponentialTrend) and only.provenance["stage"] == 1
    with pytest.raises(dc.DebiasError, match=r"stage\(s\) \[7\] were not recorded"):
        cal.calibrate(s, model="m", method="pdrop", stages=[7])
    with pytest.raises(dc.DebiasError, match="outside a span of 300 positions"):
        cal.calibrate(s, model="m", method="pdrop", length=300)


def test_padding_is_left_out_of_the_mean():
    s = _session(rows=60, b=0.002, boost=5.0)
    rec = cal.as_recording(s)
    m = cal.position_matrix(rec, 0, 576, exclude_padding=True, pad_threshold=0.5)
    pad = pad_fractions((640, 480)).reshape(-1) > 0.5
    assert np.isnan(m[0, pad]).all() and np.isfinite(m[0, ~pad]).all() and np.isfinite(m[2]).all()  # row 2 square
    clean = cal.calibrate(s, model="m", method="himap")
    dirty = cal.calibrate(s, model="m", method="himap", exclude_padding=False)
    assert abs(clean.b - 0.002) < abs(dirty.b - 0.002)
    assert "excluded" in clean.provenance["padding"] and dirty.provenance["padding"] == "included"


def test_fit_observed_equals_fit_exponential_when_complete_and_handles_gaps():
    rng = np.random.default_rng(0)
    y = 2.0 * np.exp(0.004 * np.arange(576)) * rng.lognormal(0, 0.1, 576)
    full = cal.fit_observed(y)
    ref = dc.fit_exponential(y)
    assert (full.a, full.b, full.r2) == (ref.a, ref.b, ref.r2)
    gappy = y.copy()
    gappy[::3] = np.nan
    g = cal.fit_observed(gappy)
    assert g.n == 576 and g.b == pytest.approx(0.004, rel=0.05)
    with pytest.raises(dc.DebiasError, match="observed"):
        cal.fit_observed(np.r_[1.0, np.full(10, np.nan)])


def test_loglinear_fit_is_exact_on_a_clean_exponential_and_robust_to_a_spike():
    y = 0.5 * np.exp(0.003 * np.arange(576))
    t = cal.fit_loglinear(y)
    assert t.b == pytest.approx(0.003, rel=1e-9) and t.a == pytest.approx(0.5, rel=1e-9)
    spiked = y.copy()
    spiked[-5:] *= 200                                  # a few huge values at the end (an LLM's last tokens)
    assert abs(cal.fit_loglinear(spiked).b - 0.003) < abs(cal.fit_observed(spiked).b - 0.003)
    s = _session(rows=20)
    assert "log" in cal.calibrate(s, model="m", method="x", fit="loglinear").provenance["fit"]
    with pytest.raises(dc.DebiasError, match="fit 'cubic' is unknown"):
        cal.calibrate(s, model="m", method="x", fit="cubic")


def test_refuses_the_benchmark_as_calibration_set(tmp_path):
    q = tmp_path / "gqa_testdev.jsonl"
    q.write_text('{"question_id": 1}\n')
    copy = tmp_path / "copy.jsonl"
    copy.write_text(q.read_text())
    other = tmp_path / "other.jsonl"
    other.write_text('{"question_id": 2}\n')
    for same in (q, copy):
        with pytest.raises(dc.DebiasError, match="transductive"):
            cal.check_not_benchmark(str(q), str(same))
    with pytest.raises(dc.DebiasError, match="transductive"):
        cal.check_not_benchmark("GQA", "gqa")
    cal.check_not_benchmark(str(q), str(other))
    cal.check_not_benchmark(str(q), None)
    s = _session(rows=8, meta={"question_file": str(q)})   # the recording's own note of its question file
    with pytest.raises(dc.DebiasError, match="transductive"):
        cal.calibrate(s, model="m", method="himap", benchmark=str(copy))


def test_cli_writes_a_trend_and_refuses_a_transductive_fit(tmp_path, capsys):
    _session(rows=24, stages=2).save(tmp_path / "rec.npz")
    out = tmp_path / "t.json"
    rc = cal.main([str(tmp_path / "rec.npz"), "--model", "llava-v1.5-7b", "--method", "PyramidDrop", "--out", str(out),
                   "--table-out", str(tmp_path / "table.json"), "--report", str(tmp_path / "rep.json")])
    assert rc == 0
    text = capsys.readouterr().out
    assert "stage 0:" in text and "stage 1:" in text and "held-out r²" in text
    t = dc.resolve_trend(f"calibrated:{out}")
    assert isinstance(t, dc.StagedTrend) and t.for_stage(0).provenance["method"] == "pdrop"
    table = dc.resolve_trend(str(tmp_path / "table.json"))
    assert isinstance(table, dc.TableTrend) and table.n == 576
    assert set(json.loads((tmp_path / "rep.json").read_text())["stages"]) == {"0", "1"}
    q = tmp_path / "q.jsonl"
    q.write_text("x\n")
    rc = cal.main([str(tmp_path / "rec.npz"), "--model", "m", "--method", "himap", "--out", str(tmp_path / "u.json"),
                   "--calibration-set", str(q), "--benchmark", str(q)])
    assert rc == 2 and "transductive" in capsys.readouterr().err and not (tmp_path / "u.json").exists()


def test_cli_names_bad_input(tmp_path, capsys):
    assert cal.main([str(tmp_path / "none.npz"), "--model", "m", "--method", "x", "--out", str(tmp_path / "t.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    dc.configure(mode="off")
    with dc.recording() as rec:
        pass
    rec.save(tmp_path / "empty.npz")
    assert cal.main([str(tmp_path / "empty.npz"), "--model", "m", "--method", "x", "--out", str(tmp_path / "t.json")]) == 2
    assert "holds no rows" in capsys.readouterr().err


def test_split_half_needs_enough_samples():
    m = np.ones((3, 10))
    assert math.isnan(cal.split_half(m, np.arange(3))["exponential"])


def test_git_sha_outside_a_repository(tmp_path):
    assert cal.git_sha(tmp_path) == "unknown"
