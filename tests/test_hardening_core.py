"""Bad input to debias_core never yields silently wrong numbers or a traceback.

- Trends are validated wherever they are built (JSON file, fit, code): every weight over the span is a normal
  float32, checked here against an independent computation; fits refuse non-positive means.
- No mode turns finite scores into NaN, nor into ±inf except the −inf that padding suppression puts on padding
  (hypothesis over trends, images, dtypes, positions and scores, through the public ``debias`` call).
- DEBIAS_CHECK and the other variables are parsed strictly ("off" used to mean on).
- ``python -m debias_core`` and ``python -m debias_core.calibrate``: one ``error:`` line, exit 2 (130 on
  Ctrl-C), and no output file for bad input.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings, strategies as st

import debias_core as dc
from debias_core import calibrate as cal
from debias_core import cli
from debias_core.cli import main as cli_main, build_parser
from debias_core.config import from_env
from debias_core.trend import ExponentialTrend, TableTrend, fit_exponential
from tests.support import ROOT

pytestmark = pytest.mark.usefixtures("clean_debias")

F32_TINY = float(np.finfo(np.float32).tiny)
F32_MAX = float(np.finfo(np.float32).max)


def _in_float32(w: np.ndarray) -> bool:
    return bool(np.all(np.isfinite(w) & (w >= F32_TINY) & (w <= F32_MAX)))


def test_weight_bounds_are_float32_normal_range():
    from debias_core import trend

    assert (trend.WEIGHT_MIN, trend.WEIGHT_MAX) == (F32_TINY, F32_MAX)


# ----------------------------------------------------------------------------------- trend validation

@settings(max_examples=300, deadline=None)
@given(b=st.one_of(st.floats(-0.5, 0.5), st.floats(-0.2, 0.2).map(lambda x: x / 10)), n=st.integers(2, 3000))
def test_exponential_trend_is_accepted_iff_its_weights_fit_float32(b, n):
    with np.errstate(over="ignore", under="ignore"):
        expected_ok = _in_float32(np.exp(-b * np.arange(n, dtype=np.float64)))   # written out independently
    try:
        t = ExponentialTrend(a=1.0, b=b, n=n)
    except dc.DebiasError as e:
        assert not expected_ok, f"b={b}, n={n} was refused although its weights fit float32: {e}"
        assert f"b = {b!r}" in str(e) and f"0..{n - 1}" in str(e)   # names the parameter, its value, the span
        return
    assert expected_ok, f"b={b}, n={n} was accepted although exp(-b·i) leaves float32 on 0..{n - 1}"
    assert _in_float32(t.weights())


@pytest.mark.parametrize("doc, words", [
    ({"form": "exponential", "a": 1.0, "b": -1.0, "n": 576}, ["b = -1.0", "0..575", "float32"]),
    ({"form": "exponential", "a": 1.0, "b": 0.2, "n": 576}, ["b = 0.2", "0..575"]),
    ({"form": "table", "values": [1e-30, 1e30]}, ["table trend", "w_1"]),
    ({"form": "polynomial", "coef": [1.0, 1e40], "x_scale": 1.0, "n": 4}, ["polynomial", "coef"]),
    ({"form": "staged", "stages": {"0": {"form": "exponential", "a": 1.0, "b": 1e-3, "n": 576},
                                   "1": {"form": "exponential", "a": 1.0, "b": 0.5, "n": 576}}}, ["stage 1", "b = 0.5"]),
])
def test_trend_file_with_unrepresentable_weights_is_refused(doc, words, tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(dc.DebiasError) as e:
        dc.configure(mode="pos", trend=str(path))
    for w in words:
        assert w in str(e.value), str(e.value)
    assert "t.json" in str(e.value)
    assert dc.settings().mode == "off"  # the refused configure changed nothing


@pytest.mark.parametrize("make", [
    lambda: ExponentialTrend(a=float("nan"), b=0.0, n=10),
    lambda: ExponentialTrend(a=1.0, b=float("inf"), n=10),
    lambda: ExponentialTrend(a=-1.0, b=0.0, n=10),
    lambda: ExponentialTrend(a=1.0, b=0.0, n=1),
    lambda: TableTrend([1.0, 0.0, 2.0]),
    lambda: TableTrend([1.0, float("nan")]),
    lambda: dc.PolynomialTrend(coef=[1.0], x_scale=0.0, n=5),
    lambda: dc.StagedTrend({}),
])
def test_trends_built_in_code_are_validated_too(make):
    with pytest.raises(dc.DebiasError):
        make()


@pytest.mark.parametrize("means, word", [
    (np.r_[np.full(10, 0.5), 0.0, np.full(10, 0.5)], "position 10 is 0.0"),
    (np.r_[np.full(5, 0.5), -0.25, np.full(5, 0.5)], "position 5 is -0.25"),
])
def test_fit_refuses_non_positive_means(means, word):
    """An exponential is positive everywhere; before, the fit silently skipped these positions in its start and
    fitted through them."""
    with pytest.raises(dc.DebiasError, match=word):
        fit_exponential(means)
    with pytest.raises(dc.DebiasError, match=word):
        cal.fit_loglinear(means)


def test_fit_whose_trend_would_leave_float32_is_refused():
    y = np.exp(0.3 * np.arange(576.0)) * 1e-70    # positive, but weights e^{-0.3 i} underflow float32
    with pytest.raises(dc.DebiasError, match=r"the fitted trend is unusable: .*b = 0\.3.*0\.\.575"):
        fit_exponential(y)


# ------------------------------------------------------------- debias(): finite scores stay finite

@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mode=st.sampled_from(["off", "pad", "pos", "full"]),
       trend=st.one_of(
           st.tuples(st.just("exp"), st.floats(-0.3, 0.3), st.integers(576, 700)),   # about half are refused
           st.tuples(st.just("table"), st.integers(0, 2 ** 31), st.floats(0.0, 90.0))),
       size=st.tuples(st.integers(1, 3000), st.integers(1, 3000)),
       threshold=st.sampled_from([0.01, 0.5, 1.0]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
       positions_kind=st.sampled_from(["none", "subset", "tracked"]),
       data=st.data())
def test_no_mode_turns_finite_scores_into_nan_or_inf(mode, trend, size, threshold, dtype, positions_kind, data):
    if trend[0] == "exp":
        try:
            t = ExponentialTrend(a=1.0, b=trend[1], n=trend[2])
        except dc.DebiasError:
            assume(False)   # refused (weights outside float32): nothing to debias with
    else:
        rng = np.random.default_rng(trend[1])
        decades = rng.uniform(-trend[2] / 2, trend[2] / 2, 576)      # values spanning up to 90 decades
        try:
            t = TableTrend(10.0 ** decades)
        except dc.DebiasError:
            assume(False)
    dc.clear_cache()
    dc.configure(mode=mode, trend=t, pad_threshold=threshold)
    w = t.weights(576)
    # the largest finite magnitude whose product with every weight stays inside float32 (and the dtype)
    bound = min(float(torch.finfo(dtype).max), F32_MAX / max(1.0, float(w.max()))) * 0.5
    # hypothesis' edge values (0, −0, ±bound, tiny) at random positions; log-uniform magnitudes elsewhere
    special = data.draw(st.lists(st.floats(-bound, bound, allow_nan=False, allow_infinity=False), min_size=1,
                                 max_size=32))
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 31)))
    values = rng.choice([-1.0, 1.0], 576) * bound * 10.0 ** rng.uniform(-45, 0, 576)
    values[rng.permutation(576)[:len(special)]] = special
    scores = torch.tensor(values, dtype=torch.float64).to(dtype)
    assert torch.isfinite(scores).all()
    with dc.sample(image_size=size, span_start=35):
        if positions_kind == "none":
            out, pos = dc.debias(scores), torch.arange(576)
        else:
            keep = torch.tensor(sorted(data.draw(st.sets(st.integers(0, 575), min_size=1, max_size=576))))
            pos = keep
            p = dc.positions(576)[keep] if positions_kind == "tracked" else keep
            out, scores = dc.debias(scores[keep], p), scores[keep]
    assert not torch.isnan(out).any(), "debias produced NaN from finite scores"
    padding = ~torch.from_numpy(dc.valid_mask(dc.pad_fractions(size), threshold).reshape(-1))[pos]
    suppressed = padding if mode in ("pad", "full") else torch.zeros_like(padding)
    assert torch.isfinite(out[~suppressed]).all(), "debias turned finite scores into ±inf"
    assert (out[suppressed] == -torch.inf).all(), "padding must be −inf in pad/full"


def test_attention_scores_stay_finite_for_every_accepted_exponential():
    """The bound above is no escape hatch: for scores in [0, 1] (attention) every accepted trend gives finite
    output — the largest accepted weight is ≤ float32 max."""
    for b in np.linspace(-0.16, 0.16, 41):
        try:
            t = ExponentialTrend(a=1.0, b=float(b), n=576)
        except dc.DebiasError:
            continue
        dc.configure(mode="pos", trend=t)
        with dc.sample(image_size=(640, 480), span_start=35):
            out = dc.debias(torch.rand(2, 576))  # [B, N]
        assert torch.isfinite(out).all(), f"b={b}"


# --------------------------------------------------------------------------------- environment

@pytest.mark.parametrize("word, on", [("1", True), ("0", False), ("true", True), ("False", False), ("ON", True),
                                      ("off", False), ("Off", False), ("yes", True), ("NO", False), (" on ", True)])
def test_debias_check_accepts_yes_no_words(word, on):
    assert from_env({"DEBIAS_CHECK": word}).checks is on


@pytest.mark.parametrize("word", ["maybe", "2", "enabled", "offf", "-1"])
def test_debias_check_refuses_anything_else(word):
    with pytest.raises(dc.DebiasError, match=f"DEBIAS_CHECK={word!r} is not a yes/no value"):
        from_env({"DEBIAS_CHECK": word})


@pytest.mark.parametrize("env, word", [
    ({"DEBIAS_PAD_THRESHOLD": "nan"}, "DEBIAS_PAD_THRESHOLD='nan'"),
    ({"DEBIAS_PAD_THRESHOLD": "-0.1"}, "DEBIAS_PAD_THRESHOLD='-0.1'"),
    ({"DEBIAS_GEOMETRY": "exactly"}, "geometry 'exactly'"),
    ({"DEBIAS": "of"}, "debias mode 'of'"),
])
def test_bad_environment_values_are_named(env, word):
    with pytest.raises(dc.DebiasError, match=word):
        from_env(env)


def test_environment_words_ignore_case_and_empty_means_unset():
    s = from_env({"DEBIAS": "PAD", "DEBIAS_GEOMETRY": "Official", "DEBIAS_PAD_THRESHOLD": "", "DEBIAS_CHECK": ""})
    assert (s.mode, s.exact_geometry, s.pad_threshold, s.checks) == ("pad", False, 0.5, False)
    with pytest.raises(dc.DebiasError, match="checks='maybe'"):
        dc.configure(checks="maybe")


# ------------------------------------------------------------------------------ command lines

def _cli(*args, module="debias_core", env=None):
    """The real entry point in a subprocess (a few per file: each costs an interpreter start)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("DEBIAS")}
    full.update(PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, env=full, timeout=300)


def _one_error_line(r, *words):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0], lines[0]


class _InProcess:
    """``main(argv)`` in this process, answering like a CompletedProcess (returncode, stdout, stderr)."""

    def __init__(self, main, capsys, monkeypatch):
        self.main, self.capsys, self.monkeypatch = main, capsys, monkeypatch

    def __call__(self, *args, env=None):
        with self.monkeypatch.context() as m:
            for k, v in (env or {}).items():
                m.setenv(k, v)
            try:
                code = self.main([str(a) for a in args])
            except SystemExit as e:  # argparse
                code = e.code
        out, err = self.capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)


def test_entry_point_answers_bad_input_with_one_line(tmp_path):
    (tmp_path / "b.json").write_text(json.dumps({"form": "exponential", "a": 1, "b": -1.0, "n": 576}))
    _one_error_line(_cli("show", "--trend", tmp_path / "b.json", env={"DEBIAS_CHECK": "off"}), "b = -1.0", "0..575")


def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    cli = _InProcess(cli_main, capsys, monkeypatch)
    zeros = np.full((3, 20), 0.5)
    zeros[:, 7] = 0.0
    np.save(tmp_path / "zeros.npy", zeros)
    (tmp_path / "b.json").write_text(json.dumps({"form": "exponential", "a": 1, "b": -1.0, "n": 576}))
    (tmp_path / "a_file").write_text("x")
    _one_error_line(cli("fit", "--scores", tmp_path / "zeros.npy", "--out", tmp_path / "t.json"), "position 7")
    assert not (tmp_path / "t.json").exists()
    _one_error_line(cli("show", "--trend", tmp_path / "b.json"), "b = -1.0", "0..575")
    _one_error_line(cli("weights", "--preset", "paper:himap/gqa", "--out", tmp_path / "a_file" / "w.npy"),
                    "cannot write", "a_file/w.npy")
    _one_error_line(cli("show", "--list", env={"DEBIAS_CHECK": "maybe"}), "DEBIAS_CHECK='maybe'")
    _one_error_line(cli("fit", "--scorez", "x"), "required: --scores")
    _one_error_line(cli("fit", "--scores", tmp_path / "a_file", "--out", tmp_path / "t.json"), "a_file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "b.json", "zeros.npy"]  # no temp files left


def test_exit_codes_are_documented():
    epilog = build_parser().epilog
    assert "2    bad input" in epilog and "130  interrupted" in epilog
    assert "130  interrupted" in cal.build_parser().epilog and "exit status: 0 done" in cal.__doc__.lower()
    assert "Exit status: 0 done; 2 bad input" in cli.__doc__


def test_ctrl_c_is_one_line_and_exit_130(capsys):
    def body(args):
        raise KeyboardInterrupt

    assert cli.run_main(body, build_parser(), ["show", "--list"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: interrupted")
    assert cli_main(["show", "--list"]) == 0


def _recording(tmp_path, observed=576, mean=0.5):
    dc.configure(mode="off")
    session = cal.RecordingSession(meta={"question_file": "calib.jsonl"})
    rng = np.random.default_rng(0)
    with session:
        for r in range(6):
            with session.sample(image_size=(500, 500), span_start=35):
                pos = torch.arange(observed)
                dc.debias(torch.tensor(mean * np.exp(0.002 * np.arange(observed)) * rng.uniform(0.9, 1.1, observed)),
                          pos)
    return session.save(tmp_path / "rec.npz")[0]


def test_calibrate_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    calibrate = _InProcess(cal.main, capsys, monkeypatch)
    (tmp_path / "a_file").write_text("x")
    np.save(tmp_path / "not_a_recording.npy", np.ones(4))
    out = tmp_path / "trend.json"
    common = ["--model", "m", "--method", "fastv", "--out", out]
    _one_error_line(calibrate(tmp_path / "a_file", *common), "is not a .npz")
    _one_error_line(calibrate(tmp_path / "not_a_recording.npy", *common), "is not a .npz")
    rec = _recording(tmp_path, observed=300)   # positions 300..575 never observed: no table trend possible
    # --table-out is refused: before, the trend file had already been written when the table failed
    _one_error_line(calibrate(rec, *common, "--length", 576, "--table-out", tmp_path / "table.json"), "non-finite")
    _one_error_line(calibrate(rec, "--model", "m", "--method", "fastv", "--out", tmp_path / "a_file" / "t.json"),
                    "--out", "a_file")
    _one_error_line(calibrate(rec, *common, "--pad-threshold", 7), "threshold 7.0")
    _one_error_line(calibrate(rec, *common, env={"DEBIAS_GEOMETRY": "round"}), "geometry 'round'")
    _one_error_line(calibrate(rec, *common, "--stages", "x"), "--stages 'x'")
    assert not out.exists() and not (tmp_path / "table.json").exists()
    r = calibrate(rec, *common, "--length", 576)   # the same recording, good options
    assert r.returncode == 0, r.stderr
    assert dc.load_trend_file(out).n == 576


def test_calibrate_refuses_non_positive_means(tmp_path, capsys, monkeypatch):
    rec = _recording(tmp_path, mean=-0.5)
    r = _InProcess(cal.main, capsys, monkeypatch)(rec, "--model", "m", "--method", "fastv", "--out", tmp_path / "t.json")
    _one_error_line(r, "≤ 0", "exponential")
    assert not (tmp_path / "t.json").exists()
