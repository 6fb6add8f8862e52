"""study.report's budget curves: the controls are drawn as one grid line and the random seeds' mean within their
range, and every curve's label reaches the figure's legend (it once named only the first panel's controls)."""
import numpy as np
import pytest

pytest.importorskip("matplotlib")


def _control(method, budget, accuracy):
    return {"kind": "control", "method": method, "budget": budget, "accuracy": accuracy}


def test_controls_are_the_grid_and_the_random_seeds_mean_within_their_range():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from study.report import _plot_controls

    controls = [_control("grid", 64, 60.0), _control("grid", 32, 50.0),
                _control("random:0", 64, 50.0), _control("random:1", 64, 56.0), _control("random:2", 64, 53.0),
                _control("random:0", 32, 40.0), _control("random:1", 32, 44.0), _control("random:2", 32, 45.0)]
    fig, ax = plt.subplots()
    _plot_controls(ax, controls, "accuracy")
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"grid (control)", "random (control, mean of 3 seeds)"}
    assert list(lines["grid (control)"].get_xdata()) == [32, 64]
    assert list(lines["grid (control)"].get_ydata()) == [50.0, 60.0]
    assert np.allclose(lines["random (control, mean of 3 seeds)"].get_ydata(), [43.0, 53.0])
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    assert band.min() == 40.0 and band.max() == 56.0
    plt.close(fig)


def test_budget_curves_put_every_label_in_the_legend(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from study import report

    recs = [{"kind": "baseline", "method": m, "mode": mode, "trend": trend, "budget": b, "accuracy": 50.0 + b / 10,
             "ci95": [45.0, 55.0]}
            for m in ("fastv", "pdrop") for mode, trend in (("off", "-"), ("full", "paper")) for b in (32, 64)]
    recs += [_control("grid", 64, 60.0), _control("random:0", 64, 50.0)]
    seen = {}
    real_savefig = plt.Figure.savefig

    def spy(fig, *a, **k):
        seen["labels"] = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
        return real_savefig(fig, *a, **k)

    plt.Figure.savefig = spy
    try:
        path = report.plot_budget_curves({"records": recs, "unpruned_accuracy": 80.0}, tmp_path)
    finally:
        plt.Figure.savefig = real_savefig
    assert path.exists()
    assert seen["labels"] == ["off", "full", "grid (control)", "random (control, mean of 1 seed)", "unpruned"]


def test_runs_are_compared_with_the_grid_and_with_the_random_seeds_mean():
    from study.report import _compare_with_controls

    qids = ["a", "b", "c", "d"]
    runs = {"fastv/64/full-paper": [1, 1, 0, 0], "control-grid/64/off--": [1, 0, 0, 0],
            "control-random0/64/off--": [0, 0, 0, 0], "control-random1/64/off--": [1, 1, 1, 0],
            "fastv/32/off--": [1, 0, 0, 0]}
    by_name = {n: {"correct": dict(zip(qids, c))} for n, c in runs.items()}
    records = [{"name": "fastv/64/full-paper", "kind": "baseline", "budget": 64},
               {"name": "fastv/32/off--", "kind": "baseline", "budget": 32},   # no control at 32
               {"name": "control-grid/64/off--", "kind": "control", "method": "grid", "budget": 64},
               {"name": "control-random0/64/off--", "kind": "control", "method": "random:0", "budget": 64},
               {"name": "control-random1/64/off--", "kind": "control", "method": "random:1", "budget": 64}]
    _compare_with_controls(records, by_name, qids)
    vs = records[0]["vs_controls"]
    assert vs["grid"]["diff"] == 25.0 and vs["grid"]["discordant"] == 1
    assert vs["random"]["diff"] == 50.0 - 37.5 and vs["random"]["seeds"] == 2
    assert "vs_controls" not in records[1] and "vs_controls" not in records[2]


def _banded(kind, method, mode, trend, budget, recalls):
    return {"kind": kind, "method": method, "mode": mode, "trend": trend, "budget": budget, "evidence_recall": 0.1,
            "by_band": {b: {"evidence_recall": r} for b, r in zip(("top", "middle", "bottom"), recalls)}}


def test_recall_by_band_table_and_figure(tmp_path):
    from study.report import _recall_by_band, plot_recall_by_band

    recs = [_banded("baseline", "fastv", "off", "-", 64, (0.02, 0.06, 0.26)),
            _banded("baseline", "fastv", "full", "paper", 64, (0.13, 0.32, 0.5)),
            _banded("baseline", "fastv", "off", "-", 32, (0.01, 0.03, 0.13)),
            _banded("control", "grid", "off", "-", 64, (0.11, 0.11, 0.11))]
    idx = {(r["method"], r["budget"], r["mode"], r["trend"]): r for r in recs if r["kind"] == "baseline"}
    lines = _recall_by_band(idx, [recs[-1]])
    assert "| fastv | 64 | 2 % / 6 % / 26 % | – | – | 13 % / 32 % / 50 % | – |" in lines
    assert "| grid (control) | 64 | 11 % / 11 % / 11 % | | | | |" in lines
    path = plot_recall_by_band({"records": recs}, tmp_path)
    assert path == tmp_path / "study_recall_by_band.png" and path.stat().st_size > 0
    assert plot_recall_by_band({"records": [dict(recs[0], evidence_recall=None)]}, tmp_path) is None


def test_budget_curves_of_a_study_with_only_the_unpruned_run(tmp_path):
    """The CI-sized study where no baseline environment exists: one run, no curve, still a figure."""
    from study import report

    unpruned = {"kind": "unpruned", "method": "llava", "mode": "off", "trend": "-", "budget": None,
                "accuracy": 50.0, "ci95": [0.0, 100.0]}
    assert report.plot_budget_curves({"records": [unpruned], "unpruned_accuracy": None}, tmp_path).exists()
