"""Results table and radar chart: ``python -m eval.report [--answers-dir DIR ...] [--out DIR]``.

Collects every ``score.json`` under the answers folder(s) into one table, rows (model, method, budget, mode,
trend; the per-benchmark paper presets count as one trend, "paper") × benchmark columns, with the average and, under each debiased row, its gain over ``off`` (Δ).
Writes ``results.md``, ``results.csv`` and ``radar.png``.

Cells hold each benchmark's headline metric as LLaVA reports it (MME: perception points out of 2000; POPE: mean
F1 over categories; ScienceQA: IMG-Accuracy; others: accuracy %). Server- or judge-scored benchmarks without a
score show ``server`` / ``judge``. "Avg" is the mean over the row's scored benchmarks on a percent scale (MME /
20), with the number of benchmarks averaged; Δ uses only benchmarks scored in both rows.

The radar follows the paper's Figure 1 when at least three methods have both an ``off`` and a debiased run:
one spoke per method, its average score, one polygon for the original methods and one per debias mode.
Otherwise, with at least three benchmarks, one spoke per benchmark and one polygon per run; otherwise bars.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from .benchmarks import REGISTRY
from .common import ROOT, EvalError
from .registry import display_name

ORDER = list(REGISTRY)


def collect(answers_dirs) -> list[dict]:
    scores = []
    for d in answers_dirs:
        d = Path(d)
        if not d.exists():
            raise EvalError(f"answers folder {d} does not exist (python -m eval.run writes answers there)")
        for path in sorted(d.rglob("score.json")):
            s = json.loads(path.read_text())
            s["run_dir"] = str(path.parent)
            scores.append(s)
    if not scores:
        raise EvalError(f"no score.json under {', '.join(map(str, answers_dirs))}; score runs first "
                        f"(python -m eval.score --answers-dir DIR)")
    return scores


def trend_family(trend: str | None) -> str:
    """Row label of a trend: the paper presets (one per method and benchmark) form one family, "paper"."""
    if not trend:
        return ""
    return "paper" if trend.startswith("paper:") else trend


def _row_key(s):
    return (s.get("model_name") or "?", s["method"], s["budget"], s["mode"], trend_family(s.get("trend")))


def _mode_rank(mode):
    return ("off", "pad", "pos", "full").index(mode) if mode in ("off", "pad", "pos", "full") else 9


def build_table(scores: list[dict]) -> dict:
    """{"benchmarks": [keys], "titles": {...}, "rows": [{"key", "cells": {bench: score dict}, "avg", "n",
    "delta": {bench: Δ} | None, "delta_avg"}]} with rows sorted model, method, budget, mode."""
    benches = sorted({s["benchmark"] for s in scores}, key=lambda b: ORDER.index(b) if b in ORDER else 99)
    titles = {s["benchmark"]: s["title"] for s in scores}
    rows = {}
    for s in scores:
        cells = rows.setdefault(_row_key(s), {})
        if s["benchmark"] in cells:
            raise EvalError(f"two scores for the same run and benchmark: {cells[s['benchmark']]['run_dir']} and "
                            f"{s['run_dir']}")
        cells[s["benchmark"]] = s
    out = []
    for key in sorted(rows, key=lambda k: (k[0], k[1], k[2], _mode_rank(k[3]), k[4])):
        cells = rows[key]
        pct = {b: c["percent"] for b, c in cells.items() if c.get("percent") is not None}
        row = {"key": key, "cells": cells, "avg": sum(pct.values()) / len(pct) if pct else None, "n": len(pct),
               "delta": None, "delta_avg": None}
        base = rows.get((key[0], key[1], key[2], "off", ""))
        if key[3] != "off" and base:
            common = [b for b in pct if base.get(b, {}).get("percent") is not None]
            row["delta"] = {b: cells[b]["value"] - base[b]["value"] for b in common}
            if common:
                row["delta_avg"] = sum(pct[b] - base[b]["percent"] for b in common) / len(common)
        out.append(row)
    return {"benchmarks": benches, "titles": titles, "rows": out}


def _cell(score: dict | None) -> str:
    if score is None:
        return "–"
    v = score.get("value")
    if v is None:
        return score.get("scoring", "?")
    return f"{v:.1f}" if score["benchmark"] == "mme" else f"{v:.2f}"


def _lines(table: dict) -> list[list[str]]:
    head = ["model", "method", "budget", "mode", "trend"] + [table["titles"][b] for b in table["benchmarks"]] + ["Avg", "n"]
    lines = [head]
    for row in table["rows"]:
        model, method, budget, mode, trend = row["key"]
        lines.append([model, method, budget, mode, trend or "–"]
                     + [_cell(row["cells"].get(b)) for b in table["benchmarks"]]
                     + ["–" if row["avg"] is None else f"{row['avg']:.2f}", str(row["n"])])
        if row["delta"] is not None:
            lines.append(["", "", "", f"Δ {mode} − off", ""]
                         + [f"{row['delta'][b]:+.2f}" if b in row["delta"] else "–" for b in table["benchmarks"]]
                         + ["–" if row["delta_avg"] is None else f"{row['delta_avg']:+.2f}", str(len(row["delta"]))])
    return lines


def to_markdown(table: dict) -> str:
    lines = _lines(table)
    md = ["| " + " | ".join(lines[0]) + " |", "|" + "|".join("---" for _ in lines[0]) + "|"]
    md += ["| " + " | ".join(r) + " |" for r in lines[1:]]
    notes = ("Headline metric per benchmark as LLaVA reports it (MME: perception, of 2000; POPE: mean F1; "
             "ScienceQA: IMG-Accuracy). Avg: mean on a percent scale (MME/20) over the n scored benchmarks; "
             "Δ rows: debiased minus off on the benchmarks both rows scored.")
    limited = sorted({(s["title"], s["limit"]) for r in table["rows"] for s in r["cells"].values() if s.get("limit")})
    if limited:
        notes += " Partial runs (--limit): " + ", ".join(f"{t} first {n}" for t, n in limited) + "."
    return "\n".join(md) + "\n\n" + notes + "\n"


def write_csv(table: dict, path: Path) -> None:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(_lines(table))


def _runs_label(key) -> str:
    model, method, budget, mode, trend = key
    return f"{method}" + ("" if budget == "all" else f"-{budget}") + f" {mode}"


def radar(table: dict, path: Path, title: str | None = None) -> str:
    """Draw the chart; returns which kind was drawn ("methods", "benchmarks" or "bars")."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = table["rows"]
    methods = {}
    for r in rows:
        methods.setdefault(r["key"][:3], {})[r["key"][3] + (f", {r['key'][4]} trend" if r["key"][4] else "")] = r
    paired = {m: v for m, v in methods.items() if "off" in v and len(v) > 1}
    if len(paired) >= 3:
        kind = "methods"
        one_budget = len({m[2] for m in paired}) == 1
        spokes = [display_name(m[1]) + ("" if one_budget or m[2] == "all" else f"\n{m[2]}") for m in paired]
        series = {}
        for i, v in enumerate(paired.values()):
            for label, r in v.items():
                series.setdefault("original" if label == "off" else f"+ debiasing ({label})",
                                  [None] * len(paired))[i] = r["avg"]
    elif len(table["benchmarks"]) >= 3:
        one_budget = True
        kind = "benchmarks"
        spokes = [table["titles"][b] for b in table["benchmarks"]]
        series = {_runs_label(r["key"]): [r["cells"].get(b, {}).get("percent") for b in table["benchmarks"]]
                  for r in rows}
    else:
        kind = "bars"
    fig = plt.figure(figsize=(8.5, 7.5), dpi=110)
    if kind == "bars":
        ax = fig.add_subplot(111)
        labels = [f"{_runs_label(r['key'])} · {table['titles'][b]}" for r in rows for b in table["benchmarks"]
                  if r["cells"].get(b, {}).get("percent") is not None]
        vals = [r["cells"][b]["percent"] for r in rows for b in table["benchmarks"]
                if r["cells"].get(b, {}).get("percent") is not None]
        ax.barh(labels, vals, color="#4C72B0")
        ax.set_xlabel("score (%)")
        ax.set_title(title or "Scores (fewer than 3 methods or benchmarks: bars instead of a radar)")
    else:
        n = len(spokes)
        angles = np.linspace(0, 2 * np.pi, n, endpoint=False)
        ax = fig.add_subplot(111, polar=True)
        vals = [v for s in series.values() for v in s if v is not None]
        lo, hi = (min(vals), max(vals)) if vals else (0, 100)
        pad = max(2.0, (hi - lo) * 0.25)
        ax.set_ylim(max(0.0, lo - pad), min(100.0, hi + pad) if hi + pad <= 100 else hi + pad)
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for j, (label, values) in enumerate(series.items()):
            v = np.array([np.nan if x is None else x for x in values], dtype=float)
            closed_a, closed_v = np.append(angles, angles[0]), np.append(v, v[0])
            ax.plot(closed_a, closed_v, "o-" if j == 0 else "o--", lw=2 if j == 0 else 1.6,
                    color=colors[j % len(colors)], label=label)  # dashed: equal series stay visible
            ax.fill(closed_a, np.nan_to_num(closed_v, nan=ax.get_ylim()[0]), alpha=0.12, color=colors[j % len(colors)])
            d = -13 if j == 0 else 13 * j  # first series labelled inwards, the others outwards
            for a, x in zip(angles, v):
                if not np.isnan(x):
                    ax.annotate(f"{x:.1f}", (a, x), textcoords="offset points",
                                xytext=(2.2 * d * np.cos(a), 1.1 * d * np.sin(a)),
                                ha="center", va="center", fontsize=9, color=colors[j % len(colors)])
        ax.set_xticks(angles)
        ax.set_xticklabels(spokes, fontsize=11)
        ax.tick_params(axis="x", pad=18)
        default = ("Average score per method: original vs debiased"
                   + (f" (budget {next(iter(paired))[2]})" if one_budget else "") if kind == "methods"
                   else "Score per benchmark (%)")
        ax.set_title(title or default, pad=28, fontsize=13)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, fontsize=10, frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return kind


def make_report(answers_dirs, out_dir, title: str | None = None) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = build_table(collect(answers_dirs))
    (out / "results.md").write_text(to_markdown(table))
    write_csv(table, out / "results.csv")
    kind = radar(table, out / "radar.png", title)
    return {"markdown": out / "results.md", "csv": out / "results.csv", "radar": out / "radar.png", "kind": kind,
            "table": table}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.report", description=__doc__.split("\n")[0])
    p.add_argument("--answers-dir", action="append", type=Path, default=None,
                   help="folder(s) searched for score.json (default outputs/answers)")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "report")
    p.add_argument("--title", default=None)
    a = p.parse_args(argv)
    try:
        res = make_report(a.answers_dir or [ROOT / "outputs" / "answers"], a.out, a.title)
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"error: the chart needs matplotlib ({e}); pip install matplotlib", file=sys.stderr)
        return 2
    print(res["markdown"].read_text())
    print(f"wrote {res['markdown']}, {res['csv']}, {res['radar']} ({res['kind']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
