"""The results table (Markdown + CSV) and the radar chart, from hand-made score.json files."""
import csv
import json

import pytest

from eval.common import EvalError
from eval.report import build_table, collect, make_report, to_markdown
from tests.support import require_module

SCALE = {"pope": 1.0, "mme": 20.0, "vqav2": 1.0, "synthetic_wide": 1.0, "synthetic_tall": 1.0, "gqa": 1.0}
TITLE = {"pope": "POPE", "mme": "MME", "vqav2": "VQAv2", "gqa": "GQA"}


def write_score(root, method, mode, bench, value, budget="128", trend=None):
    d = root / "m" / bench / f"{method}-{budget}" / (mode if mode == "off" else f"{mode}-t")
    d.mkdir(parents=True)
    (d / "score.json").write_text(json.dumps({
        "benchmark": bench, "title": TITLE.get(bench, bench), "method": method, "budget": budget, "mode": mode,
        "trend": trend, "model_name": "llava-v1.5-7b", "metric": "x", "value": value,
        "percent": None if value is None else value / SCALE[bench], "scoring": "server" if value is None else "local",
        "limit": None}))


@pytest.fixture
def answers(tmp_path):
    vals = {"fastv": ((80.0, 1400.0), (84.0, 1500.0)), "pdrop": ((82.0, 1450.0), (83.0, 1430.0)),
            "himap": ((78.0, 1300.0), (80.0, 1360.0))}
    for method, (off, full) in vals.items():
        for mode, (pope, mme) in (("off", off), ("full", full)):
            trend = None if mode == "off" else f"paper:{method}"  # one preset per benchmark: still one row
            write_score(tmp_path, method, mode, "pope", pope, trend=trend and trend + "/pope")
            write_score(tmp_path, method, mode, "mme", mme, trend=trend and trend + "/mme")
            write_score(tmp_path, method, mode, "vqav2", None, trend=trend and trend + "/vqav2")
    return tmp_path


def test_table_values_average_and_gain(answers):
    table = build_table(collect([answers]))
    assert table["benchmarks"] == ["mme", "pope", "vqav2"]  # registry order
    rows = {r["key"][1:4]: r for r in table["rows"]}
    off, full = rows[("fastv", "128", "off")], rows[("fastv", "128", "full")]
    assert off["avg"] == pytest.approx((80.0 + 1400.0 / 20) / 2) and off["n"] == 2    # MME on a percent scale
    assert full["delta"] == {"pope": pytest.approx(4.0), "mme": pytest.approx(100.0)}
    assert full["delta_avg"] == pytest.approx((4.0 + 5.0) / 2)
    assert rows[("pdrop", "128", "full")]["delta"]["mme"] == pytest.approx(-20.0)
    assert len(table["rows"]) == 6 and full["key"][4] == "paper"
    md = to_markdown(table)
    assert "| llava-v1.5-7b | fastv | 128 | off | – | 1400.0 | 80.00 | server | 75.00 | 2 |" in md
    assert "|  |  |  | Δ full − off |  | +100.00 | +4.00 | – | +4.50 | 2 |" in md


def test_report_files_and_radar_like_figure_1(answers, tmp_path):
    require_module("matplotlib", "the radar chart needs matplotlib")
    res = make_report([answers], tmp_path / "out")
    assert res["kind"] == "methods"  # three methods with off and debiased runs: spokes = methods
    rows = list(csv.reader(open(res["csv"])))
    assert rows[0][:5] == ["model", "method", "budget", "mode", "trend"] and rows[0][-2:] == ["Avg", "n"]
    assert len(rows) == 1 + 6 + 3  # six runs, three Δ rows
    assert res["radar"].stat().st_size > 20_000


def test_radar_falls_back_to_benchmark_spokes_then_bars(tmp_path):
    require_module("matplotlib", "the radar chart needs matplotlib")
    for bench, v in (("pope", 80.0), ("gqa", 60.0), ("synthetic_wide", 50.0)):
        write_score(tmp_path / "a", "llava", "off", bench, v, budget="all")
    assert make_report([tmp_path / "a"], tmp_path / "o1")["kind"] == "benchmarks"
    write_score(tmp_path / "b", "llava", "off", "pope", 80.0, budget="all")
    assert make_report([tmp_path / "b"], tmp_path / "o2")["kind"] == "bars"


def test_no_scores_is_a_clear_error(tmp_path):
    with pytest.raises(EvalError, match="no score.json under"):
        collect([tmp_path])
    with pytest.raises(EvalError, match="does not exist"):
        collect([tmp_path / "missing"])
