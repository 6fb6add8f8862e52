"""The study's outputs from its finished runs: ``study.json`` (schema in docs/study.md), ``report.md``, figures."""
from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from .stats import bootstrap_ci, paired_difference

SCHEMA = "study/1"
ASPECT_CLASS = {"square": "square", "4:3": "landscape", "16:9": "landscape", "2:1": "landscape",
                "3:4": "portrait", "9:16": "portrait", "1:2": "portrait", "4:1": "extreme", "1:4": "extreme"}
BANDS = ("top", "middle", "bottom")


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def _group_stats(qids, correct: dict, selection: dict | None, group_of: dict) -> dict:
    groups = defaultdict(list)
    for q in qids:
        groups[group_of[q]].append(q)
    out = {}
    for g, qs in sorted(groups.items()):
        c = [correct[q] for q in qs]
        entry = {"accuracy": 100.0 * float(np.mean(c)), "ci95": list(bootstrap_ci(c)), "n": len(qs)}
        if selection:
            entry["evidence_recall"] = _mean(selection[q]["recall"][-1] for q in qs if q in selection)
            entry["padding_share"] = _mean(selection[q]["padding_share"] for q in qs if q in selection)
        out[g] = entry
    return out


def record_of(result: dict, qids: list[str], aspect: dict, band: dict) -> dict:
    job = result["job"]
    correct = result["correct"]
    c = [correct[q] for q in qids]
    sel = result.get("selection")
    rec = {"name": job["name"], "method": job["method"] if job["kind"] != "control" else job["control"],
           "kind": job["kind"], "mode": job["mode"], "trend": job["trend_label"], "trend_spec": job["trend"],
           "budget": job["budget"], "method_args": list(job["method_args"]),
           "accuracy": 100.0 * float(np.mean(c)), "ci95": list(bootstrap_ci(c)), "n": len(qids),
           "seconds": result.get("seconds")}
    if sel:
        stages = max(len(v["recall"]) for v in sel.values())
        rec["evidence_recall"] = _mean(sel[q]["recall"][-1] for q in qids if q in sel)
        rec["evidence_recall_by_stage"] = [_mean(sel[q]["recall"][s] for q in qids
                                                 if q in sel and len(sel[q]["recall"]) > s) for s in range(stages)]
        rec["padding_share"] = _mean(sel[q]["padding_share"] for q in qids if q in sel)
        rec["kept_tokens"] = _mean(sel[q]["kept"][-1] for q in qids if q in sel)
    rec["by_aspect"] = _group_stats(qids, correct, sel, aspect)
    rec["by_band"] = _group_stats(qids, correct, sel, band)
    return rec


CALIBRATION_FITS = {"lsq": "least squares on the per-position mean scores (--calibration-fit lsq)",
                    "loglinear": "least squares on the log of the per-position mean scores (--calibration-fit loglinear)"}


def build(results: list[dict], eval_dir: Path, *, skipped: dict, settings: dict, model: Path) -> dict:
    from .data import row_band

    items = [json.loads(line) for line in open(eval_dir / "items.jsonl")]
    qids = [str(i["question_id"]) for i in items]
    aspect = {str(i["question_id"]): ASPECT_CLASS.get(i["aspect"], i["aspect"]) for i in items}
    band = {str(i["question_id"]): (row_band([tuple(b) for b in i["evidence"]], tuple(i["image_size"]))
                                    if i["evidence"] else "none") for i in items}
    by_name = {r["job"]["name"]: r for r in results}
    records = [record_of(r, qids, aspect, band) for r in results if r["job"]["kind"] != "calibration"]
    for rec in records:   # paired difference against the same method and budget in mode off
        if rec["kind"] == "baseline" and rec["mode"] != "off":
            off = by_name.get(f"{rec['method']}/{rec['budget']}/off--")
            if off:
                mine = by_name[rec["name"]]["correct"]
                rec["vs_off"] = paired_difference([off["correct"][q] for q in qids], [mine[q] for q in qids])
    _compare_with_controls(records, by_name, qids)
    unpruned = next((r for r in records if r["kind"] == "unpruned"), None)
    train = _train_summary()
    return {
        "schema": SCHEMA, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "model": {"path": str(model), **json.loads((Path(model) / "study.json").read_text()), "training": train},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in settings.items()},
        "n_eval": len(qids), "unpruned_accuracy": unpruned["accuracy"] if unpruned else None,
        "unpruned_ci95": unpruned["ci95"] if unpruned else None, "skipped": skipped,
        "records": sorted(records, key=lambda r: (r["kind"], r["method"], r["budget"] or 0, r["mode"], r["trend"])),
    }


def _compare_with_controls(records: list[dict], by_name: dict, qids: list[str]) -> None:
    """``vs_controls`` of every baseline record: paired differences (points, same questions) to the grid control
    and to the random controls at its budget; the random seeds count as one selection whose per-question
    correctness is the mean over the seeds."""
    controls = defaultdict(dict)   # budget -> control name -> correct vector [n]
    for rec in records:
        if rec["kind"] == "control":
            controls[rec["budget"]][rec["method"]] = [by_name[rec["name"]]["correct"][q] for q in qids]
    for rec in records:
        if rec["kind"] != "baseline" or not controls.get(rec["budget"]):
            continue
        mine = [by_name[rec["name"]]["correct"][q] for q in qids]
        at = controls[rec["budget"]]
        seeds = [v for k, v in sorted(at.items()) if k.startswith("random")]
        against = {**({"grid": at["grid"]} if "grid" in at else {}),
                   **({"random": list(np.mean(np.asarray(seeds, dtype=np.float64), axis=0))} if seeds else {})}
        rec["vs_controls"] = {name: {**paired_difference(vec, mine), **({"seeds": len(seeds)} if name == "random"
                                                                       else {})}
                              for name, vec in against.items()}


def _train_summary() -> dict | None:
    from .checkpoint import WEIGHTS

    manifest = WEIGHTS / "manifest.json"
    return json.loads(manifest.read_text()).get("training") if manifest.is_file() else None


# ------------------------------------------------------------------------------------------- markdown

def _fmt(rec) -> str:
    if rec is None:
        return "–"
    return f"{rec['accuracy']:.1f} [{rec['ci95'][0]:.1f}, {rec['ci95'][1]:.1f}]"


def _delta(rec) -> str:
    d = rec.get("vs_off") if rec else None
    if not d:
        return "–"
    return f"{d['diff']:+.1f} [{d['ci95'][0]:+.1f}, {d['ci95'][1]:+.1f}]"


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.0f} %"


def markdown(study: dict) -> str:
    recs = study["records"]
    idx = {(r["method"], r["budget"], r["mode"], r["trend"]): r for r in recs if r["kind"] == "baseline"}
    note = study.get("settings", {}).get("note")
    lines = [f"# Study results ({study['created']})", "", *([f"> **Read first.** {note}", ""] if note else []),
             f"Model: {study['model']['path']} (image start {study['model'].get('image_start')}). "
             f"{study['n_eval']} evaluation questions. Unpruned accuracy: "
             f"**{study['unpruned_accuracy']:.1f} %** [{study['unpruned_ci95'][0]:.1f}, "
             f"{study['unpruned_ci95'][1]:.1f}]." if study["unpruned_accuracy"] is not None else "", "",
             "Accuracy (%) with bootstrap 95 % intervals; Δ = paired difference to the same method and budget in "
             "mode off (points, paired 95 % interval); recall = share of the evidence patches among the tokens "
             "the last ranking stage kept; pad = share of kept tokens that are padding. Calibrated trends: "
             + CALIBRATION_FITS.get(study.get("settings", {}).get("calibration_fit", "lsq"), "?") + ".", "",
             "| method | budget | off | pad (Δ) | pos paper (Δ) | full paper (Δ) | full calibrated (Δ) | recall off → full "
             "paper → full calib. | pad off → full |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (method, budget) in sorted({(m, b) for m, b, _, _ in idx}):
        g = lambda mode, trend: idx.get((method, budget, mode, trend))  # noqa: E731
        off, pad, pos, full, cal = g("off", "-"), g("pad", "-"), g("pos", "paper"), g("full", "paper"), \
            g("full", "calibrated")
        rec_line = " → ".join(_pct(r.get("evidence_recall")) if r else "–" for r in (off, full, cal))
        pad_line = " → ".join(_pct(r.get("padding_share")) if r else "–" for r in (off, full))
        lines.append(f"| {method} | {budget} | {_fmt(off)} | {_fmt(pad)} ({_delta(pad)}) | {_fmt(pos)} ({_delta(pos)}) "
                     f"| {_fmt(full)} ({_delta(full)}) | {_fmt(cal)} ({_delta(cal)}) | {rec_line} | {pad_line} |")
    controls = [r for r in recs if r["kind"] == "control"]
    if controls:
        lines += ["", "Controls at FastV's layer (K = 2) and budgets (mode off, FastV's code, scores replaced):", "",
                  "| control | budget | accuracy | evidence recall | padding share |", "|---|---|---|---|---|"]
        for r in sorted(controls, key=lambda r: (r["method"], r["budget"])):
            lines.append(f"| {r['method']} | {r['budget']} | {_fmt(r)} | {_pct(r.get('evidence_recall'))} | "
                         f"{_pct(r.get('padding_share'))} |")
    lines += _controls_comparison(idx)
    lines += ["", "By evidence row band (top / middle / bottom third of the padded image), full (paper) − off, "
              "accuracy points:", "", "| method | budget | top | middle | bottom |", "|---|---|---|---|---|"]
    for (method, budget) in sorted({(m, b) for m, b, _, _ in idx}):
        off, full = idx.get((method, budget, "off", "-")), idx.get((method, budget, "full", "paper"))
        if off and full:
            cells = [f"{full['by_band'][b]['accuracy'] - off['by_band'][b]['accuracy']:+.1f} "
                     f"(n={off['by_band'][b]['n']})" if b in off["by_band"] and b in full["by_band"] else "–"
                     for b in BANDS]
            lines.append(f"| {method} | {budget} | " + " | ".join(cells) + " |")
    lines += _recall_by_band(idx, [r for r in recs if r["kind"] == "control"])
    lines += ["", "By aspect class, full (paper) − off, accuracy points:", "",
              "| method | budget | square | landscape | portrait | extreme |", "|---|---|---|---|---|---|"]
    for (method, budget) in sorted({(m, b) for m, b, _, _ in idx}):
        off, full = idx.get((method, budget, "off", "-")), idx.get((method, budget, "full", "paper"))
        if off and full:
            cells = [f"{full['by_aspect'][c]['accuracy'] - off['by_aspect'][c]['accuracy']:+.1f} "
                     f"(n={off['by_aspect'][c]['n']})" if c in off["by_aspect"] and c in full["by_aspect"] else "–"
                     for c in ("square", "landscape", "portrait", "extreme")]
            lines.append(f"| {method} | {budget} | " + " | ".join(cells) + " |")
    if study["skipped"]:
        lines += ["", "Not run here: " + "; ".join(study["skipped"].values())]
    return "\n".join(lines) + "\n"


def _band_recalls(rec: dict | None) -> str:
    if not rec or rec.get("evidence_recall") is None:
        return "–"
    return " / ".join(_pct(rec["by_band"].get(b, {}).get("evidence_recall")) for b in BANDS)


def _recall_by_band(idx: dict, controls: list[dict]) -> list[str]:
    """Evidence recall per row band of the evidence: where in the image each selection finds its evidence."""
    lines = ["", "Evidence recall by the evidence's row band (top / middle / bottom third of the padded image): the "
             "share of the evidence patches the last ranking stage kept. A recency-biased selection finds bottom "
             "evidence and misses top evidence.", "",
             "| method | budget | off | pad | pos paper | full paper | full calibrated |", "|---|---|---|---|---|---|---|"]
    for method, budget in sorted({key[:2] for key in idx}):
        cells = [_band_recalls(idx.get((method, budget, mode, trend)))
                 for mode, trend in (("off", "-"), ("pad", "-"), ("pos", "paper"), ("full", "paper"),
                                     ("full", "calibrated"))]
        lines.append(f"| {method} | {budget} | " + " | ".join(cells) + " |")
    for r in sorted(controls, key=lambda r: (r["method"], r["budget"])):
        lines.append(f"| {r['method']} (control) | {r['budget']} | {_band_recalls(r)} | | | | |")
    return lines


def _controls_comparison(idx: dict) -> list[str]:
    pairs = sorted({key[:2] for key, rec in idx.items() if rec.get("vs_controls")})
    if not pairs:
        return []
    lines = ["", "Against the controls at the same budget (paired differences in accuracy points on the same "
             "questions, 95 % intervals; random = the mean over its seeds):", "",
             "| method | budget | off − random | off − grid | full paper − random | full paper − grid |",
             "|---|---|---|---|---|---|"]
    for method, budget in pairs:
        cells = []
        for mode, trend in (("off", "-"), ("full", "paper")):
            vs = (idx.get((method, budget, mode, trend)) or {}).get("vs_controls", {})
            cells += [f"{vs[c]['diff']:+.1f} [{vs[c]['ci95'][0]:+.1f}, {vs[c]['ci95'][1]:+.1f}]" if c in vs else "–"
                      for c in ("random", "grid")]
        lines.append(f"| {method} | {budget} | " + " | ".join(cells) + " |")
    return lines


# --------------------------------------------------------------------------------------------- figures

def plot_budget_curves(study: dict, out: Path, metric: str = "accuracy") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = study["records"]
    methods = sorted({r["method"] for r in recs if r["kind"] == "baseline"})
    fig, axes = plt.subplots(1, max(len(methods), 1), figsize=(3.2 * max(len(methods), 1), 3.2), sharey=True,
                             squeeze=False)
    styles = {("off", "-"): ("off", "k"), ("pad", "-"): ("pad", "tab:blue"), ("pos", "paper"): ("pos", "tab:orange"),
              ("full", "paper"): ("full", "tab:red"), ("full", "calibrated"): ("full (calib.)", "tab:purple")}
    for ax, method in zip(axes[0], methods):
        for (mode, trend), (label, color) in styles.items():
            pts = sorted((r["budget"], r) for r in recs
                         if r["kind"] == "baseline" and r["method"] == method and r["mode"] == mode
                         and r["trend"] == trend)
            if not pts:
                continue
            xs = [b for b, _ in pts]
            ys = [r[metric] * (100 if metric != "accuracy" else 1) if r.get(metric) is not None else np.nan
                  for _, r in pts]
            ax.plot(xs, ys, "o-", color=color, label=label, lw=1.2, ms=3)
            if metric == "accuracy":
                lo = [r["ci95"][0] for _, r in pts]
                hi = [r["ci95"][1] for _, r in pts]
                ax.fill_between(xs, lo, hi, color=color, alpha=0.12)
        _plot_controls(ax, [r for r in recs if r["kind"] == "control"], metric)
        if metric == "accuracy" and study.get("unpruned_accuracy") is not None:
            ax.axhline(study["unpruned_accuracy"], color="green", lw=0.8, ls="--", label="unpruned")
        ax.set_xscale("log", base=2)
        budgets = sorted({r["budget"] for r in recs if r.get("budget")})
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.minorticks_off()
        ax.set_title(method)
        ax.set_xlabel("visual tokens kept")
    axes[0][0].set_ylabel({"accuracy": "accuracy (%)", "evidence_recall": "evidence recall (%)"}[metric])
    _legend_below(fig, axes[0])
    path = out / f"study_{metric}.png"
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def plot_recall_by_band(study: dict, out: Path) -> Path | None:
    """Evidence recall per row band of the evidence, one panel per method at the middle budget: bars for each
    mode, the grid control as a reference line per band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in study["records"] if r.get("evidence_recall") is not None]
    budgets = sorted({r["budget"] for r in recs if r["kind"] == "baseline"})
    if not budgets:
        return None
    budget = budgets[len(budgets) // 2]
    methods = sorted({r["method"] for r in recs if r["kind"] == "baseline" and r["budget"] == budget})
    modes = [("off", "-", "off", "k"), ("pad", "-", "pad", "tab:blue"), ("pos", "paper", "pos", "tab:orange"),
             ("full", "paper", "full", "tab:red"), ("full", "calibrated", "full (calib.)", "tab:purple")]
    fig, axes = plt.subplots(1, len(methods), figsize=(3.2 * len(methods), 3.2), sharey=True, squeeze=False)
    grid = next((r for r in recs if r["kind"] == "control" and r["method"] == "grid" and r["budget"] == budget), None)
    x = np.arange(len(BANDS))
    width = 0.8 / len(modes)
    for ax, method in zip(axes[0], methods):
        for i, (mode, trend, label, color) in enumerate(modes):
            rec = next((r for r in recs if r["kind"] == "baseline" and r["method"] == method and r["budget"] == budget
                        and r["mode"] == mode and r["trend"] == trend), None)
            if rec:
                ys = [100 * (rec["by_band"].get(b, {}).get("evidence_recall") or np.nan) for b in BANDS]
                ax.bar(x + (i - (len(modes) - 1) / 2) * width, ys, width, color=color, label=label)
        if grid:
            for j, b in enumerate(BANDS):
                ax.hlines(100 * grid["by_band"][b]["evidence_recall"], j - 0.42, j + 0.42, colors="dimgray",
                          linestyles=":", label="grid (control)" if j == 0 else None)
        ax.set_xticks(x, BANDS)
        ax.set_title(method)
        ax.set_xlabel("row band of the evidence")
    axes[0][0].set_ylabel(f"evidence recall (%), {budget} tokens")
    _legend_below(fig, axes[0])
    path = out / "study_recall_by_band.png"
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def _legend_below(fig, axes) -> None:
    """One legend for all panels (every label once), below them, clear of the curves; none when nothing is
    labelled (a study where only the unpruned model ran)."""
    legend = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    if legend:
        fig.legend(legend.values(), legend.keys(), loc="lower center", ncol=len(legend), fontsize=8, frameon=False)


def _plot_controls(ax, controls: list[dict], metric: str) -> None:
    """The grid control as a dotted line; the random seeds as their mean (dashed) within their min-max band."""
    def value(r):
        return r[metric] * (100 if metric != "accuracy" else 1) if r.get(metric) is not None else np.nan

    grid = sorted((r["budget"], value(r)) for r in controls if r["method"] == "grid")
    if grid:
        ax.plot(*zip(*grid), ":", color="dimgray", lw=1.3, label="grid (control)")
    seeds = sorted({r["method"] for r in controls if r["method"].startswith("random")})
    by_budget: dict = {}
    for r in controls:
        if r["method"] in seeds:
            by_budget.setdefault(r["budget"], []).append(value(r))
    if by_budget:
        xs = sorted(by_budget)
        ax.plot(xs, [np.mean(by_budget[b]) for b in xs], "--", color="gray", lw=1.1,
                label=f"random (control, mean of {len(seeds)} seed{'s' * (len(seeds) > 1)})")
        ax.fill_between(xs, [min(by_budget[b]) for b in xs], [max(by_budget[b]) for b in xs], color="gray", alpha=0.15)


def paper_figures(out: Path, method: str) -> dict:
    """Paper Figs. 2-5 from the study model's real attention: the method's calibration recording, stage 0."""
    from analysis.figures import figures_from_recording

    record = out / "runs" / "calibration" / method / "record.npz"
    if not record.exists():   # no calibration run (--no-calibrated, --quick): the method's first run in mode off
        record = next(iter(sorted((out / "runs" / method).glob("*/off--/record.npz"))), None)
    if record is None or not record.exists():
        return {}
    from .run import paper_trend, trend_method

    dest = out / "figures" / method
    dest.mkdir(parents=True, exist_ok=True)
    rep = figures_from_recording(record, dest, mode="full", trend=paper_trend(method), keep=128, stage=0,
                                 method=trend_method(method))
    return rep.get("figures", {})


def _relative(path, out: Path) -> str:
    p = Path(path)
    return str(p.relative_to(out)) if p.is_relative_to(out) else str(p)


def write_report(out: Path, results: list[dict], eval_dir: Path, *, skipped: dict, settings: dict,
                 model: Path) -> Path:
    study = build(results, eval_dir, skipped=skipped, settings=settings, model=model)
    figs = {"accuracy": str(plot_budget_curves(study, out, "accuracy"))}
    if any(r.get("evidence_recall") is not None for r in study["records"]):
        figs["evidence_recall"] = str(plot_budget_curves(study, out, "evidence_recall"))
        band_figure = plot_recall_by_band(study, out)
        if band_figure:
            figs["recall_by_band"] = str(band_figure)
    for m in sorted({r["method"] for r in study["records"] if r["kind"] == "baseline"}):
        figs.update({f"{m}_{k}": v for k, v in paper_figures(out, m).items()})
    study["figures"] = {k: _relative(v, out) for k, v in figs.items()}   # the folder can move (e.g. into docs/)
    (out / "study.json").write_text(json.dumps(study, indent=1) + "\n")
    (out / "report.md").write_text(markdown(study))
    return out / "study.json"
