"""analysis.figures: Figs. 2-5 and the bias metrics from a recording; the CLI; the study's needle plot."""
import json

import numpy as np
import pytest

_WHY = "so the figures (analysis.figures, python -m analysis figures) were not tested; pip install -r envs/analysis.txt"
pytest.importorskip("matplotlib", reason=f"package matplotlib is not installed, {_WHY}")
pytest.importorskip("PIL", reason=f"package pillow is not installed, {_WHY}")
from PIL import Image  # noqa: E402

import debias_core as dc  # noqa: E402
from analysis import figures  # noqa: E402
from analysis.__main__ import main as analysis_main  # noqa: E402
from analysis.synthetic import synthetic_session  # noqa: E402

pytestmark = pytest.mark.usefixtures("clean_debias")


def _png(path, min_px=300):
    assert path.is_file() and path.stat().st_size > 5000, path
    with Image.open(path) as im:
        assert im.format == "PNG" and min(im.size) >= min_px
        arr = np.asarray(im.convert("L"), dtype=float)
    assert arr.std() > 5                                             # not a blank canvas


def test_figures_from_a_recording(tmp_path):
    s = synthetic_session(rows=30, b=0.003, padding_boost=3.0)
    s.save(tmp_path / "rec.npz")
    report = figures.figures_from_recording(tmp_path / "rec.npz", tmp_path / "figs", mode="full", keep=192,
                                            method="himap")
    for name in ("fig2_heatmap.png", "fig3_overlays.png", "fig4_selection_by_aspect.png", "fig5_trend.png"):
        _png(tmp_path / "figs" / name)
    saved = json.loads((tmp_path / "figs" / "bias_metrics.json").read_text())
    assert saved["trend_is_in_sample"] is True
    assert saved["fit_on_this_recording"]["b"] == pytest.approx(0.003, rel=0.1)
    assert saved["before"]["positional"]["spearman"] > 0.8 > abs(saved["after"]["positional"]["spearman"])
    assert saved["before"]["padding"]["ratio"] > 1.2 and saved["after"]["padding"]["ratio"] < 0.1
    assert set(report["figures"]) == {"fig2", "fig3", "fig4", "fig5"}


def test_a_given_trend_is_used_for_after(tmp_path):
    s = synthetic_session(rows=12, b=0.003)
    rep = figures.figures_from_recording(s, tmp_path, mode="pos", trend="paper:pdrop/gqa", keep=100, method="pdrop")
    assert rep["trend_is_in_sample"] is False and rep["settings"]["trend"] == "paper:pdrop/gqa"
    # the paper's PDrop/GQA trend (b ≈ 0.0040) over-corrects a b = 0.003 recency: the order flips
    assert rep["after"]["positional"]["spearman"] < -0.5


def test_kept_overlay_draws_a_real_image(tmp_path):
    img = tmp_path / "photo.png"
    rgb = np.zeros((200, 400, 3), dtype=np.uint8)
    rgb[:, :, 0] = np.linspace(0, 255, 400)[None, :].astype(np.uint8)
    Image.fromarray(rgb).save(img)
    ctx = [{"image_size": [400, 200], "image": str(img)}]
    kept = np.zeros((1, 576), bool)
    kept[0, 200:300] = True
    out = figures.plot_kept_overlays(kept, kept, ctx, tmp_path / "overlay.png")
    _png(out)


def test_selection_maps_say_when_a_group_is_empty(tmp_path):
    ctx = [{"image_size": [500, 500]}] * 4
    kept = np.random.default_rng(0).random((4, 576)) > 0.5
    _png(figures.plot_selection_by_aspect(kept, kept, ctx, tmp_path / "sel.png"))


def test_needle_plot(tmp_path):
    pos = [0, 100, 200]
    out = figures.plot_needle(pos, {"off": [0, 0.5, 1], "pos": [1, 0.5, 0.5]},
                              {"unpruned": [1, 1, 1], "off": [0, 0.5, 1], "pos": [1, 0.5, 0]}, tmp_path / "n.png")
    _png(out)


def test_cli_figures(tmp_path, capsys):
    synthetic_session(rows=9).save(tmp_path / "r.npz")
    rc = analysis_main(["figures", str(tmp_path / "r.npz"), "--out", str(tmp_path / "o"), "--keep", "150"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "before:" in text and "after :" in text and "in-sample" in text
    _png(tmp_path / "o" / "fig4_selection_by_aspect.png")
    assert analysis_main(["figures", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_synthetic_session_restores_settings():
    dc.configure(mode="pos", trend="paper:himap/gqa")
    synthetic_session(rows=2)
    assert dc.settings().mode == "pos" and dc.settings().trend_spec == "paper:himap/gqa"
