"""`python -m debias_core` weights / padmask / fit / show, run as subprocesses (happy paths and the
exit status of errors), with the remaining error cases through the same main() in-process."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import debias_core as dc
from debias_core.cli import main

REPO = Path(__file__).resolve().parents[1]


def cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "debias_core", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


# ------------------------------------------------------------------------------- weights

def test_weights_writes_the_float64_vector(tmp_path):
    out = tmp_path / "w.npy"
    r = cli("weights", "--preset", "paper:himap/gqa", "--out", out)
    assert r.returncode == 0, r.stderr
    w = np.load(out, allow_pickle=False)
    assert w.dtype == np.float64 and w.shape == (576,)
    np.testing.assert_array_equal(w, np.exp(-2.172256788986171e-03 * np.arange(576)))


def test_weights_n_and_fastv(tmp_path):
    assert main(["weights", "--preset", "paper:fastv", "--n", "100", "--out", str(tmp_path / "f.npy")]) == 0
    w = np.load(tmp_path / "f.npy")
    np.testing.assert_array_equal(w, dc.resolve_trend("paper:fastv").weights(100))


@pytest.mark.parametrize("argv, word", [
    (["--preset", "paper:himap/imagenet"], "'imagenet'"),
    (["--preset", "paper:nosuch/gqa"], "'nosuch'"),
    (["--preset", "himap/gqa"], "'himap/gqa' is not a paper preset"),
    (["--preset", "paper:himap/gqa", "--n", "0"], "--n 0"),
    (["--preset", "paper:himap/gqa", "--n", "577"], "576 positions, asked for 577"),
])
def test_weights_errors(argv, word, tmp_path, capsys):
    assert main(["weights", *argv, "--out", str(tmp_path / "w.npy")]) == 2
    assert word in capsys.readouterr().err
    assert not (tmp_path / "w.npy").exists()


# ------------------------------------------------------------------------------- padmask

def test_padmask_json_format():
    r = cli("padmask", "--image-size", "640x427", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert set(doc) == {"grid", "pad_fraction", "keep_cap"}
    assert doc["grid"] == 24 and doc["keep_cap"] == 384
    fr = np.array(doc["pad_fraction"])
    assert fr.shape == (24, 24)
    np.testing.assert_allclose(fr, dc.pad_fractions((640, 427)), rtol=0, atol=1e-12)


def test_padmask_threshold_grid_resolution_geometry(capsys):
    assert main(["padmask", "--image-size", "640x427", "--threshold", "0.01", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["keep_cap"] == 360
    assert main(["padmask", "--image-size", "640x427", "--threshold", "0.01", "--geometry", "official", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["keep_cap"] == 384
    assert main(["padmask", "--image-size", "400X200", "--grid", "16", "--resolution", "224", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["grid"] == 16 and np.array(doc["pad_fraction"]).shape == (16, 16) and doc["keep_cap"] == 128
    assert main(["padmask", "--image-size", "1x5000", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["keep_cap"] >= 1


def test_padmask_text():
    r = cli("padmask", "--image-size", "400x200")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "288 of 576 patches kept" in lines[0]
    rows = [list(map(float, line.split())) for line in lines[1:]]
    assert len(rows) == 24 and all(len(row) == 24 for row in rows)
    assert rows[0][0] == 1.0 and rows[12][0] == 0.0


def test_padmask_bad_image_size_exit_status():
    r = cli("padmask", "--image-size", "0x480")
    assert r.returncode == 2 and "width 0" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("argv, word", [
    (["--image-size", "640x480", "--grid", "25"], "grid 25 does not divide resolution 336"),
    (["--image-size", "640x-480"], "height -480"),
    (["--image-size", "640x480", "--threshold", "1.5"], "threshold 1.5"),
])
def test_padmask_value_errors(argv, word, capsys):
    assert main(["padmask", *argv]) == 2
    assert word in capsys.readouterr().err


@pytest.mark.parametrize("text", ["640", "640x480x3", "12.5x3", "axb"])
def test_padmask_unparsable_size(text, capsys):
    with pytest.raises(SystemExit) as e:
        main(["padmask", "--image-size", text])
    assert e.value.code == 2 and repr(text) in capsys.readouterr().err


# ------------------------------------------------------------------------------- fit

def test_fit_writes_the_trend_json(tmp_path):
    rng = np.random.default_rng(1)
    rows = 2e-3 * np.exp(0.0025 * np.arange(576)) * (1 + 0.05 * rng.standard_normal((40, 576)))
    np.save(tmp_path / "scores.npy", rows)
    r = cli("fit", "--scores", tmp_path / "scores.npy", "--out", tmp_path / "trend.json")
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp_path / "trend.json").read_text())
    assert {"form", "a", "b", "n", "r2"} <= set(doc) and set(doc) - {"form", "a", "b", "n", "r2"} <= {"provenance"}
    assert doc["form"] == "exponential" and doc["n"] == 576
    assert doc["a"] == pytest.approx(2e-3, rel=0.01) and doc["b"] == pytest.approx(0.0025, abs=3e-5)
    assert 0.9 < doc["r2"] <= 1.0
    ref = dc.fit_exponential(rows)
    assert (doc["a"], doc["b"], doc["r2"]) == (ref.a, ref.b, ref.r2)
    # the written file is a usable trend
    assert dc.resolve_trend(str(tmp_path / "trend.json")).b == doc["b"]


def test_fit_1d_mean_vector(tmp_path):
    np.save(tmp_path / "mean.npy", 0.5 * np.exp(0.001 * np.arange(300)))
    assert main(["fit", "--scores", str(tmp_path / "mean.npy"), "--out", str(tmp_path / "t.json")]) == 0
    doc = json.loads((tmp_path / "t.json").read_text())
    assert doc["n"] == 300 and doc["b"] == pytest.approx(0.001, rel=1e-9)


def test_fit_refuses_pickles_and_bad_scores(tmp_path, capsys):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}, 2], dtype=object), allow_pickle=True)
    r = cli("fit", "--scores", tmp_path / "obj.npy", "--out", tmp_path / "t.json")
    assert r.returncode == 2 and "pickle" in r.stderr.lower() and "Traceback" not in r.stderr
    np.save(tmp_path / "nan.npy", np.array([1.0, np.nan, 2.0]))
    assert main(["fit", "--scores", str(tmp_path / "nan.npy"), "--out", str(tmp_path / "t.json")]) == 2
    assert "position 1" in capsys.readouterr().err
    assert main(["fit", "--scores", str(tmp_path / "absent.npy"), "--out", str(tmp_path / "t.json")]) == 2
    assert "absent.npy" in capsys.readouterr().err
    assert not (tmp_path / "t.json").exists()


# ------------------------------------------------------------------------------- show

def test_show_preset():
    r = cli("show", "--trend", "paper:himap/gqa")
    assert r.returncode == 0, r.stderr
    first, second = r.stdout.splitlines()[:2]
    assert json.loads(first)["b"] == 2.172256788986171e-03
    w = dc.resolve_trend("paper:himap/gqa").weights()
    assert f"from {w.max():.4f} to {w.min():.4f}" in second and "576 positions" in second


def test_show_file_staged_and_list(tmp_path, capsys):
    staged = dc.StagedTrend({0: dc.ExponentialTrend(a=1.0, b=0.001, n=576),
                             1: dc.PolynomialTrend(coef=[1.0, 1.0], x_scale=575.0, n=576)})
    dc.save_trend(staged, tmp_path / "s.json")
    assert main(["show", "--trend", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert json.loads(out[0])["form"] == "staged"
    assert out[1].startswith("stage 0: f(i) = 1·exp(0.001·i)") and out[2].startswith("stage 1: PolynomialTrend")
    assert "to 0.5000" in out[2]                          # 1/(1 + 575/575)
    assert main(["show", "--list"]) == 0
    names = capsys.readouterr().out.split()
    assert names == dc.preset_names() and len(names) == 41


def test_show_bad_trend_file_exit_status(tmp_path):
    (tmp_path / "bad.json").write_text('{"form": "exponential", "a": 1}')
    r = cli("show", "--trend", tmp_path / "bad.json")
    assert r.returncode == 2 and "bad.json" in r.stderr and "'b'" in r.stderr and "Traceback" not in r.stderr


def test_no_command_is_a_usage_error():
    r = cli()
    assert r.returncode == 2 and "usage" in r.stderr
